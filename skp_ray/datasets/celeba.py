"""CelebA with the MAFL train/test split: aligned (``celeba_aligned``) and in the wild (``celeba_wild``).

Landmark and box rows are matched to images by line order (image ``k.jpg`` is the k-th row after
the two header lines), as the published loaders do, not by the name written on the line. Images
are stretched to the model size, so there is no crop; landmarks are normalised by the image size.
"""

from __future__ import annotations

import os

import pyarrow as pa

from skp_ray.datasets.manifest import DatasetError, image_size, manifest_table, read_lines, require_file

__all__ = ["build_celeba_aligned", "build_celeba_wild"]

LANDMARK_COUNT = 5
MIN_BOX_FRACTION = 0.3  # wild images whose face box covers less of the image than this are dropped
SPLIT_FILES = (("train", "MAFL/training.txt"), ("test", "MAFL/testing.txt"))


def build_celeba_aligned(root: str, *, seed: int = 0, workdir: str | None = None) -> pa.Table:
    landmarks = _read_numbers_table(os.path.join(root, "Anno/list_landmarks_align_celeba.txt"), 2 * LANDMARK_COUNT)
    rows = _rows(root, landmarks, boxes=None, image_pattern="Img/img_align_celeba_png/{:06d}.png")
    return manifest_table(rows, "celeba_aligned")


def build_celeba_wild(root: str, *, seed: int = 0, workdir: str | None = None) -> pa.Table:
    landmarks = _read_numbers_table(os.path.join(root, "Anno/list_landmarks_celeba.txt"), 2 * LANDMARK_COUNT)
    boxes = _read_numbers_table(os.path.join(root, "Anno/list_bbox_celeba.txt"), 4)
    rows = _rows(root, landmarks, boxes=boxes, image_pattern="Img/img_celeba/{:06d}.jpg")
    return manifest_table(rows, "celeba_wild")


def _rows(root: str, landmarks: list[list[float]], boxes: list[list[float]] | None, image_pattern: str) -> list[dict]:
    rows = []
    for split, split_file in SPLIT_FILES:
        for name, index in _read_split(os.path.join(root, split_file), len(landmarks)):
            uri = os.path.abspath(os.path.join(root, image_pattern.format(index + 1)))
            width, height = image_size(uri)
            if boxes is not None and _box_too_small(boxes[index], width, height):
                continue
            values = landmarks[index]
            points = [[values[2 * j] / width, values[2 * j + 1] / height] for j in range(LANDMARK_COUNT)]
            rows.append(
                {"uri": uri, "key": name, "split": split, "landmarks_xy": points, "visible": [True] * LANDMARK_COUNT}
            )
    return rows


def _box_too_small(box: list[float], image_width: int, image_height: int) -> bool:
    _, _, box_width, box_height = box
    return box_width * box_height < MIN_BOX_FRACTION * image_width * image_height


def _read_split(path: str, row_count: int) -> list[tuple[str, int]]:
    """(file name, 0-based image index) for each line of a MAFL split file."""
    require_file(path, "a MAFL split file with one image name (e.g. 000123.jpg) per line")
    entries = []
    with open(path) as f:
        for line_number, line in enumerate(f, start=1):
            name = line.strip()
            if not name:
                continue
            stem = name.split(".")[0]
            if not stem.isdigit() or not 1 <= int(stem) <= row_count:
                raise DatasetError(
                    f"{path}, line {line_number}: {name!r}; expected an image name like 000123.jpg "
                    f"numbered 1..{row_count} (the rows of the annotation files)"
                )
            entries.append((name, int(stem) - 1))
    return entries


def _read_numbers_table(path: str, value_count: int) -> list[list[float]]:
    """The rows of a CelebA annotation file: a count line, a column-name line, then ``name v1 ... vN`` lines."""
    lines = read_lines(path, f"a CelebA annotation file (count line, header line, then name and {value_count} numbers)")
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DatasetError(f"{path}, line 1: expected the number of images, then a line of column names")
    rows = [_parse_numbers_line(path, line_number, line, value_count) for line_number, line in enumerate(lines[2:], 3)]
    declared = int(lines[0])
    if declared != len(rows):
        raise DatasetError(f"{path}, line 1: declares {declared} images but {len(rows)} rows follow; expected equal")
    return rows


def _parse_numbers_line(path: str, line_number: int, line: str, value_count: int) -> list[float]:
    fields = line.split()
    expected = f"expected an image name and {value_count} numbers"
    if len(fields) != value_count + 1:
        raise DatasetError(f"{path}, line {line_number}: {len(fields)} fields; {expected}")
    try:
        return [float(v) for v in fields[1:]]
    except ValueError:
        raise DatasetError(f"{path}, line {line_number}: {line.strip()!r} has a non-number; {expected}") from None
