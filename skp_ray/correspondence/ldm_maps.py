"""What prompt-optimised correspondence (SPEC 3) sees: one token's cross-attention on square crops of a 512 canvas.

Conventions. An image [3, H, W] in [0, 1] is first resized to the canvas,
``CANVAS`` x ``CANVAS`` pixels (aspect not kept). A point is given in pixel
indices of the image, (row, col); on the canvas its continuous position is
``(index + 0.5) * CANVAS / size`` (a pixel's centre is at index + 0.5). A crop
is a square of ``crop_side(crop_fraction)`` canvas pixels (477 at 93.17 %),
named by its top-left corner ``(top, left)``; it is resized to the model's
input side for the UNet.

A context's map on a crop is token ``token``'s cross-attention probability
(softmax over all tokens at the layer's own grid), averaged over the kept
heads and upsampled bilinearly (align_corners=False) to the requested side,
one map per captured layer. The published code kept only the second half of
the heads (``published_quirks``), and noised the latents with uniform U[0, 1)
instead of Gaussian noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from skp_ray.attention import capture_attention, grid_side, run_unet, selected_layers
from skp_ray.correspondence.ldm_settings import CANVAS
from skp_ray.diffusion import Diffusion, add_noise, encode_images
from skp_ray.images import resize_batch


def crop_side(crop_fraction: float) -> int:
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must lie in (0, 1]; got {crop_fraction}")
    return int(CANVAS * crop_fraction)


def canvas_position(points_yx: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Continuous canvas positions [P, 2] of pixel indices ``points_yx`` of an image of height x width."""
    scale = torch.tensor([CANVAS / height, CANVAS / width], dtype=torch.float64)
    return (points_yx.to(torch.float64) + 0.5) * scale


def image_pixels(canvas_yx: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel indices (float) [P, 2] of the image whose canvas pixels are ``canvas_yx`` (centre to centre)."""
    scale = torch.tensor([height / CANVAS, width / CANVAS], dtype=torch.float64)
    return (canvas_yx.to(torch.float64) + 0.5) * scale - 0.5


def draw_crop_start(center: torch.Tensor, side: int, margin: float, generator: torch.Generator) -> torch.Tensor:
    """A random (top, left) [2] of a crop that keeps canvas position ``center`` at least ``margin`` x side
    from the crop's edges; where the canvas does not allow that, the crop goes to the canvas edge."""
    start = []
    for position in center.tolist():
        low = min(max(math.ceil(position - (1 - margin) * side), 0), CANVAS - side)
        high = max(min(math.floor(position - margin * side), CANVAS - side), 0)
        low = min(low, high)
        start.append(int(torch.randint(low, high + 1, (1,), generator=generator)))
    return torch.tensor(start, dtype=torch.long)


def corner_starts(side: int) -> list[tuple[int, int]]:
    """The four corner crops' (top, left): top-left, top-right, bottom-left, bottom-right."""
    far = CANVAS - side
    return [(0, 0), (0, far), (far, 0), (far, far)]


def cut_crops(canvas: torch.Tensor, starts: torch.Tensor, side: int, size: int) -> torch.Tensor:
    """Crops [N, 3, size, size] of canvas [3, CANVAS, CANVAS] at ``starts`` [N, 2] (top, left)."""
    crops = torch.stack([canvas[:, top : top + side, left : left + side] for top, left in starts.tolist()])
    return resize_batch(crops, size)


def draw_latent_noise(shape: Sequence[int], generator: torch.Generator, *, published_quirks: bool) -> torch.Tensor:
    """The noise added to the latents: U[0, 1) as the published code drew it, else standard Gaussian."""
    draw = torch.rand if published_quirks else torch.randn
    return draw(tuple(shape), generator=generator, dtype=torch.float32)


def latent_shape(diffusion: Diffusion, image_size: int) -> tuple[int, int, int]:
    side = image_size // diffusion.vae_scale_factor
    return (diffusion.unet.config.in_channels, side, side)


def gaussian_targets(centers: torch.Tensor, sigma: float, *, published_quirks: bool) -> torch.Tensor:
    """Targets [N, CANVAS, CANVAS]: exp(-d^2 / (2 sigma^2)) around continuous positions ``centers`` [N, 2].

    d is measured from each pixel's centre (index + 0.5); the published code measured it from the
    integer index, which moves the peak half a pixel towards the bottom right.
    """
    grid = torch.arange(CANVAS, dtype=torch.float32, device=centers.device) + (0.0 if published_quirks else 0.5)
    centers = centers.to(torch.float32)
    rows = (grid[None, :] - centers[:, :1]) ** 2  # [N, CANVAS]
    cols = (grid[None, :] - centers[:, 1:]) ** 2
    return torch.exp(-(rows[:, :, None] + cols[:, None, :]) / (2 * sigma**2))


def token_probability_map(
    attn, hidden_states: torch.Tensor, context: torch.Tensor, *, token: int, second_half_heads: bool, out_side: int
) -> torch.Tensor:
    """One layer's map [B, out_side, out_side] of ``token``: softmax over tokens at the layer's own grid,
    mean over the kept heads, bilinear upsampling. Computed in at least float32."""
    batch, side, heads = len(hidden_states), grid_side(hidden_states), attn.heads
    queries = attn.to_q(hidden_states).unflatten(-1, (heads, -1))  # [B, n, heads, d]
    keys = attn.to_k(context).unflatten(-1, (heads, -1))  # [B, T, heads, d]
    if attn.norm_q is not None:
        queries, keys = attn.norm_q(queries), attn.norm_k(keys)
    logits = torch.einsum("bnhd,bthd->bhnt", queries, keys) * attn.scale
    probabilities = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)[..., token]
    if second_half_heads:
        probabilities = probabilities[:, heads // 2 :]
    grid = probabilities.mean(dim=1).reshape(batch, 1, side, side)
    return F.interpolate(grid, size=(out_side, out_side), mode="bilinear", align_corners=False)[:, 0]


def crop_maps(
    diffusion: Diffusion,
    crops: torch.Tensor,
    contexts: torch.Tensor,
    *,
    timestep: torch.Tensor,
    noise: torch.Tensor,
    layers: Sequence[int],
    token: int,
    out_side: int,
    published_quirks: bool,
) -> torch.Tensor:
    """Maps [N, L, out_side, out_side] of contexts [N, T, D] on crops [N, 3, s, s] at the model's input side.

    The crops are encoded without gradient and noised to ``timestep`` with ``noise`` [N, C, h, w]; the
    UNet stops after the last layer of ``layers``. The maps keep their gradient to the contexts.
    """

    def measure(attn, hidden_states, context):
        return token_probability_map(
            attn, hidden_states, context, token=token, second_half_heads=published_quirks, out_side=out_side
        )

    latents = encode_images(diffusion, crops)
    noisy = add_noise(diffusion, latents, timestep, noise=noise)
    with capture_attention(diffusion.unet, selected_layers(diffusion.unet, layers), measure) as per_layer:
        run_unet(diffusion.unet, noisy, timestep, contexts.to(device=diffusion.device, dtype=diffusion.dtype))
    return torch.stack(per_layer, dim=1)


def check_points(points_yx, height: int, width: int) -> torch.Tensor:
    """``points_yx`` as a float64 tensor [P, 2] of (row, col) inside the image (pixel i spans i - 0.5 to
    i + 0.5), or a ValueError naming the first one outside."""
    points = torch.as_tensor(points_yx, dtype=torch.float64)
    if points.ndim != 2 or points.shape[1] != 2 or not len(points):
        raise ValueError(f"points_yx must be [P, 2] (row, col) with P >= 1; got shape {tuple(points.shape)}")
    outside = (points < -0.5).any(dim=1) | (points[:, 0] >= height - 0.5) | (points[:, 1] >= width - 0.5)
    if outside.any():
        row, col = points[int(outside.nonzero()[0])].tolist()
        raise ValueError(f"point (row {row:g}, col {col:g}) lies outside the {width} x {height} image")
    return points


def point_generators(generator, count: int) -> list[torch.Generator]:
    """One generator per point: a sequence of ``count`` as given, one generator shared in point order, or
    (None) a generator seeded 0."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if isinstance(generator, torch.Generator):
        return [generator] * count
    generators = list(generator)
    if len(generators) != count:
        raise ValueError(f"generator: got {len(generators)} generators for {count} points; give one per point or one in all")
    return generators


def check_replay(name: str, tensor: torch.Tensor | None, shape: tuple) -> torch.Tensor | None:
    if tensor is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; it must be {tuple(shape)}")
    return tensor


def check_crop_starts(crops: torch.Tensor | None, side: int) -> None:
    if crops is not None and (int(crops.min()) < 0 or int(crops.max()) > CANVAS - side):
        raise ValueError(f"crops must hold (top, left) corners in 0..{CANVAS - side} (crop side {side} on a {CANVAS} canvas)")
