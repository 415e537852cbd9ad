"""Keypoints of images from a learned context: token voting (SPEC 1.4) and detection (SPEC 1.5)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from skp_ray.attention import attention_maps
from skp_ray.diffusion import Diffusion, encode_images
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
    copies_per_call: int | None = None,
    tta_latent: bool = False,
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
    that a run can be replayed exactly. :func:`detect_with_confidence` also
    says how sure each keypoint is.

    All the call's copies (B x A) go through the UNet in calls of at most
    ``copies_per_call`` copies (None: :func:`default_copies_per_call`); a call
    may hold copies of several images, and the answers do not depend on it
    (with a ``generator`` each image's noise is drawn up front, in the order
    of one call per image; with neither ``noise`` nor ``generator`` each UNet
    call draws from the global generator). ``tta_latent=True`` encodes each
    image once and warps its latent instead of the image (bilinear, zero
    padding, at the latent's side): A times fewer VAE calls, approximate.
    """
    detection = detect_with_confidence(
        diffusion,
        images,
        context,
        indices,
        augmentation_iterations=augmentation_iterations,
        thetas=thetas,
        noise=noise,
        generator=generator,
        weighted_avg=weighted_avg,
        degrees=degrees,
        scale=scale,
        translate=translate,
        image_size=image_size,
        copies_per_call=copies_per_call,
        tta_latent=tta_latent,
        **map_options,
    )
    return detection.keypoints, detection.peaks


@dataclass(frozen=True)
class Detection:
    """Keypoints of a batch of images and how well their augmentations agree on them (all on the CPU).

    ``keypoints`` [B, K, 2] and ``peaks`` [B, K] are :func:`detect_keypoints`'s.
    ``augmentation_keypoints`` [B, K, A, 2] is each augmentation's own keypoint:
    the argmax pixel centre of its unwarped map (over its coverage, as in the
    average) among the pixels it covers, as normalised (y, x) of the image
    frame (NaN for a copy that covers no pixel); the hard argmax even with
    ``weighted_avg``.
    ``peak_share`` [B, K] is the peak over the averaged map's sum: 1 when all
    of the map's mass sits on one pixel, 1 / S^2 for a flat S x S map.
    """

    keypoints: torch.Tensor
    peaks: torch.Tensor
    augmentation_keypoints: torch.Tensor
    peak_share: torch.Tensor

    def spread_px(self, frame_heights: torch.Tensor, frame_widths: torch.Tensor) -> torch.Tensor:
        """The keypoints' spread [B, K] (float32) in pixels of frames of these heights and widths [B].

        A keypoint's spread is the root mean square distance of its
        augmentations' keypoints from it, each offset scaled to the frame's
        pixels (dy by the height, dx by the width) before the distance:
        the model's square input squashes the frame, the spread is measured
        in the frame as it is. Copies that cover no pixel are left out.
        """
        scale = torch.stack([torch.as_tensor(frame_heights), torch.as_tensor(frame_widths)], dim=-1).double()
        offsets = (self.augmentation_keypoints.double() - self.keypoints.double()[:, :, None]) * scale[:, None, None]
        return offsets.square().sum(dim=-1).nanmean(dim=-1).sqrt().float()


def detect_with_confidence(
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
    copies_per_call: int | None = None,
    tta_latent: bool = False,
    **map_options,
) -> Detection:
    """:func:`detect_keypoints` (the same options and draws) with each keypoint's confidence, from the
    same maps: no more UNet calls. Returns a :class:`Detection`."""
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
    elif generator is not None:  # the draws of one call per image: each image's A noises in turn
        noise = torch.stack([_draw_noise(diffusion, generator, thetas.shape[1], size) for _ in range(len(images))])
    if copies_per_call is None:
        copies_per_call = default_copies_per_call(
            diffusion, size, feature_upsample_res=map_options.get("feature_upsample_res", 128), kept_tokens=len(indices)
        )
    elif copies_per_call < 1:
        raise ValueError(f"copies_per_call must be at least 1; got {copies_per_call}.")

    keypoints, peaks, own, shares = [], [], [], []
    with torch.no_grad():
        latents = _encode_in_chunks(diffusion, images, copies_per_call) if tta_latent else None
        copy_maps = _copy_maps_per_image(
            diffusion, images, latents, context, indices, thetas, noise, copies_per_call, size, map_options
        )
        for image_thetas, maps in zip(thetas, copy_maps):
            unwarped, covered = _unwarped(maps, image_thetas, size)
            averaged = _average(unwarped, covered).cpu()
            image_keypoints, image_peaks = _locate(averaged, weighted_avg)
            keypoints.append(image_keypoints)
            peaks.append(image_peaks)
            own.append(_own_keypoints(unwarped, covered).cpu())
            shares.append(_peak_share(averaged, image_peaks))
    return Detection(torch.stack(keypoints), torch.stack(peaks), torch.stack(own), torch.stack(shares))


# default_copies_per_call's budget: half the free memory of the model's GPU; on the CPU, this much.
CPU_MEMORY_BUDGET = 4 * 2**30
# Full-size activations of one resolution level alive at once in a no-grad ResNet or attention
# block (input, norm, activation, convolution, residual), with room for the allocator's slack.
LIVE_ACTIVATIONS = 6


def default_copies_per_call(
    diffusion: Diffusion,
    size: int,
    *,
    feature_upsample_res: int = 128,
    kept_tokens: int = 10,
    budget_bytes: int | None = None,
) -> int:
    """How many augmented copies of ``size``-pixel images one UNet call takes by default (at least 1).

    ``budget_bytes`` (None: half the free memory of the model's GPU, or
    ``CPU_MEMORY_BUDGET`` on the CPU) over an estimate of one copy's working
    memory, in the model's precision: ``LIVE_ACTIVATIONS`` tensors of the
    VAE's first level (its width x size^2, the largest activations of all)
    and of the UNet's first level (its width x latent side^2; SDPA keeps no
    score matrix), plus in float32 the copy's pixels (3 x size^2) and its
    kept maps (kept_tokens x feature_upsample_res^2). Only the speed and the
    memory depend on it, never the answers.
    """
    if budget_bytes is None:
        budget_bytes = _default_budget(diffusion.device)
    element = torch.finfo(diffusion.dtype).bits // 8
    latent_side = size // diffusion.vae_scale_factor
    widest = (
        diffusion.vae.config.block_out_channels[0] * size**2
        + diffusion.unet.config.block_out_channels[0] * latent_side**2
    )
    float32_parts = 3 * size**2 + kept_tokens * feature_upsample_res**2
    per_copy = LIVE_ACTIVATIONS * element * widest + 4 * float32_parts
    return max(1, int(budget_bytes // per_copy))


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return CPU_MEMORY_BUDGET


def _draw_noise(diffusion: Diffusion, generator: torch.Generator, count: int, size: int) -> torch.Tensor:
    """``count`` copies' latent noise [count, C, h, w], drawn as ``attention_maps`` draws it."""
    side = size // diffusion.vae_scale_factor
    shape = (count, diffusion.unet.config.in_channels, side, side)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


def _encode_in_chunks(diffusion: Diffusion, images: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([encode_images(diffusion, images[start : start + chunk]) for start in range(0, len(images), chunk)])


def _copy_maps_per_image(diffusion, images, latents, context, indices, thetas, noise, copies_per_call, size, map_options):
    """Each image's copies' maps of the chosen tokens [A, K, R, R], image by image, from UNet calls of
    at most ``copies_per_call`` copies taken in order (image-major) across the images.

    Copies are warped images, or with ``latents`` [B, C, h, w] warped latents."""
    count = thetas.shape[1]
    flat_thetas = thetas.flatten(0, 1)
    flat_noise = None if noise is None else noise.flatten(0, 1)
    held = []
    for start in range(0, len(flat_thetas), copies_per_call):
        rows = torch.arange(start, min(start + copies_per_call, len(flat_thetas)))
        sources = rows // count  # the image each copy is of
        options = dict(map_options, token_indices=indices, image_size=size)
        options["noise"] = None if flat_noise is None else flat_noise[rows]
        if latents is None:
            copies = warp(images[sources], flat_thetas[rows].to(images)).clamp(0, 1)
            held.append(attention_maps(diffusion, copies, context, **options))
        else:
            sources = sources.to(latents.device)
            warped = warp(latents[sources].float(), flat_thetas[rows].float()).to(latents.dtype)
            held.append(attention_maps(diffusion, None, context, latents=warped, **options))
        while sum(len(maps) for maps in held) >= count:
            ready = torch.cat(held)
            held = [ready[count:]]
            yield ready[:count]


def _unwarped(maps: torch.Tensor, thetas: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each copy's maps [A, K, R, R] in the image frame [A, K, size, size], and the share of each
    pixel that the copy sees [A, 1, size, size] (bilinear weights: 0 outside the copy, 1 well inside)."""
    maps = F.interpolate(maps.float(), size=(size, size), mode="bilinear", align_corners=False)
    thetas = thetas.to(maps)
    return unwarp(maps, thetas), unwarp(torch.ones_like(maps[:, :1]), thetas)


def draw_augmentations(
    diffusion: Diffusion,
    generator: torch.Generator,
    *,
    augmentation_iterations: int = 10,
    degrees: float = 15.0,
    scale: tuple[float, float] = (0.8, 1.0),
    translate: tuple[float, float] = (0.25, 0.25),
    image_size: int | None = None,
    copies_per_call: int | None = None,
    tta_latent: bool = False,
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
    return thetas, _draw_noise(diffusion, generator, augmentation_iterations, image_size or diffusion.image_size)


def _check_noise(noise: torch.Tensor, diffusion: Diffusion, images_and_copies: torch.Size, size: int) -> None:
    side = size // diffusion.vae_scale_factor
    expected = (*images_and_copies, diffusion.unet.config.in_channels, side, side)
    if tuple(noise.shape) != expected:
        raise ValueError(
            f"noise must be [B, A, C, h, w] = {list(expected)} (images, augmentations, latent channels, "
            f"latent side); got {list(noise.shape)}."
        )


def _average(unwarped: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """The chosen tokens' maps [K, size, size], averaged over the copies that see each pixel."""
    total, coverage = unwarped.sum(dim=0), covered.sum(dim=0)
    return torch.where(coverage > 0, total / coverage.clamp_min(1e-12), torch.zeros_like(total))


def _own_keypoints(unwarped: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """Each copy's argmax over the pixels it covers, normalised (y, x) [K, A, 2]; NaN if it covers none.

    A copy's map is weighted by its coverage as the average is, so that a single copy's keypoint is the
    averaged map's."""
    size = unwarped.shape[-1]
    seen = covered > 0
    own = torch.where(seen, unwarped / covered.clamp_min(1e-12), torch.full_like(unwarped, float("-inf")))
    centres = argmax_centres(own) / size  # [A, K, 2]
    centres[~seen.flatten(1).any(dim=1)] = float("nan")
    return centres.transpose(0, 1)


def _peak_share(averaged: torch.Tensor, peaks: torch.Tensor) -> torch.Tensor:
    """Each keypoint's peak over its averaged map's sum [K]; 0 for an all-zero map."""
    total = averaged.sum(dim=(1, 2))
    return torch.where(total > 0, peaks / total.clamp_min(1e-30), torch.zeros_like(total))


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
