"""Your own images (``custom``, no ground truth) and the bundled cartoon faces (``samples``)."""

from __future__ import annotations

import json
import math
import os
import posixpath

import fsspec
import pyarrow as pa

from skp_ray.datasets.manifest import DatasetError, manifest_table
from skp_ray.images import absolute_uri, join_uri, list_images

__all__ = ["build_custom", "build_samples"]

TEST_FRACTION = 0.25  # samples: the last quarter of the sorted file names is the test split


def build_custom(root: str, *, seed: int = 0, workdir: str | None = None) -> pa.Table:
    """Every image under ``root`` (local folder or fsspec URL), split "all", no ground truth."""
    root = os.fspath(root)
    fs, base = fsspec.core.url_to_fs(root)
    base_is_folder = fs.isdir(base)
    rows = []
    for uri in list_images(root):
        rows.append({"uri": uri, "key": _relative_key(uri, base) if base_is_folder else uri, "split": "all"})
    return manifest_table(rows, "custom")


def _relative_key(uri: str, base: str) -> str:
    _, path = fsspec.core.url_to_fs(uri)
    return posixpath.relpath(path, base)


def build_samples(root: str, *, seed: int = 0, workdir: str | None = None) -> pa.Table:
    """The layout of ``skp_ray.samples.write_sample_images``: PNGs plus ``landmarks.json`` ((y, x) per file)."""
    root = absolute_uri(os.fspath(root))
    landmarks_path = join_uri(root, "landmarks.json")
    table = _read_sample_landmarks(landmarks_path)
    names = sorted(table)
    test_count = max(1, math.ceil(len(names) * TEST_FRACTION))
    fs, _ = fsspec.core.url_to_fs(root)
    rows = []
    for position, name in enumerate(names):
        uri = join_uri(root, name)
        if not fs.isfile(fsspec.core.url_to_fs(uri)[1]):
            raise DatasetError(f"{uri}: missing file; expected the image listed in {landmarks_path}")
        split = "test" if position >= len(names) - test_count else "train"
        points = table[name]
        rows.append(
            {
                "uri": uri,
                "key": name,
                "split": split,
                "landmarks_xy": [[x, y] for y, x in points],
                "visible": [True] * len(points),
            }
        )
    return manifest_table(rows, "samples")


def _read_sample_landmarks(path: str) -> dict[str, list[list[float]]]:
    expected = "a JSON object mapping each image file name to [[y, x], ...] normalised landmarks"
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.isfile(fs_path):
        raise DatasetError(f"{path}: missing file; expected {expected}")
    try:
        with fs.open(fs_path, "r") as f:
            table = json.load(f)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}, line {error.lineno}: invalid JSON ({error.msg}); expected {expected}") from None
    if not isinstance(table, dict) or not table:
        raise DatasetError(f"{path}: no entries; expected {expected}")
    for name, points in table.items():
        if not isinstance(points, list) or not all(isinstance(p, list) and len(p) == 2 for p in points):
            raise DatasetError(f"{path}: entry {name!r} is not [[y, x], ...]; expected {expected}")
    return table
