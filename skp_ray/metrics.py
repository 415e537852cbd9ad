"""The published landmark metrics (SPEC 1.6): each computed per test image, then averaged over images.

Predictions and ground truth are arrays [N, M, 2] in normalised coordinates
([0, 1], either coordinate order as long as both use the same); visibility is
[N, M] booleans.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from skp_ray.regression import H36M_SWAP_PAIRS, swap_left_right


def inter_eye_distance(prediction: np.ndarray, truth: np.ndarray) -> float:
    """CelebA: mean over landmarks of ||pred - gt|| / ||gt_0 - gt_1|| (landmarks 0 and 1 are the eyes)."""
    prediction, truth = _pair(prediction, truth)
    eyes = np.linalg.norm(truth[:, 0] - truth[:, 1], axis=-1)
    return float((_distances(prediction, truth).mean(axis=1) / eyes).mean())


def visible_error(prediction: np.ndarray, truth: np.ndarray, visible: np.ndarray) -> float:
    """CUB: sum_j v_j ||pred_j - gt_j|| / sum_j v_j (the paper's tables show it x 100).

    Images with no visible landmark are left out of the average.
    """
    prediction, truth = _pair(prediction, truth)
    visible = _visibility(visible, truth)
    counts = visible.sum(axis=1)
    per_image = (_distances(prediction, truth) * visible).sum(axis=1)
    return float((per_image[counts > 0] / counts[counts > 0]).mean())


def mean_average_error(prediction: np.ndarray, truth: np.ndarray, visible: np.ndarray, *, scale: float = 256) -> float:
    """Tai-Chi: coordinates x ``scale``, the L2 errors of the visible landmarks *summed* per image
    (as the published code does, despite the name), then averaged over images."""
    prediction, truth = _pair(prediction, truth)
    visible = _visibility(visible, truth)
    return float(((_distances(prediction, truth) * scale) * visible).sum(axis=1).mean())


def pck(prediction: np.ndarray, truth: np.ndarray, *, threshold: float = 6, scale: float = 256) -> float:
    """DeepFashion: coordinates x ``scale``, the fraction of landmarks within ``threshold`` (L2 < 6)."""
    prediction, truth = _pair(prediction, truth)
    return float(((_distances(prediction, truth) * scale) < threshold).mean(axis=1).mean())


def orientation_invariant_error(
    prediction: np.ndarray,
    truth: np.ndarray,
    *,
    pairs: Sequence[tuple[int, int]] = H36M_SWAP_PAIRS,
    scale: float = 128,
) -> float:
    """Human3.6M: per image min(mean L2, mean L2 of the left/right-swapped prediction) x ``scale``."""
    prediction, truth = _pair(prediction, truth)
    direct = _distances(prediction, truth).mean(axis=1)
    swapped = _distances(swap_left_right(prediction, pairs), truth).mean(axis=1)
    return float((np.minimum(direct, swapped) * scale).mean())


def _pair(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prediction, truth = np.asarray(prediction, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if prediction.shape != truth.shape or prediction.ndim != 3 or prediction.shape[-1] != 2:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} must both be [N, M, 2]")
    return prediction, truth


def _visibility(visible: np.ndarray, truth: np.ndarray) -> np.ndarray:
    visible = np.asarray(visible, dtype=bool)
    if visible.shape != truth.shape[:2]:
        raise ValueError(f"visible must be [N, M] = {truth.shape[:2]}, got {visible.shape}")
    return visible


def _distances(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Euclidean distance per image and landmark: [N, M]."""
    return np.linalg.norm(prediction - truth, axis=-1)
