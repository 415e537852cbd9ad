"""From discovered keypoints to ground-truth landmarks: the linear regressors of SPEC 1.6.

Keypoints and landmarks are arrays [N, K, 2] and [N, M, 2] in [0, 1] (either
coordinate order, as long as both use the same). The regressor is a matrix W
[2K, 2M] on coordinates centred at 0.5, with no bias and no ridge:
``W = pinv(X^T X) X^T Y``; a prediction is ``(x - 0.5) W + 0.5``. All the
arithmetic is float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Human3.6M's left/right keypoint pairs (0-based), used to undo left/right confusions.
H36M_SWAP_PAIRS: tuple[tuple[int, int], ...] = (
    (1, 6), (2, 7), (3, 8), (4, 9), (5, 10),
    (17, 25), (18, 26), (19, 27), (20, 28), (21, 29), (22, 30), (23, 31),
)  # fmt: skip
# The published code's list, with (21, 28) for (21, 29): it drops 20, moves 28 twice and never 29.
# Only for reproducing the published Human3.6M figure.
PUBLISHED_H36M_SWAP_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (21, 28) if p == (21, 29) else p for p in H36M_SWAP_PAIRS
)

# SPEC 1.6: refitting stops once no more than this many samples are closer to the swapped truth.
SWAP_TOLERANCE = 10


def fit_regressor(keypoints: np.ndarray, landmarks: np.ndarray, visible: np.ndarray | None = None) -> np.ndarray:
    """W [2K, 2M] mapping keypoints [N, K, 2] to landmarks [N, M, 2].

    With ``visible`` [N, M] (the visible variant, for CUB and Tai-Chi), each
    output column is fitted only on the rows where its landmark is visible.
    """
    x = _centred(keypoints, "keypoints")
    y = _centred(landmarks, "landmarks")
    if len(x) != len(y):
        raise ValueError(f"keypoints have {len(x)} rows but landmarks {len(y)}: one row per image in both")
    if visible is None:
        return _least_squares(x, y)
    visible = np.asarray(visible, dtype=bool)
    if visible.shape != landmarks.shape[:2]:
        raise ValueError(f"visible must be [N, M] = {landmarks.shape[:2]}, got {visible.shape}")
    columns = np.repeat(visible, 2, axis=1)  # each landmark's visibility covers both its coordinates
    weights = np.zeros((x.shape[1], y.shape[1]))
    for j in range(y.shape[1]):
        rows = columns[:, j]
        weights[:, j] = _least_squares(x[rows], y[rows, j : j + 1])[:, 0]
    return weights


def predict_landmarks(weights: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """Landmarks [N, M, 2] predicted from keypoints [N, K, 2] by a fitted W."""
    prediction = _centred(keypoints, "keypoints") @ weights + 0.5
    return prediction.reshape(len(prediction), -1, 2)


def swap_left_right(landmarks: np.ndarray, pairs: Sequence[tuple[int, int]] = H36M_SWAP_PAIRS) -> np.ndarray:
    """Landmarks [..., M, 2] with each pair (a, b) exchanged.

    As in the published code, the pairs build one index (``index[a] = b; index[b] = a``, in order)
    that then picks the landmarks, so pairs that share a landmark overwrite each other: with
    ``PUBLISHED_H36M_SWAP_PAIRS`` landmark 20 is lost and 28 appears twice.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    index = np.arange(landmarks.shape[-2])
    for a, b in pairs:
        index[a], index[b] = b, a
    return landmarks[..., index, :]


def fit_regressor_with_swaps(
    keypoints: np.ndarray,
    landmarks: np.ndarray,
    *,
    pairs: Sequence[tuple[int, int]] = H36M_SWAP_PAIRS,
    tolerance: int = SWAP_TOLERANCE,
    max_rounds: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """The Human3.6M variant: fit, then while more than ``tolerance`` samples are closer to their
    left/right-swapped truth than to their truth, swap those samples' truth and refit.

    Returns W and the (partly swapped) landmarks it was finally fitted to.
    """
    target = np.array(landmarks, dtype=np.float64, copy=True)
    weights = fit_regressor(keypoints, target)
    for _ in range(max_rounds):
        prediction = predict_landmarks(weights, keypoints)
        swapped = swap_left_right(target, pairs)
        closer = _mean_distance(prediction, swapped) < _mean_distance(prediction, target)
        if closer.sum() <= tolerance:
            break
        target[closer] = swapped[closer]
        weights = fit_regressor(keypoints, target)
    return weights, target


def _centred(points: np.ndarray, name: str) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 3 or points.shape[-1] != 2:
        raise ValueError(f"{name} must be [N, count, 2], got shape {points.shape}")
    return points.reshape(len(points), -1) - 0.5


def _least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.linalg.pinv(x.T @ x) @ x.T @ y


def _mean_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per sample, the mean over landmarks of the Euclidean distance: [N]."""
    return np.linalg.norm(a - b, axis=-1).mean(axis=-1)
