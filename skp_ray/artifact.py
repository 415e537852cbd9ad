"""The keypoint artifact: a learned context and its keypoint tokens, all that detection needs.

An artifact is a folder, local or at any fsspec URL (``s3://``, ``gs://``):

- ``context.safetensors``: the context [num_tokens, width], float32, under the key ``context``;
- ``artifact.json``: the token indices, the model id and revision, every
  discovery setting, the loss history, image counts and the content hash;
- anything else the writer adds beside them (discovery adds ``metrics.jsonl``,
  ``loss.png`` and ``keypoints.png``).

``artifact.json`` is written last, so a folder without it is not (yet) an
artifact. ``check_artifact`` reads one with numpy only (a job's driver checks
the artifact before Ray starts, and importing torch would add seconds to its
start-up); ``load_artifact`` gives the context as a torch tensor. No pickle is
involved anywhere. The content hash covers exactly what detection uses (the
context values and the token indices), so two artifacts with the same hash give
the same keypoints.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import fsspec
import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

if TYPE_CHECKING:
    import torch

FORMAT = "skp_ray.keypoint_artifact/1"
ARTIFACT_FILE = "artifact.json"
CONTEXT_FILE = "context.safetensors"

# SPEC 1.1's image side, for artifacts that do not record theirs.
DEFAULT_IMAGE_SIZE = 512


@dataclass
class KeypointArtifact:
    context: torch.Tensor | np.ndarray  # [num_tokens, width]: a tensor from load_artifact, numpy from check_artifact
    token_indices: list[int]  # the keypoint tokens, most often picked first
    model: str
    revision: str | None = None
    settings: dict = field(default_factory=dict)
    loss_history: list[float] = field(default_factory=list)
    images: dict = field(default_factory=dict)  # counts: used, skipped by cause, used for token selection

    @property
    def image_size(self) -> int:
        """The side, in pixels, of the images the artifact was learned on."""
        return self.settings.get("image_size") or DEFAULT_IMAGE_SIZE

    @property
    def content_hash(self) -> str:
        return content_hash(self.context, self.token_indices)

    @property
    def id(self) -> str:
        """A short name for this artifact: the start of its content hash."""
        return self.content_hash.removeprefix("sha256:")[:16]


def content_hash(context: torch.Tensor | np.ndarray, token_indices: list[int]) -> str:
    """sha256 over the context's shape and float32 little-endian values, then the indices as JSON."""
    values = _float32_values(context)
    digest = hashlib.sha256()
    digest.update(json.dumps(list(values.shape)).encode())
    digest.update(values.tobytes())
    digest.update(json.dumps([int(i) for i in token_indices]).encode())
    return "sha256:" + digest.hexdigest()


def artifact_exists(folder: str) -> bool:
    fs, path = fsspec.core.url_to_fs(folder)
    fs.invalidate_cache(path)  # object-store listings are cached per process; ask the store itself
    return fs.exists(posixpath.join(path, ARTIFACT_FILE))


def save_artifact(artifact: KeypointArtifact, folder: str, *, files: Mapping[str, bytes] = {}) -> str:
    """Write ``artifact`` (and extra ``files``, name -> bytes) to ``folder``; never overwrites an artifact."""
    if artifact_exists(folder):
        raise FileExistsError(
            f"an artifact already exists at {folder!r}; choose another name or output, or delete it first"
        )
    _check_indices(artifact.token_indices, len(artifact.context), folder)
    fs, path = fsspec.core.url_to_fs(folder)
    fs.makedirs(path, exist_ok=True)
    context = _float32_values(artifact.context)
    record = {
        "format": FORMAT,
        "id": artifact.id,
        "content_hash": artifact.content_hash,
        "model": artifact.model,
        "revision": artifact.revision,
        "token_indices": [int(i) for i in artifact.token_indices],
        "num_tokens": int(context.shape[0]),
        "context_width": int(context.shape[1]),
        "settings": artifact.settings,
        "images": artifact.images,
        "loss_history": [float(value) for value in artifact.loss_history],
    }
    for name, data in {CONTEXT_FILE: save_safetensors({"context": context}), **files}.items():
        fs.pipe_file(posixpath.join(path, name), data)
    fs.pipe_file(posixpath.join(path, ARTIFACT_FILE), json.dumps(record, indent=2).encode())
    return folder


def load_artifact(folder: str) -> KeypointArtifact:
    """Read an artifact folder, the context as a float32 torch tensor; checks it as ``check_artifact`` does."""
    import torch

    artifact = check_artifact(folder)
    return replace(artifact, context=torch.from_numpy(artifact.context))


def check_artifact(folder: str) -> KeypointArtifact:
    """Read an artifact folder without torch, the context as float32 numpy; checks that the context and
    indices still match the recorded hash."""
    fs, path = fsspec.core.url_to_fs(folder)
    record_path = posixpath.join(path, ARTIFACT_FILE)
    if not fs.exists(record_path):
        raise FileNotFoundError(
            f"{folder!r} is not a keypoint artifact: it has no {ARTIFACT_FILE} "
            "(point at the folder the discovery job printed)"
        )
    record = json.loads(fs.cat_file(record_path))
    if record.get("format") != FORMAT:
        raise ValueError(f"{record_path!r} has format {record.get('format')!r}; this version reads {FORMAT!r}")
    context = _read_context(fs, posixpath.join(path, CONTEXT_FILE), folder)
    artifact = KeypointArtifact(
        context=context,
        token_indices=record["token_indices"],
        model=record["model"],
        revision=record.get("revision"),
        settings=record.get("settings", {}),
        loss_history=record.get("loss_history", []),
        images=record.get("images", {}),
    )
    if artifact.content_hash != record["content_hash"]:
        raise ValueError(
            f"the artifact at {folder!r} is damaged: its context and indices hash to {artifact.content_hash}, "
            f"but {ARTIFACT_FILE} records {record['content_hash']}"
        )
    return artifact


def _float32_values(context) -> np.ndarray:
    """A torch tensor's or an array's values as contiguous little-endian float32 numpy, on the CPU."""
    if hasattr(context, "detach"):
        context = context.detach().cpu().float().numpy()
    return np.ascontiguousarray(context, dtype="<f4")


def _read_context(fs, context_path: str, folder: str) -> np.ndarray:
    """The context tensor of ``context.safetensors``; a missing or damaged file is named in the error."""
    try:
        data = fs.cat_file(context_path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the artifact at {folder!r} is damaged: {context_path} is missing; copy the whole artifact folder again"
        ) from None
    try:
        return load_safetensors(data)["context"]
    except Exception as error:  # safetensors raises its own error types for garbage bytes; KeyError for no key
        raise ValueError(
            f"the artifact at {folder!r} is damaged: {context_path} is not a safetensors file with a 'context' "
            f"tensor ({type(error).__name__}: {error}); copy the whole artifact folder again"
        ) from None


def _check_indices(indices: list[int], num_tokens: int, folder: str) -> None:
    array = np.asarray(indices)
    if array.ndim != 1 or len(array) == 0 or array.min() < 0 or array.max() >= num_tokens:
        raise ValueError(f"artifact for {folder!r}: token indices {indices} must be 1-D within 0..{num_tokens - 1}")
