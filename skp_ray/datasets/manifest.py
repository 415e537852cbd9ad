"""The manifest: one row per image of a dataset, as a pyarrow Table, and the helpers the adapters share.

Columns (``MANIFEST_SCHEMA``):

- ``uri``: where the image is (absolute local path, or an fsspec URL for ``custom``);
- ``key``: dataset-relative id, unique within the manifest;
- ``split``: "train", "test", "all" or "regression_train" (Tai-Chi's annotated images for the
  regressor, apart from the "train" frames that keypoints are learned from);
- ``crop_box``: ``[left, top, right, bottom]`` in original-image pixels, right/bottom exclusive,
  possibly reaching outside the image; null = the whole image;
- ``mask_uri``: a foreground mask to multiply the image by, or null;
- ``landmarks_xy``: ``[M][2]`` ground truth (x, y) normalised to [0, 1] in the frame the model sees
  (the crop box if any, else the whole image), NaN where absent; null without ground truth;
- ``visible``: ``[M]`` booleans; null without ground truth.

The dataset name travels in the schema metadata under ``b"skp_ray.dataset"``.
"""

from __future__ import annotations

import math
import os
import posixpath

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DATASET_METADATA_KEY",
    "MANIFEST_SCHEMA",
    "SPLITS",
    "DatasetError",
    "image_size",
    "manifest_table",
    "read_lines",
    "read_manifest",
    "require_file",
    "write_manifest",
]

DATASET_METADATA_KEY = b"skp_ray.dataset"
SPLITS = ("train", "test", "all", "regression_train")

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("crop_box", pa.list_(pa.int64()), nullable=True),
        pa.field("mask_uri", pa.string(), nullable=True),
        pa.field("landmarks_xy", pa.list_(pa.list_(pa.float64())), nullable=True),
        pa.field("visible", pa.list_(pa.bool_()), nullable=True),
    ]
)

_OPTIONAL_COLUMNS = ("crop_box", "mask_uri", "landmarks_xy", "visible")


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file (and line) and what was expected."""


def require_file(path: str, what: str) -> str:
    """``path`` if it is an existing file, else a DatasetError saying which file ``what`` is missing."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: missing file; expected {what}")
    return path


def read_lines(path: str, what: str) -> list[str]:
    """The lines of the text file ``path`` (which must exist: ``what`` says what it should be), without
    trailing blank lines."""
    require_file(path, what)
    with open(path) as f:
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    require_file(path, "an image")
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"{path}: cannot read the image header ({error}); expected an image file") from error


def manifest_table(rows: list[dict], dataset: str) -> pa.Table:
    """Validate ``rows`` (dicts with the manifest columns; optional ones may be left out) into a manifest."""
    _check_rows(rows, dataset)
    columns = {field.name: [plain(row.get(field.name)) for row in rows] for field in MANIFEST_SCHEMA}
    schema = MANIFEST_SCHEMA.with_metadata({DATASET_METADATA_KEY: dataset.encode()})
    return pa.Table.from_pydict(columns, schema=schema)


def write_manifest(table: pa.Table, path: str | os.PathLike) -> None:
    """Write ``table`` as Parquet to a local path or an fsspec URL (parent folders are created)."""
    path = os.fspath(path)
    fs, fs_path = fsspec.core.url_to_fs(path)
    parent = posixpath.dirname(fs_path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(fs_path, "wb") as f:
        pq.write_table(table, f)


def read_manifest(path: str | os.PathLike) -> pa.Table:
    """Read a manifest written by ``write_manifest``, in ``MANIFEST_SCHEMA`` with its dataset metadata."""
    path = os.fspath(path)
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.isfile(fs_path):
        raise DatasetError(f"{path}: missing file; expected a Parquet manifest")
    with fs.open(fs_path, "rb") as f:
        table = pq.read_table(f)
    missing = [name for name in MANIFEST_SCHEMA.names if name not in table.column_names]
    if missing:
        raise DatasetError(
            f"{path}: not a manifest, columns {missing} are missing; expected columns {MANIFEST_SCHEMA.names}"
        )
    metadata = table.schema.metadata or {}
    table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    dataset = metadata.get(DATASET_METADATA_KEY)
    return table.replace_schema_metadata({DATASET_METADATA_KEY: dataset} if dataset is not None else None)


def plain(value):
    """numpy arrays and scalars -> Python lists and numbers, which pyarrow converts without surprises."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _check_rows(rows: list[dict], dataset: str) -> None:
    seen_keys: set[str] = set()
    landmark_count = None
    for row in rows:
        key = row.get("key")
        where = f"dataset {dataset!r}, key {key!r}"
        if not isinstance(key, str) or not isinstance(row.get("uri"), str):
            raise DatasetError(f"{where}: expected string 'uri' and 'key'")
        if key in seen_keys:
            raise DatasetError(f"{where}: duplicate key; expected keys unique within the manifest")
        seen_keys.add(key)
        if row.get("split") not in SPLITS:
            raise DatasetError(f"{where}: split {row.get('split')!r}; expected one of {SPLITS}")
        unknown = set(row) - set(MANIFEST_SCHEMA.names)
        if unknown:
            raise DatasetError(f"{where}: unknown fields {sorted(unknown)}; expected {MANIFEST_SCHEMA.names}")
        _check_crop_box(row.get("crop_box"), where)
        count = _check_landmarks(row.get("landmarks_xy"), row.get("visible"), where)
        if count is not None:
            if landmark_count is not None and count != landmark_count:
                raise DatasetError(f"{where}: {count} landmarks; expected {landmark_count} like the rows before")
            landmark_count = count


def _check_crop_box(box, where: str) -> None:
    if box is None:
        return
    box = plain(box)
    if len(box) != 4 or not all(isinstance(v, int) for v in box):
        raise DatasetError(f"{where}: crop_box {box}; expected 4 integers [left, top, right, bottom]")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise DatasetError(f"{where}: crop_box {box} is empty; expected right > left and bottom > top")


def _check_landmarks(landmarks, visible, where: str) -> int | None:
    """The number of landmarks M, or None when the row has no ground truth."""
    if landmarks is None and visible is None:
        return None
    if landmarks is None or visible is None:
        raise DatasetError(f"{where}: expected landmarks_xy and visible both set or both null")
    landmarks, visible = plain(landmarks), plain(visible)
    for point in landmarks:
        if len(point) != 2 or not all(isinstance(v, (int, float)) and not math.isinf(v) for v in point):
            raise DatasetError(f"{where}: landmark {point}; expected a pair of finite numbers or NaN")
    if len(visible) != len(landmarks):
        raise DatasetError(f"{where}: {len(visible)} visibility flags for {len(landmarks)} landmarks; expected equal")
    return len(landmarks)
