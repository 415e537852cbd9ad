"""The discovery objective on a batch of images (SPEC 1.3), and a serial optimiser loop.

``training_loss`` is the per-step work that each data-parallel worker does on
its share of a batch; ``optimize_context`` runs it on one process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from skp_ray.attention import attention_maps
from skp_ray.diffusion import Diffusion
from skp_ray.geometry import random_affine, warp
from skp_ray.heatmaps import check_peak_disc
from skp_ray.images import resize_batch
from skp_ray.losses import LossParts, batch_keypoint_loss


def init_context(num_tokens: int, width: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """The learned context [num_tokens, width], drawn N(0, 1) (SPEC 1.1)."""
    return torch.randn(num_tokens, width, generator=generator)


def training_loss(
    diffusion: Diffusion,
    images: torch.Tensor,
    context: torch.Tensor,
    *,
    thetas: torch.Tensor | None = None,
    noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    degrees: float = 15.0,
    scale: tuple[float, float] = (0.8, 1.0),
    translate: tuple[float, float] = (0.25, 0.25),
    top_k: int = 10,
    furthest_point_num_samples: int = 25,
    sigma: float = 2.0,
    num_subjects: int = 1,
    peak_disc: str = "centred",
    sharpening_loss_weight: float = 100.0,
    equivariance_attn_loss_weight: float = 1000.0,
    latents: torch.Tensor | None = None,
    **map_options,
) -> LossParts:
    """Mean over images [B, 3, H, W] of SPEC 1.3's per-image loss, differentiable in ``context``.

    Draws one affine transform per image (unless ``thetas`` [B, 2, 3] is
    given), then the maps of the images and of their transformed copies, each
    UNet call with fresh noise from ``generator`` (unless ``noise``, the latent
    noise for the images and for their copies, is given). The loss options are
    :func:`skp_ray.losses.batch_keypoint_loss`'s. ``latents``: the untransformed
    images' latents, when they are already encoded (a cache); the images are
    still needed for their transformed copies.
    """
    check_peak_disc(peak_disc)  # before the UNet runs
    size = map_options.get("image_size") or diffusion.image_size
    images = resize_batch(images, size)
    if thetas is None:
        thetas = random_affine(len(images), degrees=degrees, scale=scale, translate=translate, generator=generator)
    transformed = warp(images, thetas.to(images)).clamp(0, 1)
    noise_images, noise_transformed = noise if noise is not None else (None, None)
    maps = attention_maps(
        diffusion, images, context, noise=noise_images, generator=generator, latents=latents, **map_options
    )
    maps_transformed = attention_maps(
        diffusion, transformed, context, noise=noise_transformed, generator=generator, **map_options
    )
    return batch_keypoint_loss(
        maps,
        maps_transformed,
        thetas.to(maps),
        top_k=top_k,
        furthest_point_num_samples=furthest_point_num_samples,
        sigma=sigma,
        num_subjects=num_subjects,
        peak_disc=peak_disc,
        sharpening_loss_weight=sharpening_loss_weight,
        equivariance_attn_loss_weight=equivariance_attn_loss_weight,
    )


def optimize_context(
    diffusion: Diffusion,
    images: torch.Tensor,
    *,
    num_tokens: int = 500,
    num_steps: int = 500,
    lr: float = 5e-3,
    batch_size: int = 4,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, LossParts], None] | None = None,
    **loss_options,
) -> tuple[torch.Tensor, list[LossParts]]:
    """Optimise a fresh context on one process: Adam on the context only, ``batch_size`` images a step.

    Images are drawn in a seeded random order, reshuffled each pass. Returns
    the context and the per-step losses (detached).
    """
    context = init_context(num_tokens, diffusion.context_dim, generator=generator).to(diffusion.device)
    context.requires_grad_(True)
    optimizer = torch.optim.Adam([context], lr=lr)
    order = image_order(len(images), batch_size, num_steps, generator)
    history = []
    for step in range(num_steps):
        batch = images[order[step * batch_size : (step + 1) * batch_size]]
        optimizer.zero_grad()
        parts = training_loss(diffusion, batch, context, generator=generator, **loss_options)
        parts.total.backward()
        optimizer.step()
        parts = LossParts(*(part.detach() for part in parts))
        history.append(parts)
        if on_step is not None:
            on_step(step, parts)
    return context.detach(), history


def image_order(num_images: int, batch_size: int, num_steps: int, generator) -> torch.Tensor:
    """Image indices for every step: seeded permutations, each cut to whole batches (no repeats in a batch)."""
    if num_images < batch_size:
        raise ValueError(f"batch_size {batch_size} needs at least that many images; got {num_images}.")
    per_pass = num_images // batch_size * batch_size
    passes = [torch.randperm(num_images, generator=generator)[:per_pass] for _ in range(-(-num_steps * batch_size // per_pass))]
    return torch.cat(passes)[: num_steps * batch_size]
