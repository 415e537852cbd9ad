"""DeepFashion in-shop subset (``deepfashion``): CSV file lists paired by position with JSON keypoints."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa

from skp_ray.datasets.manifest import DatasetError, manifest_table, read_lines, require_file

__all__ = ["build_deepfashion"]

PIXELS = 256  # keypoints are in 256-pixel units
SPLITS = ("train", "test")


def build_deepfashion(root: str, *, seed: int = 0, workdir: str | None = None) -> pa.Table:
    rows = []
    for split in SPLITS:
        csv_path = os.path.join(root, f"data_{split}.csv")
        json_path = os.path.join(root, f"data_{split}.json")
        file_names = _read_file_names(csv_path)
        keypoints = _read_keypoints(json_path)
        if len(file_names) != len(keypoints):
            raise DatasetError(
                f"{csv_path} lists {len(file_names)} images but {json_path} has {len(keypoints)} keypoint entries; "
                "expected one entry per CSV row, in the same order"
            )
        for file_name, points in zip(file_names, keypoints):
            uri = os.path.abspath(os.path.join(root, "img", file_name))
            require_file(uri, f"the DeepFashion image listed in {csv_path}")
            rows.append(
                {
                    "uri": uri,
                    "key": file_name,
                    "split": split,
                    "landmarks_xy": points / PIXELS,
                    "visible": [True] * len(points),
                }
            )
    return manifest_table(rows, "deepfashion")


def _read_file_names(path: str) -> list[str]:
    """The second comma-separated field of every line after the header."""
    lines = read_lines(path, "a CSV file with a header line, then one row per image, file name in the second field")
    names = []
    for line_number, line in enumerate(lines[1:], start=2):
        fields = line.split(",")
        if len(fields) < 2 or not fields[1].strip():
            raise DatasetError(f"{path}, line {line_number}: {line!r}; expected the file name in the second field")
        names.append(fields[1].strip())
    return names


def _read_keypoints(path: str) -> list[np.ndarray]:
    expected = "a JSON list whose elements have 'keypoints' [K][2] (x, y) in 256 pixels"
    require_file(path, expected)
    try:
        with open(path) as f:
            entries = json.load(f)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}, line {error.lineno}: invalid JSON ({error.msg}); expected {expected}") from None
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: top level is {type(entries).__name__}; expected {expected}")
    keypoints = []
    for position, entry in enumerate(entries):
        try:
            points = np.asarray(entry["keypoints"], dtype=np.float64)
        except (TypeError, KeyError, ValueError):
            points = None
        if points is None or points.ndim != 2 or points.shape[1] != 2:
            raise DatasetError(f"{path}: element {position} has no usable 'keypoints'; expected {expected}")
        keypoints.append(points)
    return keypoints
