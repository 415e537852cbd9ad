"""The keypoint artifact: a learned context and its keypoint tokens, all that detection needs.

An artifact is a folder, local or at any fsspec URL (``s3://``, ``gs://``):

- ``context.safetensors``: the context [num_tokens, width], float32, under the key ``context``;
- ``artifact.json``: the token indices, the model id and revision, every
  discovery setting, the loss history, image counts and the content hash;
- anything else the writer adds beside them (discovery adds ``metrics.jsonl``,
  ``loss.png`` and ``keypoints.png``).

``artifact.json`` is written last, so a folder without it is not (yet) an
artifact. No pickle is involved anywhere. The content hash covers exactly what
detection uses (the context values and the token indices), so two artifacts
with the same hash give the same keypoints.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

FORMAT = "skp_ray.keypoint_artifact/1"
ARTIFACT_FILE = "artifact.json"
CONTEXT_FILE = "context.safetensors"


@dataclass
class KeypointArtifact:
    context: torch.Tensor  # [num_tokens, width]
    token_indices: list[int]  # the keypoint tokens, most often picked first
    model: str
    revision: str | None = None
    settings: dict = field(default_factory=dict)
    loss_history: list[float] = field(default_factory=list)
    images: dict = field(default_factory=dict)  # counts: used, skipped by cause, used for token selection

    @property
    def content_hash(self) -> str:
        return content_hash(self.context, self.token_indices)

    @property
    def id(self) -> str:
        """A short name for this artifact: the start of its content hash."""
        return self.content_hash.removeprefix("sha256:")[:16]


def content_hash(context: torch.Tensor, token_indices: list[int]) -> str:
    """sha256 over the context's shape and float32 little-endian values, then the indices as JSON."""
    values = context.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().astype("<f4")
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
    context = artifact.context.detach().to(device="cpu", dtype=torch.float32).contiguous()
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
    """Read an artifact folder; checks that the context and indices still match the recorded hash."""
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


def _read_context(fs, context_path: str, folder: str) -> torch.Tensor:
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
