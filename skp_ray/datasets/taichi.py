"""Tai-Chi-HD at 256 pixels (``taichi``): the video frames and the landmark pickles of the published evaluation.

The published code learns the keypoints (optimisation and token selection) from the frames under
``<root>/train/`` and fits its regressor on separate annotated images. The manifest keeps them apart:

- ``train``: every image under ``<root>/train/`` (recursively, sorted), without ground truth;
  ``--split train`` learns from these;
- ``regression_train``: ``eval_images/taichi-256/train/`` with ``landmark/taichi_train_gt.pkl``,
  where the regressor is fitted;
- ``test``: ``eval_images/taichi-256/test/`` with ``landmark/taichi_test_gt.pkl``.

Keys are paths relative to ``root``. Without a ``train/`` folder (only evaluating an artifact
learned elsewhere) the manifest has no ``train`` rows.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa

from skp_ray.datasets.manifest import DatasetError, manifest_table, require_file
from skp_ray.images import list_images

__all__ = ["FIT_SPLIT", "build_taichi"]

PIXELS = 256  # the landmarks are in 256-pixel units whatever the image size
FIT_SPLIT = "regression_train"
# manifest split -> the published annotation split (pickle and eval_images folder)
ANNOTATED_SPLITS = {FIT_SPLIT: "train", "test": "test"}


def build_taichi(root: str, *, seed: int = 0, workdir: str | None = None) -> pa.Table:
    rows = _frame_rows(root)
    for split, published_split in ANNOTATED_SPLITS.items():
        rows.extend(_annotated_rows(root, split, published_split))
    return manifest_table(rows, "taichi")


def _frame_rows(root: str) -> list[dict]:
    """The training frames (no ground truth), if the layout has them."""
    folder = os.path.join(root, "train")
    if not os.path.isdir(folder):
        return []
    uris = [os.path.abspath(uri) for uri in list_images(folder)]
    return [{"uri": uri, "key": _relative_key(root, uri), "split": "train"} for uri in uris]


def _annotated_rows(root: str, split: str, published_split: str) -> list[dict]:
    pickle_path = os.path.join(root, f"landmark/taichi_{published_split}_gt.pkl")
    annotations = _read_pickle(pickle_path)
    rows = []
    for position, (file_name, value) in enumerate(zip(annotations["file_name"], annotations["value"])):
        uri = os.path.abspath(os.path.join(root, "eval_images/taichi-256", published_split, file_name))
        require_file(uri, f"the Tai-Chi image of row {position} of {pickle_path}")
        points = np.asarray(value, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 2:
            raise DatasetError(
                f"{pickle_path}, row {position}: value has shape {points.shape}; expected [K, 2] (x, y) in 256 pixels"
            )
        # an unannotated joint is stored at 0 (or below)
        visible = (points[:, 0] > 0) & (points[:, 1] > 0)
        xy = np.where(visible[:, None], points / PIXELS, np.nan)
        rows.append(
            {"uri": uri, "key": _relative_key(root, uri), "split": split, "landmarks_xy": xy, "visible": visible}
        )
    return rows


def _relative_key(root: str, uri: str) -> str:
    return os.path.relpath(uri, os.path.abspath(root)).replace(os.sep, "/")


def _read_pickle(path: str) -> pd.DataFrame:
    expected = "a pandas DataFrame pickle with columns file_name and value"
    require_file(path, expected)
    try:
        frame = pd.read_pickle(path)
    except Exception as error:  # unpickling can fail in many ways
        raise DatasetError(f"{path}: cannot unpickle ({error}); expected {expected}") from error
    if not isinstance(frame, pd.DataFrame) or not {"file_name", "value"} <= set(frame.columns):
        raise DatasetError(f"{path}: got {type(frame).__name__} without the needed columns; expected {expected}")
    return frame
