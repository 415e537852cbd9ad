"""Random draws keyed by what they are for, so a result does not depend on batching or worker count."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def keyed_generator(*key: int | str) -> torch.Generator:
    """A CPU generator seeded from a key of ints and strings, e.g. ``(seed, "step", step, image_index)``.

    Equal keys give equal streams; different keys give independent ones (numpy's SeedSequence
    mixes the key words).
    """
    words = [int.from_bytes(part.encode(), "little") if isinstance(part, str) else int(part) for part in key]
    seed = int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    import torch  # here, not above: drivers that only build manifests never import torch

    return torch.Generator().manual_seed(seed)
