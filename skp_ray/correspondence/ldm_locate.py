"""SPEC 3's inference: where a source point's optimised contexts light up in a target image.

Per context, ``passes`` crop passes over the target's 512 canvas: the four
corner crops first (top-left, top-right, bottom-left, bottom-right), then
crops around the context's running argmax (the argmax of its maps so far,
reduced as below; the crop keeps it at least ``crop_margin`` from the crop's
edges). Each pass's per-layer maps, upsampled to the crop's side, are added
into the canvas where the crop lies, and the canvas is divided by how many
crops covered each pixel. The point's map is the mean over its contexts;
then, per layer, a softmax over all canvas pixels; then the mean over
layers; the argmax (the first maximum in row-major order) is the answer.

All contexts of all points are batched into each pass's UNet calls (at most
``max_batch`` crops per call); passes run in order, since each crop depends
on the passes before it. The published code noised the target at t = 40
whatever its noise level said (``published_quirks``); the clean variant uses
``noise_level``. ``crops`` [P, R, passes, 2] and ``noise`` [P, R, passes, C,
h, w] replay a run (``LocatedPoints.crops`` records the crops a run used);
what is not given is drawn per pass from the point's generator: its R crops
(from pass 4 on), then its R noises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from skp_ray.attention import check_images
from skp_ray.correspondence.ldm_maps import (
    check_crop_starts,
    check_replay,
    corner_starts,
    crop_maps,
    crop_side,
    cut_crops,
    draw_crop_start,
    draw_latent_noise,
    image_pixels,
    latent_shape,
    point_generators,
)
from skp_ray.correspondence.ldm_settings import (
    CANVAS,
    LDM_CROP_FRACTION,
    LDM_CROP_MARGIN,
    LDM_LAYERS,
    LDM_TOKEN,
    OPTIMISE_NOISE_LEVEL,
    PUBLISHED_INFERENCE_NOISE_LEVEL,
)
from skp_ray.diffusion import Diffusion, timestep_at
from skp_ray.images import resize_batch

__all__ = ["LocatedPoints", "locate_point", "reduce_maps"]


@dataclass
class LocatedPoints:
    points_yx: torch.Tensor  # [P, 2] float64: (row, col) pixel indices of the target image
    canvas_yx: torch.Tensor  # [P, 2] long: the argmax on the canvas
    scores: torch.Tensor  # [P]: the final map's value there
    crops: torch.Tensor  # [P, R, passes, 2]: the (top, left) each pass used
    maps: torch.Tensor | None = None  # [P, CANVAS, CANVAS] with return_maps


def locate_point(
    diffusion: Diffusion,
    target_image: torch.Tensor,
    contexts: torch.Tensor,
    *,
    passes: int = 20,
    crop_fraction: float = LDM_CROP_FRACTION,
    crop_margin: float = LDM_CROP_MARGIN,
    noise_level: int = OPTIMISE_NOISE_LEVEL,
    layers: Sequence[int] = LDM_LAYERS,
    token: int = LDM_TOKEN,
    image_size: int | None = None,
    crops: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    published_quirks: bool = True,
    max_batch: int = 32,
    return_maps: bool = False,
) -> LocatedPoints:
    """Locate, in ``target_image`` [3, H, W] in [0, 1], the point of each context set: ``contexts``
    [R, T, D] for one point or [P, R, T, D]; see the module's docstring."""
    check_images(target_image[None])
    contexts = contexts[None] if contexts.ndim == 3 else contexts
    if contexts.ndim != 4 or contexts.shape[-1] != diffusion.context_dim:
        raise ValueError(f"contexts must be [R, T, {diffusion.context_dim}] or [P, R, T, {diffusion.context_dim}]; got {tuple(contexts.shape)}")
    if passes < 1 or max_batch < 1:
        raise ValueError(f"need passes >= 1 and max_batch >= 1; got {passes}, {max_batch}")
    count, restarts = contexts.shape[:2]
    image_size = image_size or diffusion.image_size
    side = crop_side(crop_fraction)
    latent = latent_shape(diffusion, image_size)
    check_replay("crops", crops, (count, restarts, passes, 2))
    check_replay("noise", noise, (count, restarts, passes, *latent))
    check_crop_starts(crops, side)
    generators = point_generators(generator, count)
    timestep = timestep_at(diffusion, PUBLISHED_INFERENCE_NOISE_LEVEL if published_quirks else noise_level)

    height, width = target_image.shape[-2:]
    canvas = resize_batch(target_image[None].float(), CANVAS)[0].to(diffusion.device)
    flat_contexts = contexts.flatten(0, 1)
    sums = torch.zeros(len(flat_contexts), len(layers), CANVAS, CANVAS, device=diffusion.device)
    coverage = torch.zeros(len(flat_contexts), 1, CANVAS, CANVAS, device=diffusion.device)
    used = []
    for step in range(passes):
        if crops is not None:
            starts = crops[:, :, step].flatten(0, 1)
        else:
            starts = _pass_starts(step, sums, coverage, restarts, side, crop_margin, generators)
        if noise is not None:
            pass_noise = noise[:, :, step].flatten(0, 1)
        else:
            pass_noise = torch.cat([draw_latent_noise((restarts, *latent), g, published_quirks=published_quirks) for g in generators])
        with torch.no_grad():
            for chunk in torch.arange(len(starts)).split(max_batch):
                chunk_maps = crop_maps(
                    diffusion,
                    cut_crops(canvas, starts[chunk], side, image_size),
                    flat_contexts[chunk],
                    timestep=timestep,
                    noise=pass_noise[chunk].to(diffusion.device),
                    layers=layers,
                    token=token,
                    out_side=side,
                    published_quirks=published_quirks,
                )
                for index, (top, left), crop in zip(chunk.tolist(), starts[chunk].tolist(), chunk_maps):
                    sums[index, :, top : top + side, left : left + side] += crop
                    coverage[index, :, top : top + side, left : left + side] += 1
        used.append(starts.reshape(count, restarts, 2))

    per_context = _covered_mean(sums, coverage)
    final = reduce_maps(per_context.reshape(count, restarts, *per_context.shape[1:]).mean(dim=1))
    canvas_yx, scores = _argmax(final)
    return LocatedPoints(
        points_yx=image_pixels(canvas_yx, height, width),
        canvas_yx=canvas_yx,
        scores=scores,
        crops=torch.stack(used, dim=2),
        maps=final.cpu() if return_maps else None,
    )


def reduce_maps(layer_maps: torch.Tensor) -> torch.Tensor:
    """[N, L, S, S] -> [N, S, S]: a softmax over all pixels of each layer's map, then the mean over layers."""
    count, layers, size, _ = layer_maps.shape
    return layer_maps.reshape(count, layers, -1).softmax(dim=-1).mean(dim=1).reshape(count, size, size)


def _covered_mean(sums: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """The canvas divided by its coverage; a pixel no crop covered is 0."""
    return torch.where(coverage > 0, sums / coverage.clamp(min=1), torch.zeros_like(sums))


def _argmax(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) [N, 2] of each map's first maximum in row-major order, and the maximum [N]."""
    flat = maps.flatten(1)
    scores, index = flat.max(dim=1)  # ties: the first index (torch's max returns the first)
    size = maps.shape[-1]
    return torch.stack([index // size, index % size], dim=1).cpu(), scores.cpu()


def _pass_starts(step, sums, coverage, restarts, side, margin, generators) -> torch.Tensor:
    """[N, 2]: a corner for the first four passes, else a crop around each context's running argmax."""
    corners = corner_starts(side)
    if step < len(corners):
        return torch.tensor([corners[step]], dtype=torch.long).expand(len(sums), 2)
    running, _ = _argmax(reduce_maps(_covered_mean(sums, coverage)))
    centers = running.to(torch.float64) + 0.5
    starts = [draw_crop_start(center, side, margin, generators[index // restarts]) for index, center in enumerate(centers)]
    return torch.stack(starts)
