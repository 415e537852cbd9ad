"""Human3.6M: the masked, pre-cropped release (``h36m``) and full frames with a jittered person crop
(``h36m_unaligned``).

Train subjects are S1, S5, S6, S7, S8, S9 and the test subject is S11. An action folder is taken when
its name starts with one of ``ACTIONS`` ("Walking" also takes "WalkingDog 1"). Rows are sorted by
(subject, folder, frame), never by directory listing order.
"""

from __future__ import annotations

import os
import re

import h5py
import numpy as np
import pyarrow as pa
import scipy.io

from skp_ray.datasets.manifest import DatasetError, image_size, manifest_table, require_file
from skp_ray.randomness import keyed_generator

__all__ = ["ACTIONS", "SUBJECT_SPLITS", "build_h36m", "build_h36m_unaligned", "unaligned_crop_box"]

SUBJECT_SPLITS = ((1, "train"), (5, "train"), (6, "train"), (7, "train"), (8, "train"), (9, "train"), (11, "test"))
ACTIONS = ("Directions", "Discussion", "Posing", "Waiting", "Greeting", "Walking")
MAX_MARGIN = 100  # pixels of context around the person in the unaligned crop
MAX_JITTER = 100  # the crop origin moves by an integer in [-100, 100)
UNALIGNED_FRAME_NAME = re.compile(r"img_(\d+)\.jpg")


def build_h36m(root: str, *, seed: int = 0, workdir: str | None = None) -> pa.Table:
    rows = []
    for subject, split in SUBJECT_SPLITS:
        subject_root = os.path.join(root, f"S{subject}")
        for folder in action_folders(os.path.join(subject_root, "WithBackground")):
            frame_folder = os.path.join(subject_root, "WithBackground", folder)
            for frame in _sorted_frames(frame_folder):
                uri = os.path.abspath(os.path.join(frame_folder, f"{frame}.jpg"))
                mask_uri = os.path.abspath(os.path.join(subject_root, "BackgroudMask", folder, f"{frame}.png"))
                require_file(mask_uri, f"the foreground mask of {uri}")
                yx = _read_keypoints(os.path.join(subject_root, "Landmarks", folder, f"{frame}.mat"))
                rows.append(
                    {
                        "uri": uri,
                        "key": f"S{subject}/{folder}/{frame}",
                        "split": split,
                        "mask_uri": mask_uri,
                        "landmarks_xy": yx[:, ::-1],
                        "visible": [True] * len(yx),
                    }
                )
    return manifest_table(rows, "h36m")


def build_h36m_unaligned(root: str, *, seed: int = 0, workdir: str | None = None) -> pa.Table:
    rows = []
    for subject, split in SUBJECT_SPLITS:
        subject_root = os.path.join(root, f"S{subject}")
        for folder in action_folders(subject_root):
            annotation_path = os.path.join(subject_root, folder, "annot.h5")
            poses = _AnnotationIndex(annotation_path)
            sequence_root = os.path.join(subject_root, folder, "imageSequence")
            for camera in _sorted_cameras(sequence_root):
                for frame, file_name in _sorted_unaligned_frames(os.path.join(sequence_root, camera)):
                    uri = os.path.abspath(os.path.join(sequence_root, camera, file_name))
                    key = f"S{subject}/{folder}/{camera}/{frame:06d}"
                    points = poses.points(int(camera), frame, uri)
                    rows.append(_unaligned_row(uri, key, split, points, seed))
    return manifest_table(rows, "h36m_unaligned")


def _unaligned_row(uri: str, key: str, split: str, points: np.ndarray, seed: int) -> dict:
    """The manifest row of one full frame: a jittered square crop around the pixel (x, y) ``points``."""
    import torch  # here, not above: the other adapters, and drivers that only name them, need no torch

    width, height = image_size(uri)
    generator = keyed_generator(seed, "h36m_unaligned", key)
    jitter = torch.randint(-MAX_JITTER, MAX_JITTER, (2,), generator=generator).tolist()
    box = unaligned_crop_box(points, width, height, jitter)
    xy = (points - [box[0], box[1]]) / [box[2] - box[0], box[3] - box[1]]
    visible = [True] * len(points)
    return {"uri": uri, "key": key, "split": split, "crop_box": box, "landmarks_xy": xy, "visible": visible}


def unaligned_crop_box(points: np.ndarray, width: int, height: int, jitter: list[int]) -> list[int]:
    """[left, top, right, bottom) around the pixel (x, y) ``points``: the person's bounding square plus a
    margin of up to 100 pixels, shifted by ``jitter`` (x, y) and clipped to the image."""
    x_min, y_min = points.min(axis=0)
    x_max, y_max = points.max(axis=0)
    person_width, person_height = x_max - x_min, y_max - y_min
    side = max(person_width, person_height)
    margin_x, margin_y = min(MAX_MARGIN, width - side), min(MAX_MARGIN, height - side)
    x0 = max(0, x_min - (side - person_width) / 2 - margin_x + jitter[0])
    y0 = max(0, y_min - (side - person_height) / 2 - margin_y + jitter[1])
    x1 = min(width, x0 + side + 2 * margin_x)
    y1 = min(height, y0 + side + 2 * margin_y)
    left, top = int(x0), int(y0)
    return [left, top, left + int(x1 - x0), top + int(y1 - y0)]


def action_folders(parent: str) -> list[str]:
    """Sorted names of the folders in ``parent`` whose name starts with one of ``ACTIONS``."""
    if not os.path.isdir(parent):
        raise DatasetError(f"{parent}: missing folder; expected the Human3.6M action folders of this subject")
    names = [name for name in os.listdir(parent) if os.path.isdir(os.path.join(parent, name))]
    return sorted(name for name in names if name.startswith(ACTIONS))


def _frame_sort_key(name: str) -> tuple:
    # numeric names sort by value, so unpadded "10" comes after "9"; equal to name order when zero-padded
    return (0, int(name), name) if name.isdigit() else (1, 0, name)


def _sorted_frames(folder: str) -> list[str]:
    """Frame names (file names without ``.jpg``) in ``folder``."""
    stems = [name[: -len(".jpg")] for name in os.listdir(folder) if name.endswith(".jpg")]
    return sorted(stems, key=_frame_sort_key)


def _sorted_cameras(sequence_root: str) -> list[str]:
    if not os.path.isdir(sequence_root):
        raise DatasetError(f"{sequence_root}: missing folder; expected one sub-folder per camera")
    cameras = [name for name in os.listdir(sequence_root) if os.path.isdir(os.path.join(sequence_root, name))]
    for camera in cameras:
        if not camera.isdigit():
            raise DatasetError(f"{os.path.join(sequence_root, camera)}: expected a camera folder named by its number")
    return sorted(cameras, key=int)


def _sorted_unaligned_frames(folder: str) -> list[tuple[int, str]]:
    """(frame number, file name) of the ``img_NNNNNN.jpg`` files in ``folder``, by frame number."""
    matches = (UNALIGNED_FRAME_NAME.fullmatch(name) for name in os.listdir(folder))
    return sorted((int(m.group(1)), m.group(0)) for m in matches if m)


def _read_keypoints(path: str) -> np.ndarray:
    """``keypoints_2d`` of a masked-release landmark file: [K, 2] normalised (y, x)."""
    expected = "a .mat file with keypoints_2d [K, 2], normalised (y, x)"
    require_file(path, expected)
    try:
        contents = scipy.io.loadmat(path)
    except Exception as error:  # scipy raises several types for a corrupt file
        raise DatasetError(f"{path}: cannot read ({error}); expected {expected}") from error
    points = np.asarray(contents.get("keypoints_2d", np.empty(0)), dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] == 0:
        raise DatasetError(f"{path}: keypoints_2d missing or of shape {points.shape}; expected {expected}")
    return points


class _AnnotationIndex:
    """Pixel (x, y) poses of one ``annot.h5``, looked up by (camera, frame)."""

    def __init__(self, path: str) -> None:
        expected = "an HDF5 file with camera [N], frame [N] and pose/2d [N, 32, 2]"
        require_file(path, expected)
        self.path = path
        with h5py.File(path, "r") as f:
            for name in ("camera", "frame", "pose/2d"):
                if name not in f:
                    raise DatasetError(f"{path}: dataset {name!r} is missing; expected {expected}")
            cameras, frames, self.poses = f["camera"][()], f["frame"][()], f["pose/2d"][()].astype(np.float64)
        count = len(cameras)
        if len(frames) != count or self.poses.ndim != 3 or self.poses.shape[0] != count or self.poses.shape[2] != 2:
            raise DatasetError(
                f"{path}: camera {cameras.shape}, frame {frames.shape}, pose/2d {self.poses.shape}; expected {expected}"
            )
        self.rows: dict[tuple[int, int], list[int]] = {}
        for row, (camera, frame) in enumerate(zip(cameras.tolist(), frames.tolist())):
            self.rows.setdefault((int(camera), int(frame)), []).append(row)

    def points(self, camera: int, frame: int, image_uri: str) -> np.ndarray:
        rows = self.rows.get((camera, frame), [])
        if len(rows) != 1:
            raise DatasetError(
                f"{self.path}: {len(rows)} rows with camera == {camera} and frame == {frame} (for {image_uri}); "
                "expected exactly one"
            )
        return self.poses[rows[0]]
