"""SPEC 3's optimisation: contexts whose token-1 attention becomes a Gaussian at a source point.

Each of the P points of an image gets R independent contexts (restarts),
[T, D] each, N(0, 1). Every step, each context sees its own random crop of
the image's canvas (keeping its point at least ``crop_margin`` of the crop
from the edges), resized to the model's input side and noised to
``noise_level``; its loss is the mean over layers and canvas pixels of the
squared difference between its maps (upsampled to 512) and the Gaussian at
its point. Adam updates every context from its own loss only, so the P x R
contexts are optimised together, in shared UNet calls of at most
``max_batch``, exactly as P x R separate runs would be (up to rounding).

Randomness, replayable: ``init_contexts`` [P, R, T, D], ``crops``
[P, R, steps, 2] (top, left) and ``noise`` [P, R, steps, C, h, w] replace the
draws. What is not given is drawn from the point's generator: its initial
contexts first, then per step its R crops (top then left, per restart) and
its R noises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from skp_ray.attention import check_images
from skp_ray.correspondence.ldm_maps import (
    canvas_position,
    check_crop_starts,
    check_points,
    check_replay,
    crop_maps,
    crop_side,
    cut_crops,
    draw_crop_start,
    draw_latent_noise,
    gaussian_targets,
    latent_shape,
    point_generators,
)
from skp_ray.correspondence.ldm_settings import (
    CANVAS,
    LDM_CROP_FRACTION,
    LDM_CROP_MARGIN,
    LDM_LAYERS,
    LDM_SIGMA,
    LDM_TOKEN,
    OPTIMISE_NOISE_LEVEL,
)
from skp_ray.diffusion import Diffusion, timestep_at
from skp_ray.images import resize_batch

__all__ = ["OptimisedContexts", "optimize_point_contexts"]


@dataclass
class OptimisedContexts:
    contexts: torch.Tensor  # [P, R, T, D] on the CPU, float32 (float64 for a float64 model)
    losses: torch.Tensor  # [steps, P, R]: each context's loss at each step, before that step's update
    crops: torch.Tensor  # [P, R, steps, 2] the (top, left) each step used


def optimize_point_contexts(
    diffusion: Diffusion,
    image: torch.Tensor,
    points_yx,
    *,
    num_steps: int = 129,
    lr: float = 2.3756e-3,
    restarts: int = 5,
    num_tokens: int = 77,
    token: int = LDM_TOKEN,
    sigma: float = LDM_SIGMA,
    crop_fraction: float = LDM_CROP_FRACTION,
    crop_margin: float = LDM_CROP_MARGIN,
    noise_level: int = OPTIMISE_NOISE_LEVEL,
    layers: Sequence[int] = LDM_LAYERS,
    image_size: int | None = None,
    init_contexts: torch.Tensor | None = None,
    crops: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    published_quirks: bool = True,
    max_batch: int = 32,
) -> OptimisedContexts:
    """Optimise ``restarts`` contexts for each of ``points_yx`` [P, 2] ((row, col) pixel indices) of
    ``image`` [3, H, W] in [0, 1]; see the module's docstring. ``image_size`` is the model's input side
    (default: its own, 512 for SD); ``generator`` is one generator or one per point."""
    check_images(image[None])
    height, width = image.shape[-2:]
    points = check_points(points_yx, height, width)
    _check_settings(num_steps=num_steps, restarts=restarts, num_tokens=num_tokens, token=token, max_batch=max_batch)
    image_size = image_size or diffusion.image_size
    side = crop_side(crop_fraction)
    count, dim = len(points), diffusion.context_dim
    latent = latent_shape(diffusion, image_size)
    check_replay("init_contexts", init_contexts, (count, restarts, num_tokens, dim))
    check_replay("crops", crops, (count, restarts, num_steps, 2))
    check_replay("noise", noise, (count, restarts, num_steps, *latent))
    check_crop_starts(crops, side)
    generators = point_generators(generator, count)
    timestep = timestep_at(diffusion, noise_level)

    canvas = resize_batch(image[None].float(), CANVAS)[0].to(diffusion.device)
    centers = canvas_position(points, height, width)  # [P, 2]
    if init_contexts is None:
        init_contexts = torch.stack([torch.randn((restarts, num_tokens, dim), generator=g) for g in generators])
    work_dtype = torch.promote_types(diffusion.dtype, torch.float32)  # float32 for half models, float64 stays
    contexts = init_contexts.to(device=diffusion.device, dtype=work_dtype).flatten(0, 1).clone().requires_grad_()
    optimizer = torch.optim.Adam([contexts], lr=lr)
    losses, used_crops = [], []
    for step in range(num_steps):
        starts = crops[:, :, step] if crops is not None else _draw_starts(centers, restarts, side, crop_margin, generators)
        step_noise = noise[:, :, step] if noise is not None else _draw_noise(generators, restarts, latent, published_quirks)
        starts, step_noise = starts.flatten(0, 1), step_noise.flatten(0, 1)
        targets_at = (centers.repeat_interleave(restarts, dim=0) - starts) * (CANVAS / side)
        optimizer.zero_grad()
        step_losses = []
        for chunk in torch.arange(len(starts)).split(max_batch):
            chunk_maps = crop_maps(
                diffusion,
                cut_crops(canvas, starts[chunk], side, image_size),
                contexts[chunk],
                timestep=timestep,
                noise=step_noise[chunk].to(diffusion.device),
                layers=layers,
                token=token,
                out_side=CANVAS,
                published_quirks=published_quirks,
            )
            targets = gaussian_targets(targets_at[chunk].to(diffusion.device), sigma, published_quirks=published_quirks)
            targets = targets.to(chunk_maps.dtype)
            loss = (chunk_maps - targets[:, None]).pow(2).mean(dim=(1, 2, 3))  # one per context
            loss.sum().backward()  # a sum: each context's gradient is its own loss's
            step_losses.append(loss.detach().cpu())
        optimizer.step()
        losses.append(torch.cat(step_losses).reshape(count, restarts))
        used_crops.append(starts.reshape(count, restarts, 2))
    return OptimisedContexts(
        contexts=contexts.detach().cpu().reshape(count, restarts, num_tokens, dim),
        losses=torch.stack(losses) if losses else torch.zeros(0, count, restarts),
        crops=torch.stack(used_crops, dim=2) if used_crops else torch.zeros(count, restarts, 0, 2, dtype=torch.long),
    )


def _draw_starts(centers, restarts: int, side: int, margin: float, generators) -> torch.Tensor:
    """[P, R, 2]: each point's R crops from its own generator."""
    return torch.stack(
        [torch.stack([draw_crop_start(center, side, margin, g) for _ in range(restarts)]) for center, g in zip(centers, generators)]
    )


def _draw_noise(generators, restarts: int, latent: tuple, published_quirks: bool) -> torch.Tensor:
    """[P, R, C, h, w]: each point's R noises from its own generator."""
    return torch.stack([draw_latent_noise((restarts, *latent), g, published_quirks=published_quirks) for g in generators])


def _check_settings(*, num_steps: int, restarts: int, num_tokens: int, token: int, max_batch: int) -> None:
    if num_steps < 0 or restarts < 1 or max_batch < 1:
        raise ValueError(f"need num_steps >= 0, restarts >= 1 and max_batch >= 1; got {num_steps}, {restarts}, {max_batch}")
    if not 0 <= token < num_tokens:
        raise ValueError(f"token {token} is not one of the context's {num_tokens} tokens (0..{num_tokens - 1})")
