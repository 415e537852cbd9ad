"""Stable Keypoints training losses (SPEC 1.3).

``maps`` are the attention maps of an image, ``[T, H, W]``; ``maps_transformed``
those of the image warped with ``theta`` (:func:`skp_ray.geometry.warp`), same
shape. Gradients flow through both sets of maps; token selection does not.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from skp_ray.geometry import unwarp
from skp_ray.heatmaps import peak_targets
from skp_ray.selection import furthest_point_sampling, top_k_gaussian

__all__ = [
    "LossParts",
    "sharpening_loss",
    "equivariance_loss",
    "image_keypoint_loss",
    "batch_keypoint_loss",
]


class LossParts(NamedTuple):
    """Total loss and its unweighted parts (scalars)."""

    total: torch.Tensor
    sharpening: torch.Tensor
    equivariance: torch.Tensor


def sharpening_loss(
    maps: torch.Tensor, *, sigma: float = 2.0, num_subjects: int = 1, peak_disc: str = "centred"
) -> torch.Tensor:
    """``mean((maps - target)^2)`` over tokens and pixels; ``maps`` ``[T, H, W]``.

    The target (:func:`skp_ray.heatmaps.peak_targets`) is a constant: the
    gradient flows through ``maps`` only.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape [T, H, W], got {list(maps.shape)}")
    target = peak_targets(maps, sigma=sigma, num_subjects=num_subjects, peak_disc=peak_disc)
    return ((maps - target) ** 2).mean()


def equivariance_loss(
    maps: torch.Tensor, maps_transformed: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    """``mean((maps - unwarp(maps_transformed, theta))^2)``, no masking.

    ``maps`` ``[T, H, W]`` with ``theta`` ``[2, 3]``, or ``[B, T, H, W]`` with
    ``theta`` ``[B, 2, 3]``; ``maps_transformed`` has ``maps``' shape.
    """
    if maps.shape != maps_transformed.shape:
        raise ValueError(
            f"maps_transformed must have the shape of maps {list(maps.shape)}, "
            f"got {list(maps_transformed.shape)}"
        )
    if maps.ndim not in (3, 4):
        raise ValueError(f"maps must have shape [T, H, W] or [B, T, H, W], got {list(maps.shape)}")
    return ((maps - unwarp(maps_transformed, theta)) ** 2).mean()


def _check_image_pair(maps: torch.Tensor, maps_transformed: torch.Tensor, ndim: int) -> None:
    expected = "[T, H, W]" if ndim == 3 else "[B, T, H, W]"
    if maps.ndim != ndim:
        raise ValueError(f"maps must have shape {expected}, got {list(maps.shape)}")
    if maps.shape != maps_transformed.shape:
        raise ValueError(
            f"maps_transformed must have the shape of maps {list(maps.shape)}, "
            f"got {list(maps_transformed.shape)}"
        )


def image_keypoint_loss(
    maps: torch.Tensor,
    maps_transformed: torch.Tensor,
    theta: torch.Tensor,
    *,
    top_k: int = 10,
    furthest_point_num_samples: int = 25,
    sigma: float = 2.0,
    num_subjects: int = 1,
    peak_disc: str = "centred",
    sharpening_loss_weight: float = 100.0,
    equivariance_attn_loss_weight: float = 1000.0,
) -> LossParts:
    """Loss of one image (SPEC 1.3).

    ``maps``, ``maps_transformed`` ``[T, H, W]``; ``theta`` ``[2, 3]``.

    Candidates: the ``furthest_point_num_samples`` lowest-KL tokens of ``maps``;
    chosen: FPS to ``top_k`` with locations from ``maps_transformed``.
    ``total = sharpening_loss_weight * L_sharp + equivariance_attn_loss_weight * L_eq``.
    ``num_subjects`` and ``peak_disc``: see :func:`skp_ray.heatmaps.find_peaks`.
    """
    _check_image_pair(maps, maps_transformed, 3)
    if tuple(theta.shape) != (2, 3):
        raise ValueError(f"theta must have shape [2, 3], got {list(theta.shape)}")
    candidates = top_k_gaussian(
        maps, furthest_point_num_samples, sigma=sigma, num_subjects=num_subjects, peak_disc=peak_disc
    )
    chosen = furthest_point_sampling(maps_transformed, top_k, candidates)
    sharp = sharpening_loss(maps[chosen], sigma=sigma, num_subjects=num_subjects, peak_disc=peak_disc)
    equi = equivariance_loss(maps[chosen], maps_transformed[chosen], theta)
    total = sharpening_loss_weight * sharp + equivariance_attn_loss_weight * equi
    return LossParts(total, sharp, equi)


def batch_keypoint_loss(
    maps: torch.Tensor,
    maps_transformed: torch.Tensor,
    thetas: torch.Tensor,
    *,
    top_k: int = 10,
    furthest_point_num_samples: int = 25,
    sigma: float = 2.0,
    num_subjects: int = 1,
    peak_disc: str = "centred",
    sharpening_loss_weight: float = 100.0,
    equivariance_attn_loss_weight: float = 1000.0,
) -> LossParts:
    """Mean over images of :func:`image_keypoint_loss` (each part averaged).

    ``maps``, ``maps_transformed`` ``[B, T, H, W]``, ``thetas`` ``[B, 2, 3]``;
    options as in :func:`image_keypoint_loss`.
    """
    _check_image_pair(maps, maps_transformed, 4)
    if tuple(thetas.shape) != (maps.shape[0], 2, 3):
        raise ValueError(
            f"thetas must have shape [B, 2, 3] = [{maps.shape[0]}, 2, 3], got {list(thetas.shape)}"
        )
    if maps.shape[0] == 0:
        raise ValueError("maps must hold at least one image (B >= 1)")
    options = dict(
        top_k=top_k,
        furthest_point_num_samples=furthest_point_num_samples,
        sigma=sigma,
        num_subjects=num_subjects,
        peak_disc=peak_disc,
        sharpening_loss_weight=sharpening_loss_weight,
        equivariance_attn_loss_weight=equivariance_attn_loss_weight,
    )
    parts = [
        image_keypoint_loss(m, mt, th, **options)
        for m, mt, th in zip(maps, maps_transformed, thetas)
    ]
    return LossParts(*(torch.stack(values).mean() for values in zip(*parts)))
