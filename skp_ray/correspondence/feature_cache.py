"""Per-image feature maps kept between pairs and between runs, as safetensors files on any fsspec store.

Layout: ``<root>/<settings hash>/<image key>.safetensors``, where the settings
hash covers everything that changes a feature (method, model, revision, UNet
weights, timestep, block, ensemble, image size, seed, noise, precision) and
the image key covers the image's URI and its prompt. Each file holds one
tensor ``features`` [C, h, w] and, as metadata, the URI, the prompt, the
original image size and the decoded image's content hash. ``settings.json``
beside the files records the settings in full, for a person.

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

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from skp_ray.images import is_local_filesystem

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
SETTINGS_FILE = "settings.json"


def settings_hash(settings: dict) -> str:
    """16 hex digits of the sha256 of the settings as sorted JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def image_key(uri: str, prompt: str) -> str:
    """32 hex digits naming one image's features under one prompt."""
    return hashlib.sha256(f"{uri}\0{prompt}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CachedFeatures:
    features: torch.Tensor  # [C, h, w] as stored (float32 or float16)
    uri: str
    prompt: str
    height: int  # of the original image
    width: int
    content_hash: str


class FeatureCache:
    """The cache folder of one settings hash under ``root`` (a local folder or an fsspec URI)."""

    def __init__(self, root: str, settings: dict, *, storage_dtype: str = "float32"):
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"feature storage dtype {storage_dtype!r} is not one of {sorted(STORAGE_DTYPES)}")
        self.settings = dict(settings, storage_dtype=storage_dtype)
        self.hash = settings_hash(self.settings)
        self.storage_dtype = STORAGE_DTYPES[storage_dtype]
        self.fs, base = fsspec.core.url_to_fs(root)
        self.folder = posixpath.join(base, self.hash)
        self.location = f"{root.rstrip('/')}/{self.hash}"

    def path(self, key: str) -> str:
        return posixpath.join(self.folder, f"{key}.safetensors")

    def prepare(self) -> None:
        """Make the folder and write ``settings.json`` (on the driver, before any worker writes)."""
        self.fs.makedirs(self.folder, exist_ok=True)
        self.fs.pipe_file(posixpath.join(self.folder, SETTINGS_FILE), json.dumps(self.settings, indent=2).encode())

    def cached_keys(self) -> set[str]:
        """Keys of the images whose features are stored (one listing of the folder)."""
        if not self.fs.exists(self.folder):
            return set()
        self.fs.invalidate_cache(self.folder)
        names = (posixpath.basename(path) for path in self.fs.ls(self.folder, detail=False))
        return {name[: -len(".safetensors")] for name in names if name.endswith(".safetensors")}

    def save(self, key: str, features: torch.Tensor, *, uri: str, prompt: str, height: int, width: int, content_hash: str):
        metadata = {"uri": uri, "prompt": prompt, "height": str(height), "width": str(width), "content_hash": content_hash}
        tensor = features.detach().to(device="cpu", dtype=self.storage_dtype).contiguous()
        data = save_safetensors({"features": tensor}, metadata=metadata)
        target = self.path(key)
        if is_local_filesystem(self.fs):
            staging = posixpath.join(self.folder, f".{key}-{uuid.uuid4().hex[:8]}.tmp")
            self.fs.pipe_file(staging, data)
            self.fs.mv(staging, target)
        else:
            self.fs.pipe_file(target, data)

    def load(self, key: str) -> CachedFeatures:
        """The stored features; FileNotFoundError naming the file when they are not there."""
        path = self.path(key)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"no cached features at {path} (image key {key})") from None
        metadata = _safetensors_metadata(data)
        return CachedFeatures(
            features=load_safetensors(data)["features"],
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
