"""Tai-Chi-HD at 256 pixels (``taichi``): landmark pickles from the published evaluation."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa

from skp_ray.datasets.manifest import DatasetError, manifest_table, require_file

__all__ = ["build_taichi"]

PIXELS = 256  # the landmarks are in 256-pixel units whatever the image size
SPLITS = ("train", "test")


def build_taichi(root: str, *, seed: int = 0, workdir: str | None = None) -> pa.Table:
    rows = []
    for split in SPLITS:
        pickle_path = os.path.join(root, f"landmark/taichi_{split}_gt.pkl")
        annotations = _read_pickle(pickle_path)
        for position, (file_name, value) in enumerate(zip(annotations["file_name"], annotations["value"])):
            uri = os.path.abspath(os.path.join(root, "eval_images/taichi-256", split, file_name))
            require_file(uri, f"the Tai-Chi image of row {position} of {pickle_path}")
            points = np.asarray(value, dtype=np.float64)
            if points.ndim != 2 or points.shape[1] != 2:
                raise DatasetError(
                    f"{pickle_path}, row {position}: value has shape "
                    f"{points.shape}; expected [K, 2] (x, y) in 256 pixels"
                )
            # an unannotated joint is stored at 0 (or below)
            visible = (points[:, 0] > 0) & (points[:, 1] > 0)
            xy = np.where(visible[:, None], points / PIXELS, np.nan)
            rows.append(
                {"uri": uri, "key": f"{split}/{file_name}", "split": split, "landmarks_xy": xy, "visible": visible}
            )
    return manifest_table(rows, "taichi")


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
