"""Keypoints of images from a learned context: token voting (SPEC 1.4) and detection (SPEC 1.5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from skp_ray.attention import attention_maps
from skp_ray.diffusion import Diffusion
from skp_ray.geometry import random_affine, unwarp, warp
from skp_ray.heatmaps import argmax_centres, check_peak_disc
from skp_ray.images import resize_batch
from skp_ray.selection import token_pick_counts, top_voted_tokens

# SPEC 1.5's soft-argmax option averages positions within this many pixels of the argmax.
WEIGHTED_AVERAGE_RADIUS = 5.0


def count_token_picks(
    diffusion: Diffusion,
    images: torch.Tensor,
    context: torch.Tensor,
    *,
    top_k: int = 10,
    furthest_point_num_samples: int = 25,
    sigma: float = 2.0,
    num_subjects: int = 1,
    peak_disc: str = "centred",
    batch_size: int = 4,
    generator: torch.Generator | None = None,
    **map_options,
) -> torch.Tensor:
    """How often each token is picked [T] over untransformed images: 25 lowest-KL, then FPS to top_k.

    Counts from disjoint image sets add up, so workers can count shards and sum.
    ``num_subjects`` and ``peak_disc``: see :func:`skp_ray.heatmaps.find_peaks`.
    """
    check_peak_disc(peak_disc)  # before the UNet runs
    counts = torch.zeros(len(context), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            maps = attention_maps(diffusion, images[start : start + batch_size], context, generator=generator, **map_options)
            counts += token_pick_counts(
                maps.cpu(),
                top_k=top_k,
                furthest_point_num_samples=furthest_point_num_samples,
                sigma=sigma,
                num_subjects=num_subjects,
                peak_disc=peak_disc,
            )
    return counts


def select_keypoint_tokens(
    diffusion: Diffusion,
    images: torch.Tensor,
    context: torch.Tensor,
    *,
    top_k: int = 10,
    **options,
) -> torch.Tensor:
    """The ``top_k`` most often picked tokens over ``images`` (SPEC 1.4), most picked first, ties by lower id."""
    return top_voted_tokens(count_token_picks(diffusion, images, context, top_k=top_k, **options), top_k)


def detect_keypoints(
    diffusion: Diffusion,
    images: torch.Tensor,
    context: torch.Tensor,
    indices: Sequence[int] | torch.Tensor,
    *,
    augmentation_iterations: int = 10,
    thetas: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    weighted_avg: bool = False,
    degrees: float = 15.0,
    scale: tuple[float, float] = (0.8, 1.0),
    translate: tuple[float, float] = (0.25, 0.25),
    image_size: int | None = None,
    **map_options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoints of images [B, 3, H, W] in [0, 1] with test-time augmentation (SPEC 1.5).

    Returns ``(keypoints [B, K, 2], peaks [B, K])``: (y, x) in [0, 1] of the
    image frame and each keypoint's value in its averaged map. Per image, the
    ``augmentation_iterations`` random affine copies run as one batch; their
    maps (softmax over all tokens, then the K chosen ones) are resized to the
    image side, inverse-warped and averaged over the copies that see each
    pixel. ``thetas`` [B, A, 2, 3] replaces the random transforms and
    ``noise`` [B, A, C, h, w] (each copy's latent noise) the random noise, so
    that a run can be replayed exactly.
    """
    size = image_size or diffusion.image_size
    indices = torch.as_tensor(indices, dtype=torch.long)
    images = resize_batch(images, size)
    if thetas is None:
        if augmentation_iterations < 1:
            raise ValueError(f"augmentation_iterations must be at least 1; got {augmentation_iterations}.")
        thetas = random_affine(
            len(images) * augmentation_iterations,
            degrees=degrees,
            scale=scale,
            translate=translate,
            generator=generator,
        ).unflatten(0, (len(images), augmentation_iterations))
    elif thetas.ndim != 4 or thetas.shape[0] != len(images) or thetas.shape[2:] != (2, 3):
        raise ValueError(f"thetas must be [B={len(images)}, A, 2, 3]; got {tuple(thetas.shape)}.")
    if noise is not None:
        _check_noise(noise, diffusion, thetas.shape[:2], size)
    noises = noise if noise is not None else [None] * len(images)

    keypoints, peaks = [], []
    with torch.no_grad():
        for image, image_thetas, image_noise in zip(images, thetas, noises):
            averaged = _augmented_maps(
                diffusion, image, context, indices, image_thetas, image_noise, size, generator, map_options
            )
            image_keypoints, image_peaks = _locate(averaged.cpu(), weighted_avg)
            keypoints.append(image_keypoints)
            peaks.append(image_peaks)
    return torch.stack(keypoints), torch.stack(peaks)


def draw_augmentations(
    diffusion: Diffusion,
    generator: torch.Generator,
    *,
    augmentation_iterations: int = 10,
    degrees: float = 15.0,
    scale: tuple[float, float] = (0.8, 1.0),
    translate: tuple[float, float] = (0.25, 0.25),
    image_size: int | None = None,
    **map_options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``detect_keypoints`` draws from ``generator`` for one image alone: (thetas [A, 2, 3], noise [A, C, h, w]).

    The same draws in the same order: the A random affines first, then the A
    latent noises (``attention_maps`` draws them when it noises the latents).
    Stacked over images and passed as ``thetas`` [B, A, 2, 3] and ``noise``
    [B, A, C, h, w], they give every image of one call the keypoints that a
    call of its own with its own generator gives it. ``map_options`` (the
    other ``detect_keypoints`` options) are accepted and unused, so one options
    dict serves both calls.
    """
    if augmentation_iterations < 1:
        raise ValueError(f"augmentation_iterations must be at least 1; got {augmentation_iterations}.")
    thetas = random_affine(
        augmentation_iterations, degrees=degrees, scale=scale, translate=translate, generator=generator
    )
    side = (image_size or diffusion.image_size) // diffusion.vae_scale_factor
    shape = (augmentation_iterations, diffusion.unet.config.in_channels, side, side)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)  # as add_noise draws
    return thetas, noise


def _check_noise(noise: torch.Tensor, diffusion: Diffusion, images_and_copies: torch.Size, size: int) -> None:
    side = size // diffusion.vae_scale_factor
    expected = (*images_and_copies, diffusion.unet.config.in_channels, side, side)
    if tuple(noise.shape) != expected:
        raise ValueError(
            f"noise must be [B, A, C, h, w] = {list(expected)} (images, augmentations, latent channels, "
            f"latent side); got {list(noise.shape)}."
        )


def _augmented_maps(diffusion, image, context, indices, thetas, noise, size, generator, map_options) -> torch.Tensor:
    """The chosen tokens' maps [K, size, size], averaged over augmentations in the image frame."""
    thetas = thetas.to(device=image.device, dtype=image.dtype)
    copies = warp(image.expand(len(thetas), -1, -1, -1), thetas).clamp(0, 1)
    maps = attention_maps(
        diffusion,
        copies,
        context,
        token_indices=indices,
        noise=noise,
        generator=generator,
        image_size=size,
        **map_options,
    )
    maps = F.interpolate(maps.float(), size=(size, size), mode="bilinear", align_corners=False)
    thetas = thetas.to(maps)
    total = unwarp(maps, thetas).sum(dim=0)
    coverage = unwarp(torch.ones_like(maps[:, :1]), thetas).sum(dim=0)
    return torch.where(coverage > 0, total / coverage.clamp_min(1e-12), torch.zeros_like(total))


def _locate(maps: torch.Tensor, weighted_avg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (y, x) [K, 2] and peak values [K] of each map [K, S, S]."""
    size = maps.shape[-1]
    centres = argmax_centres(maps)  # pixel units
    rows, cols = (centres[:, 0] - 0.5).long(), (centres[:, 1] - 0.5).long()
    peaks = maps[torch.arange(len(maps)), rows, cols]
    if weighted_avg:
        centres = _soft_argmax_near(maps, centres, WEIGHTED_AVERAGE_RADIUS)
    return centres / size, peaks


def _soft_argmax_near(maps: torch.Tensor, centres: torch.Tensor, radius: float) -> torch.Tensor:
    """Map-weighted mean pixel centre within ``radius`` pixels of each argmax centre [K, 2]."""
    size = maps.shape[-1]
    coords = torch.arange(size, dtype=maps.dtype) + 0.5
    ys, xs = coords.view(1, size, 1), coords.view(1, 1, size)
    near = (ys - centres[:, 0, None, None]) ** 2 + (xs - centres[:, 1, None, None]) ** 2 <= radius**2
    weights = maps * near
    total = weights.sum(dim=(1, 2)).clamp_min(1e-12)
    y = (weights * ys).sum(dim=(1, 2)) / total
    x = (weights * xs).sum(dim=(1, 2)) / total
    return torch.stack([y, x], dim=1)
