"""Cross-attention maps of a learned context, captured with diffusers' attention processors.

SPEC 1.2: the captured layers are the cross-attention (``attn2``) modules of the
UNet's up blocks whose native grid is at most 32 x 32 (SD 1.5: up_blocks[1]
at 16 x 16 and the first layer of up_blocks[2] at 32 x 32). Each one keeps its
usual attention output and also records, per image, the token maps of an
upsampled query grid: softmax over tokens, mean over heads. The UNet stops
after the last captured layer, since nothing later reaches the maps.

The fast capture (``fast_capture=True``, the default) computes the same maps
without ever holding every head's upsampled probabilities: bicubic upsampling
is a fixed linear map, applied as two small matrix products, and the softmax
over tokens runs one (image, head) slab at a time, keeping only the tokens
asked for. Its backward recomputes each slab instead of storing it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from skp_ray.diffusion import Diffusion, add_noise, encode_images, timestep_at
from skp_ray.images import resize_batch

# SPEC 1.2 captures the up-block layers whose native side (at the model's own
# image size) is at most this; for SD 1.5 that is the 16 x 16 and 32 x 32 levels.
MAX_CAPTURE_SIDE = 32


def captured_layer_names(unet: torch.nn.Module) -> list[str]:
    """Module names of the capturable cross-attention layers, in call order."""
    sides = _up_block_sides(unet)
    names = []
    for block_index, block in enumerate(unet.up_blocks):
        if sides[block_index] > MAX_CAPTURE_SIDE:
            continue
        for name, module in block.named_modules():
            if isinstance(module, Attention) and module.is_cross_attention:
                names.append(f"up_blocks.{block_index}.{name}")
    return names


def _up_block_sides(unet: torch.nn.Module) -> list[int]:
    """The latent grid side each up block works at, for the model's own sample size."""
    downsamplings = sum(getattr(block, "downsamplers", None) is not None for block in unet.down_blocks)
    side = unet.config.sample_size // 2**downsamplings
    sides = []
    for block in unet.up_blocks:
        sides.append(side)
        if getattr(block, "upsamplers", None) is not None:
            side *= 2
    return sides


class CaptureProcessor:
    """Runs a layer's usual attention processor and records ``measure(attn, hidden_states, context)``.

    The measure sees the layer's input (after the block's norm) and its
    context; its result is appended to ``sink``, once per call.
    """

    def __init__(self, processor, sink: list[torch.Tensor], measure):
        self.processor = processor
        self.sink = sink
        self.measure = measure

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        output = self.processor(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        self.sink.append(self.measure(attn, hidden_states, encoder_hidden_states))
        return output


def _token_maps_measure(
    upsample_res: int, upsample_logits: bool, token_indices: torch.Tensor | None, fast_capture: bool = False
):
    """SPEC 1.2's measure: ``token_maps`` of the layer, then only ``token_indices`` (all tokens: None)."""

    def measure(attn, hidden_states, context):
        if fast_capture and upsample_logits and attn.norm_q is None:
            return fast_token_maps(attn, hidden_states, context, upsample_res=upsample_res, token_indices=token_indices)
        maps = token_maps(attn, hidden_states, context, upsample_res=upsample_res, upsample_logits=upsample_logits)
        return maps if token_indices is None else maps[:, token_indices]

    return measure


def fast_token_maps(
    attn: Attention,
    hidden_states: torch.Tensor,
    context: torch.Tensor,
    *,
    upsample_res: int,
    token_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """``token_maps`` (upsampled logits) [B, T or K, res, res] with bounded memory and a cheap backward."""
    logits = native_logits(attn, hidden_states, context)
    upsample = bicubic_matrix(logits.shape[-1], upsample_res, dtype=logits.dtype, device=logits.device)
    return HeadMeanSoftmax.apply(logits, upsample, token_indices)


def native_logits(attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The layer's query-key logits [B, heads, T, side, side] at its own grid (at least float32)."""
    side = grid_side(hidden_states)
    queries = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))  # [B, hw, heads, d]
    keys = attn.to_k(context).unflatten(-1, (attn.heads, -1))  # [B, T, heads, d]
    logits = torch.einsum("bnhd,bthd->bhtn", queries, keys) * attn.scale
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).unflatten(-1, (side, side))


def grid_side(hidden_states: torch.Tensor) -> int:
    """The side of the square grid of a layer's input [B, side * side, C]."""
    length = hidden_states.shape[1]
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"cannot capture maps of a non-square grid of {length} positions")
    return side


_BICUBIC_MATRICES: dict = {}


def bicubic_matrix(size_in: int, size_out: int, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """[size_out, size_in]: 1-D bicubic resampling as ``F.interpolate(mode="bicubic", align_corners=False)``
    does it, borders included (read off by resampling the unit vectors), so ``M @ X @ M.T`` upsamples X."""
    key = (size_in, size_out, dtype, str(device))
    if key not in _BICUBIC_MATRICES:
        units = torch.eye(size_in, dtype=torch.float64).reshape(size_in, 1, size_in, 1)
        columns = F.interpolate(units, size=(size_out, 1), mode="bicubic", align_corners=False)
        _BICUBIC_MATRICES[key] = columns[:, 0, :, 0].T.to(device=device, dtype=dtype).contiguous()
    return _BICUBIC_MATRICES[key]


class HeadMeanSoftmax(torch.autograd.Function):
    """Mean over heads of softmax-over-tokens of bicubically upsampled logits, for some tokens.

    ``logits`` [B, H, T, s, s], ``upsample`` [R, s], ``keep`` [K] token indices
    (None: all tokens) -> [B, K, R, R]. Only a block of one head's upsampled
    rows [T, rows, R] exists at a time; the backward recomputes each block's
    probabilities p and uses dL/dU_j = p_j (g_j - sum_k g_k p_k) (g: the
    output's gradient, 0 for tokens not kept), then the upsampling's transpose.
    """

    @staticmethod
    def forward(ctx, logits, upsample, keep):
        batch, heads = logits.shape[:2]
        kept = logits.shape[2] if keep is None else len(keep)
        side = len(upsample)
        maps = logits.new_zeros(batch, kept, side, side)
        shifted = _shifted(logits)
        for image in range(batch):
            for head in range(heads):
                for rows, exponentials, total in _slab_blocks(shifted[image, head], upsample):
                    maps[image, :, rows] += (exponentials if keep is None else exponentials[keep]).div_(total)
        ctx.save_for_backward(logits, upsample, keep)
        return maps.div_(heads)

    @staticmethod
    def backward(ctx, grad_maps):
        logits, upsample, keep = ctx.saved_tensors
        heads = logits.shape[1]
        grad_logits = torch.empty_like(logits)
        shifted = _shifted(logits)
        for image in range(logits.shape[0]):
            grad_kept = grad_maps[image] / heads
            for head in range(heads):
                # dL/dX = M^T G M for U = M X M^T, the first product added up block of rows by block
                grad_columns = logits.new_zeros(logits.shape[2], logits.shape[3], len(upsample))  # [T, s, R]
                for rows, exponentials, total in _slab_blocks(shifted[image, head], upsample):
                    probabilities = exponentials.div_(total)
                    if keep is None:
                        weighted = grad_kept[:, rows] * probabilities
                        grad_upsampled = weighted - probabilities * weighted.sum(dim=0)
                    else:
                        weighted = grad_kept[:, rows] * probabilities[keep]
                        grad_upsampled = probabilities.mul_(-weighted.sum(dim=0)).index_add_(0, keep, weighted)
                    grad_columns += upsample[rows].T @ grad_upsampled
                grad_logits[image, head] = grad_columns @ upsample
        return grad_logits, None, None


def _shifted(logits: torch.Tensor) -> torch.Tensor:
    """Logits [B, H, T, s, s] less their maximum over tokens at each native pixel. The softmax does not
    change, and since upsampling is linear the shift carries over to the upsampled logits: no maximum
    need be taken over the [T, R, R] slabs themselves."""
    return logits - logits.amax(dim=2, keepdim=True)


# The bytes of one block of upsampled rows [T, rows, R], so a slab's working memory stays bounded at
# any map side (SD 1.5 at 128: 32 of 128 rows, instead of 33 MB a slab). Measured on an SD 1.5 layer,
# 2-core CPU: detection's forward unchanged, forward and backward about 15 % faster than whole slabs.
SLAB_BLOCK_BYTES = 8 * 2**20


def _slab_blocks(shifted: torch.Tensor, upsample: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """One head's shifted logits [T, s, s] upsampled to [T, R, R] and exponentiated, a block of rows at a
    time: (the rows, their exponentials [T, rows, R], their sum over tokens [rows, R]); the softmax is the
    ratio, left to the caller so that it divides only the tokens it keeps."""
    tokens, side = len(shifted), len(upsample)
    columns = shifted @ upsample.T  # [T, s, R]: the upsampling's second product, shared by every block
    step = max(1, SLAB_BLOCK_BYTES // (tokens * side * shifted.element_size()))
    for start in range(0, side, step):
        rows = slice(start, start + step)
        exponentials = (upsample[rows] @ columns).exp_()
        total = exponentials.sum(dim=0)
        if not torch.isfinite(total).all() or not (total > 0).all():
            # the bicubic lobes took some pixel's upsampled maximum far from 0: shift by it exactly instead
            upsampled = upsample[rows] @ columns
            exponentials = upsampled.sub_(upsampled.amax(dim=0)).exp_()
            total = exponentials.sum(dim=0)
        yield rows, exponentials, total


def token_maps(
    attn: Attention,
    hidden_states: torch.Tensor,
    context: torch.Tensor,
    *,
    upsample_res: int,
    upsample_logits: bool = True,
) -> torch.Tensor:
    """Per-image token maps [B, T, res, res] of one cross-attention layer (at least float32)."""
    batch, _, channels = hidden_states.shape
    heads = attn.heads
    if upsample_logits and attn.norm_q is None:
        logits = native_logits(attn, hidden_states, context)  # [B, heads, T, side, side]
        logits = _bicubic(logits.flatten(0, 1), upsample_res).unflatten(0, (batch, heads)).flatten(-2)
    else:
        side = grid_side(hidden_states)
        grid = hidden_states.transpose(1, 2).reshape(batch, channels, side, side)
        keys = attn.to_k(context).unflatten(-1, (heads, -1))  # [B, T, heads, d]
        features = _bicubic(grid, upsample_res).flatten(2).transpose(1, 2)  # [B, res*res, C]
        queries = attn.to_q(features)
        if attn.norm_q is not None:
            queries = attn.norm_q(queries.unflatten(-1, (heads, -1))).flatten(-2)
        queries = queries.unflatten(-1, (heads, -1))
        logits = torch.einsum("bnhd,bthd->bhtn", queries, keys) * attn.scale

    # Half-precision models still get a float32 softmax; float64 stays float64.
    probabilities = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=2)  # over tokens
    return probabilities.mean(dim=1).unflatten(-1, (upsample_res, upsample_res))


def _bicubic(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


class _StopUNet(Exception):
    """Raised after the last captured layer: the rest of the UNet cannot change the maps."""


def _stop_unet(module, inputs, output):
    raise _StopUNet


@contextmanager
def capture_attention(
    unet: torch.nn.Module, layer_names: Sequence[str], measure, *, stop_early: bool = True
) -> Iterator[list[torch.Tensor]]:
    """Record ``measure(attn, hidden_states, context)`` at each of ``layer_names`` for the duration;
    yields the list it fills, in call order.

    Other layers keep their own (fast) processors. With ``stop_early`` the UNet
    call raises after the last named layer; ``run_unet`` swallows that.
    """
    sink: list[torch.Tensor] = []
    modules = [unet.get_submodule(name) for name in layer_names]
    originals = [module.processor for module in modules]
    for module, original in zip(modules, originals):
        module.set_processor(CaptureProcessor(original, sink, measure))
    hook = modules[-1].register_forward_hook(_stop_unet) if stop_early else None
    try:
        yield sink
    finally:
        if hook is not None:
            hook.remove()
        for module, original in zip(modules, originals):
            module.set_processor(original)


def capture_maps(
    unet: torch.nn.Module,
    layer_names: Sequence[str],
    *,
    upsample_res: int,
    upsample_logits: bool = True,
    token_indices: torch.Tensor | None = None,
    stop_early: bool = True,
    fast_capture: bool = False,
):
    """``capture_attention`` of SPEC 1.2's token maps [B, T, res, res] (only ``token_indices`` when given)."""
    measure = _token_maps_measure(upsample_res, upsample_logits, token_indices, fast_capture)
    return capture_attention(unet, layer_names, measure, stop_early=stop_early)


@contextmanager
def capture_output(module: torch.nn.Module, *, stop_early: bool = True) -> Iterator[list[torch.Tensor]]:
    """Record ``module``'s output on every call into the yielded list, for the duration.

    With ``stop_early`` the call that reaches ``module`` raises right after it
    (``run_unet`` swallows that), so nothing later in the UNet runs.
    """
    outputs: list[torch.Tensor] = []

    def record(module, inputs, output):
        outputs.append(output)
        if stop_early:
            raise _StopUNet

    hook = module.register_forward_hook(record)
    try:
        yield outputs
    finally:
        hook.remove()


def run_unet(unet: torch.nn.Module, latents, timestep, context) -> None:
    """Call the UNet for its side effects on installed processors, allowing an early stop."""
    try:
        unet(latents, timestep, encoder_hidden_states=context)
    except _StopUNet:
        pass


def attention_maps(
    diffusion: Diffusion,
    images: torch.Tensor | None,
    context: torch.Tensor,
    *,
    layers: Sequence[int] = (0, 1, 2, 3),
    feature_upsample_res: int = 128,
    noise_level: int = -1,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    token_indices: Sequence[int] | torch.Tensor | None = None,
    upsample_logits: bool = True,
    stop_early: bool = True,
    image_size: int | None = None,
    fast_capture: bool = True,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-attention maps [B, T, R, R] of ``context`` [T, D] for images [B, 3, H, W] in [0, 1].

    Images are resized to ``image_size`` (the model's own, 512 for SD 1.5),
    encoded without gradient and noised to ``noise_level`` with ``noise`` or a
    fresh draw from ``generator``; ``latents`` [B, C, h, w] (already encoded)
    replace the images. The maps keep their gradient to the context.
    Each pixel's map sums to 1 over all T tokens; ``token_indices`` then keeps
    only those tokens (the softmax still runs over all of them).
    ``fast_capture=False`` computes the maps the direct way (every head's
    probabilities of every token held at once); the answers are the same up
    to rounding.
    """
    layer_names = selected_layers(diffusion.unet, layers)
    if latents is None:
        check_images(images)
    _check_context(context, diffusion.context_dim)
    if token_indices is not None:
        token_indices = torch.as_tensor(token_indices, dtype=torch.long, device=diffusion.device)
        if token_indices.numel() and not 0 <= int(token_indices.min()) <= int(token_indices.max()) < len(context):
            raise ValueError(f"token_indices must lie in 0..{len(context) - 1} (the context has {len(context)} tokens).")

    if latents is None:
        latents = encode_images(diffusion, resize_batch(images, image_size or diffusion.image_size))
    timestep = timestep_at(diffusion, noise_level)
    noisy = add_noise(diffusion, latents, timestep, noise=noise, generator=generator)
    batch_context = context.to(device=diffusion.device, dtype=diffusion.dtype).expand(len(latents), -1, -1)

    with capture_maps(
        diffusion.unet,
        layer_names,
        upsample_res=feature_upsample_res,
        upsample_logits=upsample_logits,
        token_indices=token_indices,
        stop_early=stop_early,
        fast_capture=fast_capture,
    ) as per_layer:
        run_unet(diffusion.unet, noisy, timestep, batch_context)
    return torch.stack(per_layer).mean(dim=0)


def selected_layers(unet: torch.nn.Module, layers: Sequence[int]) -> list[str]:
    """The names of captured layers ``layers`` (indices into ``captured_layer_names``), checked, in call order."""
    names = captured_layer_names(unet)
    if not layers:
        raise ValueError("layers is empty: name at least one captured layer index.")
    for index in layers:
        if not 0 <= index < len(names):
            raise ValueError(
                f"layer index {index} does not exist: this model has {len(names)} captured cross-attention "
                f"layers (indices 0..{len(names) - 1}: {', '.join(names)})."
            )
    return [names[index] for index in sorted(set(layers))]


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [B, 3, H, W]; got {shape}.")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1]; got {images.dtype} (divide uint8 by 255).")
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > 1:
        raise ValueError(
            f"images must lie in [0, 1]; got values in [{low!r}, {high!r}] "
            "(map [-1, 1] inputs with (x + 1) / 2, uint8 with x / 255)."
        )


def _check_context(context: torch.Tensor, width: int) -> None:
    if not isinstance(context, torch.Tensor) or context.ndim != 2:
        shape = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ValueError(f"context must be a tensor [num_tokens, {width}]; got {shape}.")
    if context.shape[1] != width:
        raise ValueError(
            f"context has width {context.shape[1]}, but the model's cross-attention width is {width}: "
            f"the context must be [num_tokens, {width}]."
        )
