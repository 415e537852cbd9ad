"""CUB-200-2011 birds: the aligned HDF5 release (``cub_aligned``) and the CMR layout (``cub_001`` ... ``cub_all``).

In the CMR layout each bird is cropped to its box, padded by 5% on each side and squared, the
same way for train and test (no jitter, no mirroring).
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pyarrow as pa
import scipy.io
from PIL import Image

from skp_ray.datasets.manifest import DatasetError, manifest_table, require_file

__all__ = ["build_cub_aligned", "build_cub_class", "cub_crop_box"]

BOX_PADDING = 0.05
SPLITS = ("train", "test")


def build_cub_aligned(root: str, *, seed: int = 0, workdir: str | None = None) -> pa.Table:
    """Images live inside ``cub.h5``; they are written as PNG under ``{workdir}/cub_aligned/{split}/``.

    The file stores keypoints as normalised (y, x); the manifest holds them as (x, y).
    """
    if workdir is None:
        raise ValueError("cub_aligned stores its images inside cub.h5; pass workdir= to write them as PNG files")
    path = require_file(os.path.join(root, "cub.h5"), "the aligned CUB HDF5 file with train_img/train_kp/train_vis")
    rows = []
    with h5py.File(path, "r") as f:
        for split in SPLITS:
            images, points, visible = _read_aligned_split(f, path, split)
            folder = os.path.join(workdir, "cub_aligned", split)
            os.makedirs(folder, exist_ok=True)
            for index in range(images.shape[0]):
                uri = os.path.abspath(os.path.join(folder, f"{index:05d}.png"))
                Image.fromarray(np.ascontiguousarray(images[index].transpose(1, 2, 0))).save(uri)
                is_visible = visible[index] > 0
                xy = np.where(is_visible[:, None], points[index, :, ::-1].astype(np.float64), np.nan)
                rows.append(
                    {
                        "uri": uri,
                        "key": f"{split}/{index:05d}",
                        "split": split,
                        "landmarks_xy": xy,
                        "visible": is_visible,
                    }
                )
    return manifest_table(rows, "cub_aligned")


def _read_aligned_split(f: h5py.File, path: str, split: str) -> tuple[h5py.Dataset, np.ndarray, np.ndarray]:
    """The split's images (left on disk, read one at a time), keypoints (y, x) and visibility."""
    for name in (f"{split}_img", f"{split}_kp", f"{split}_vis"):
        if name not in f:
            raise DatasetError(f"{path}: dataset {name!r} is missing; expected {split}_img, {split}_kp, {split}_vis")
    images, points, visible = f[f"{split}_img"], f[f"{split}_kp"][()], f[f"{split}_vis"][()]
    count = images.shape[0]
    shapes_ok = (
        images.ndim == 4
        and images.shape[1] == 3
        and images.dtype == np.uint8
        and points.ndim == 3
        and points.shape[0] == count
        and points.shape[2] == 2
        and visible.shape == points.shape[:2]
    )
    if not shapes_ok:
        raise DatasetError(
            f"{path}: {split} shapes img {images.shape} {images.dtype}, kp {points.shape}, vis {visible.shape}; "
            "expected img [N,3,H,W] uint8, kp [N,K,2], vis [N,K]"
        )
    return images, points, visible


def build_cub_class(class_id: int | None, name: str):
    """The builder for one CUB class (``class_id`` 1..200) or all classes (None), in the CMR layout."""

    def build(root: str, *, seed: int = 0, workdir: str | None = None) -> pa.Table:
        rows = []
        for split in SPLITS:
            rows.extend(_cmr_rows(root, split, class_id))
        return manifest_table(rows, name)

    build.__name__ = f"build_{name}"
    return build


def cub_crop_box(x1: float, y1: float, x2: float, y2: float) -> list[int]:
    """Square crop [left, top, right, bottom) around a 1-based inclusive box, padded by 5% per side."""
    box = [x1 - 1, y1 - 1, x2 - 1, y2 - 1]  # 0-based inclusive
    box_width = box[2] - box[0] + 1
    box_height = box[3] - box[1] + 1
    box = [
        box[0] - BOX_PADDING * box_width,
        box[1] - BOX_PADDING * box_height,
        box[2] + BOX_PADDING * box_width,
        box[3] + BOX_PADDING * box_height,
    ]
    left, top, right, bottom = (int(round(c)) for c in box)
    width, height = right - left + 1, bottom - top + 1
    side = max(width, height)
    left -= int(round((side - width) / 2))
    top -= int(round((side - height) / 2))
    return [left, top, left + side, top + side]


def _cmr_rows(root: str, split: str, class_id: int | None) -> list[dict]:
    base = os.path.join(root, "CUB_200_2011")
    annotation_path = os.path.join(base, f"cachedir/cub/data/{split}_cub_cleaned.mat")
    images = _load_mat_array(annotation_path, "images", "CMR CUB annotations (struct array 'images')")
    sfm_path = os.path.join(base, f"cachedir/cub/sfm/anno_{split}.mat")
    sfm = _load_mat_array(sfm_path, "sfm_anno", "CMR CUB structure-from-motion annotations ('sfm_anno')")
    if len(sfm) != len(images):
        raise DatasetError(
            f"{sfm_path}: {len(sfm)} entries but {annotation_path} has {len(images)}; expected the same count"
        )
    rows = []
    for position, record in enumerate(images):
        where = f"{annotation_path}, images[{position}]"
        rel_path, box, parts = _record_fields(record, where)
        if class_id is not None and _class_of(rel_path, where) != class_id:
            continue
        crop_box = cub_crop_box(*box)
        uri = os.path.abspath(os.path.join(base, "images", rel_path))
        require_file(uri, f"the CUB image named by {where}")
        xy, visible = _normalised_parts(parts, crop_box)
        rows.append(
            {"uri": uri, "key": rel_path, "split": split, "crop_box": crop_box, "landmarks_xy": xy, "visible": visible}
        )
    return rows


def _load_mat_array(path: str, variable: str, what: str) -> np.ndarray:
    require_file(path, what)
    try:
        contents = scipy.io.loadmat(path, struct_as_record=False, squeeze_me=True)
    except Exception as error:  # scipy raises several types for a corrupt file
        raise DatasetError(f"{path}: cannot read the .mat file ({error}); expected {what}") from error
    if variable not in contents:
        raise DatasetError(f"{path}: variable {variable!r} is missing; expected {what}")
    # squeeze_me turns a one-element array into the element itself
    return np.atleast_1d(contents[variable])


def _record_fields(record, where: str):
    try:
        rel_path, parts = str(record.rel_path), np.asarray(record.parts, dtype=np.float64)
        box = [float(record.bbox.x1), float(record.bbox.y1), float(record.bbox.x2), float(record.bbox.y2)]
    except AttributeError as error:
        raise DatasetError(f"{where}: {error}; expected fields rel_path, bbox (x1, y1, x2, y2), parts") from None
    if parts.ndim != 2 or parts.shape[0] != 3:
        raise DatasetError(f"{where}: parts has shape {parts.shape}; expected [3, K] (x, y, visibility)")
    return rel_path, box, parts


def _class_of(rel_path: str, where: str) -> int:
    prefix = rel_path.split(".")[0]
    if not prefix.isdigit():
        raise DatasetError(f"{where}: rel_path {rel_path!r}; expected '<class number>.<class name>/<file>'")
    return int(prefix)


def _normalised_parts(parts: np.ndarray, crop_box: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Part positions (1-based pixels) -> (x, y) in [0, 1] of the square crop; NaN where invisible."""
    left, top, right, _ = crop_box
    side = right - left
    visible = parts[2] > 0
    x = (parts[0] - 1 - left) / side
    y = (parts[1] - 1 - top) / side
    xy = np.stack([x, y], axis=1)
    xy[~visible] = np.nan
    return xy, visible
