"""Optimised contexts of source points (LDM correspondence, SPEC 3) kept between pairs and between runs.

Layout: ``<root>/<settings hash>/<point key>.safetensors`` (the ``TensorStore``
of ``feature_cache``), where the settings hash covers everything that changes
a context (method, model, revision, UNet weights, steps, learning rate,
restarts, tokens, sigma, crops, noise level, image size, seed, precision,
published quirks) and the point key covers the source image's URI and the
query pixel. Each file holds one tensor ``contexts`` [R, T, D] (one per
restart) and, as metadata, the URI, the point (x, y), the original image size
and the decoded image's content hash. A point is optimised once however many
pairs and targets use it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from skp_ray.correspondence.feature_cache import TensorStore

if TYPE_CHECKING:
    import torch


def context_key(uri: str, x: int, y: int) -> str:
    """32 hex digits naming the contexts of one query pixel (x, y) of one image."""
    return hashlib.sha256(f"{uri}\0{int(x)}\0{int(y)}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class StoredContexts:
    contexts: torch.Tensor  # [R, T, D] float32
    uri: str
    point_xy: tuple[int, int]  # the query pixel
    height: int  # of the original image
    width: int
    content_hash: str


class ContextStore(TensorStore):
    """The optimised contexts of one settings hash, one file per (source image, query pixel)."""

    noun = "stored contexts"
    key_name = "point key"

    def save(self, key: str, contexts: torch.Tensor, *, uri: str, point_xy, height: int, width: int, content_hash: str):
        x, y = (int(v) for v in point_xy)
        metadata = {"uri": uri, "x": str(x), "y": str(y), "height": str(height), "width": str(width), "content_hash": content_hash}
        self._write(key, {"contexts": contexts.float()}, metadata)

    def load(self, key: str) -> StoredContexts:
        """The stored contexts; FileNotFoundError naming the file when they are not there."""
        tensors, metadata = self._read(key)
        return StoredContexts(
            contexts=tensors["contexts"],
            uri=metadata["uri"],
            point_xy=(int(metadata["x"]), int(metadata["y"])),
            height=int(metadata["height"]),
            width=int(metadata["width"]),
            content_hash=metadata["content_hash"],
        )
