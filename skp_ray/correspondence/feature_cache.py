"""Tensors kept between pairs and between runs, as safetensors files on any fsspec store: per-image
feature maps (``FeatureCache``, DIFT) here, and, on the same base, per-point contexts
(``skp_ray.correspondence.context_store``, LDM correspondence).

Layout: ``<root>/<settings hash>/<key>.safetensors``, where the settings hash
covers everything that changes what is stored. For features: method, model,
revision, UNet weights, timestep, block, ensemble, image size, seed, noise,
precision; the image key covers the image's URI and its prompt. Each feature
file holds one tensor ``features`` [C, h, w] and, as metadata, the URI, the
prompt, the original image size and the decoded image's content hash.
``settings.json`` beside the files records the settings in full, for a person.

Files are written whole (to a temporary name, then moved, on a local disk;
object stores publish an object only once it is complete), so a killed run
never leaves a half file that a rerun would trust.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec

from skp_ray.images import is_local_filesystem

if TYPE_CHECKING:
    import torch

# The precisions features can be stored in. The stores import torch only to read and write tensors, in the
# actors: the driver lists, checks and names them without it.
STORAGE_DTYPES = ("float32", "float16")
SETTINGS_FILE = "settings.json"
SUFFIX = ".safetensors"


def settings_hash(settings: dict) -> str:
    """16 hex digits of the sha256 of the settings as sorted JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def image_key(uri: str, prompt: str) -> str:
    """32 hex digits naming one image's features under one prompt."""
    return hashlib.sha256(f"{uri}\0{prompt}".encode()).hexdigest()[:32]


class TensorStore:
    """The folder of one settings hash under ``root`` (a local folder or an fsspec URI): one safetensors
    file of named tensors and text metadata per key. Subclasses say what a file holds."""

    noun = "stored tensors"  # for messages: "no <noun> at <path>"
    key_name = "key"

    def __init__(self, root: str, settings: dict):
        self.settings = dict(settings)
        self.hash = settings_hash(self.settings)
        self.fs, base = fsspec.core.url_to_fs(root)
        self.folder = posixpath.join(base, self.hash)
        self.location = f"{root.rstrip('/')}/{self.hash}"

    def path(self, key: str) -> str:
        return posixpath.join(self.folder, f"{key}{SUFFIX}")

    def prepare(self) -> None:
        """Make the folder and write ``settings.json`` (on the driver, before any worker writes)."""
        self.fs.makedirs(self.folder, exist_ok=True)
        self.fs.pipe_file(posixpath.join(self.folder, SETTINGS_FILE), json.dumps(self.settings, indent=2).encode())

    def cached_keys(self) -> set[str]:
        """The stored keys (one listing of the folder)."""
        if not self.fs.exists(self.folder):
            return set()
        self.fs.invalidate_cache(self.folder)
        names = (posixpath.basename(path) for path in self.fs.ls(self.folder, detail=False))
        return {name[: -len(SUFFIX)] for name in names if name.endswith(SUFFIX)}

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def metadata(self, key: str) -> dict[str, str]:
        """A file's metadata, read from its header alone."""
        try:
            with self.fs.open(self.path(key), "rb") as file:
                length = int.from_bytes(file.read(8), "little")
                return json.loads(file.read(length)).get("__metadata__", {})
        except FileNotFoundError:
            raise self._not_found(key) from None

    def _write(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        from safetensors.torch import save as save_safetensors

        data = save_safetensors({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, metadata=metadata)
        target = self.path(key)
        if is_local_filesystem(self.fs):
            staging = posixpath.join(self.folder, f".{key}-{uuid.uuid4().hex[:8]}.tmp")
            self.fs.pipe_file(staging, data)
            self.fs.mv(staging, target)
        else:
            self.fs.pipe_file(target, data)

    def _read(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The file's tensors and metadata; FileNotFoundError naming the file when it is not there."""
        from safetensors.torch import load as load_safetensors

        try:
            data = self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            raise self._not_found(key) from None
        return load_safetensors(data), _safetensors_metadata(data)

    def _not_found(self, key: str) -> FileNotFoundError:
        return FileNotFoundError(f"no {self.noun} at {self.path(key)} ({self.key_name} {key})")


@dataclass(frozen=True)
class CachedFeatures:
    features: torch.Tensor  # [C, h, w] as stored (float32 or float16)
    uri: str
    prompt: str
    height: int  # of the original image
    width: int
    content_hash: str


class FeatureCache(TensorStore):
    """The feature maps of one settings hash, one file per (image, prompt)."""

    noun = "cached features"
    key_name = "image key"

    def __init__(self, root: str, settings: dict, *, storage_dtype: str = "float32"):
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"feature storage dtype {storage_dtype!r} is not one of {sorted(STORAGE_DTYPES)}")
        super().__init__(root, dict(settings, storage_dtype=storage_dtype))
        self.storage_dtype = storage_dtype

    def save(self, key: str, features: torch.Tensor, *, uri: str, prompt: str, height: int, width: int, content_hash: str):
        import torch

        metadata = {"uri": uri, "prompt": prompt, "height": str(height), "width": str(width), "content_hash": content_hash}
        self._write(key, {"features": features.to(dtype=getattr(torch, self.storage_dtype))}, metadata)

    def load(self, key: str) -> CachedFeatures:
        """The stored features; FileNotFoundError naming the file when they are not there."""
        tensors, metadata = self._read(key)
        return CachedFeatures(
            features=tensors["features"],
            uri=metadata["uri"],
            prompt=metadata["prompt"],
            height=int(metadata["height"]),
            width=int(metadata["width"]),
            content_hash=metadata["content_hash"],
        )


def _safetensors_metadata(data: bytes) -> dict:
    # safetensors' header: 8 bytes little-endian length, then JSON with "__metadata__".
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__", {})
