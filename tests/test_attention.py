import math

import pytest
import torch
import torch.nn.functional as F

from skp_ray.attention import attention_maps, captured_layer_names

SD15_CAPTURED = [
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2",
    "up_blocks.2.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.2.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.2.attentions.2.transformer_blocks.0.attn2",
]


def _inputs(batch=2, tokens=6, width=32, size=256, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator).to(dtype)
    context = torch.randn(tokens, width, generator=generator).to(dtype)
    noise = torch.randn(batch, 4, size // 8, size // 8, generator=generator).to(dtype)
    return images, context, noise


def test_captured_layers_are_the_small_up_block_cross_attentions(tiny):
    assert captured_layer_names(tiny.unet) == SD15_CAPTURED


def test_maps_have_spec_shape_and_sum_to_one_over_tokens(tiny):
    images, context, noise = _inputs()
    maps = attention_maps(tiny, images, context, noise=noise, image_size=256)
    assert maps.shape == (2, 6, 128, 128)
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(2, 128, 128))
    assert (maps > 0).all()


def _layer_inputs(diffusion, layer_name):
    """Record the hidden states and context that a layer receives during a full UNet call."""
    seen = {}

    def record(module, args, kwargs):
        seen["hidden"] = args[0]
        seen["context"] = kwargs["encoder_hidden_states"]

    return seen, diffusion.unet.get_submodule(layer_name).register_forward_pre_hook(record, with_kwargs=True)


def test_maps_match_spec_formula_recomputed_in_float64(tiny):
    """One layer, recomputed by the SPEC's own recipe: upsample features bicubically, to_q, softmax per head."""
    images, context, noise = _inputs(batch=1)
    name = SD15_CAPTURED[3]
    seen, hook = _layer_inputs(tiny, name)
    try:
        maps = attention_maps(tiny, images, context, layers=(3,), noise=noise, image_size=256)
    finally:
        hook.remove()
    attn = tiny.unet.get_submodule(name)
    hidden = seen["hidden"].double()
    side = math.isqrt(hidden.shape[1])
    grid = hidden.transpose(1, 2).reshape(1, -1, side, side)
    upsampled = F.interpolate(grid, size=(128, 128), mode="bicubic", align_corners=False)
    q = upsampled.flatten(2).transpose(1, 2) @ attn.to_q.weight.double().T  # [1, P, inner]
    k = context.double() @ attn.to_k.weight.double().T  # [T, inner]
    heads, d = attn.heads, q.shape[-1] // attn.heads
    per_head = []
    for h in range(heads):
        logits = q[0, :, h * d : (h + 1) * d] @ k[:, h * d : (h + 1) * d].T / math.sqrt(d)
        per_head.append(torch.softmax(logits, dim=-1))  # [P, T], softmax over tokens
    expected = torch.stack(per_head).mean(0).T.reshape(1, -1, 128, 128)
    torch.testing.assert_close(maps.double(), expected, rtol=1e-4, atol=1e-6)


def test_logit_upsampling_equals_feature_upsampling(tiny):
    images, context, noise = _inputs()
    fast = attention_maps(tiny, images, context, noise=noise, image_size=256)
    reference = attention_maps(tiny, images, context, noise=noise, image_size=256, upsample_logits=False)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)


def test_batched_images_do_not_mix(tiny):
    images, context, noise = _inputs(batch=3)
    together = attention_maps(tiny, images, context, noise=noise, image_size=256)
    alone = attention_maps(tiny, images[1:2], context, noise=noise[1:2], image_size=256)
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=2e-5)


def test_early_exit_equals_full_unet_in_maps_and_context_gradient(tiny):
    images, context, noise = _inputs()
    weights = torch.rand(2, 6, 128, 128, generator=torch.Generator().manual_seed(1))
    results = []
    for stop_early in (True, False):
        leaf = context.clone().requires_grad_(True)
        maps = attention_maps(tiny, images, leaf, noise=noise, image_size=256, stop_early=stop_early)
        (gradient,) = torch.autograd.grad((maps * weights).sum(), leaf)
        results.append((maps.detach(), gradient))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-8)
    assert results[0][1].abs().max() > 0


def test_early_exit_skips_the_rest_of_the_unet_and_restores_processors(tiny):
    calls = []
    hooks = [
        tiny.unet.up_blocks[3].register_forward_hook(lambda *a: calls.append("up3")),
        tiny.unet.conv_out.register_forward_hook(lambda *a: calls.append("out")),
    ]
    before = dict(tiny.unet.attn_processors)
    images, context, noise = _inputs(batch=1)
    try:
        attention_maps(tiny, images, context, noise=noise, image_size=256)
        assert calls == []
        attention_maps(tiny, images, context, noise=noise, image_size=256, layers=(0, 1))
        assert calls == []
        attention_maps(tiny, images, context, noise=noise, image_size=256, stop_early=False)
        assert calls == ["up3", "out"]
    finally:
        for hook in hooks:
            hook.remove()
    after = tiny.unet.attn_processors
    assert all(after[name] is before[name] for name in before)


def test_context_gradient_matches_finite_differences_in_float64(tiny64):
    images, context, noise = _inputs(batch=1, size=128, dtype=torch.float64)
    weights = torch.rand(1, 6, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def objective(ctx):
        maps = attention_maps(tiny64, images, ctx, noise=noise, image_size=128, feature_upsample_res=16)
        return (maps * weights).sum()

    leaf = context.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(objective(leaf), leaf)
    step = 1e-6
    for token, channel in [(0, 0), (2, 5), (5, 31), (3, 17)]:
        bump = torch.zeros_like(context)
        bump[token, channel] = step
        with torch.no_grad():
            numeric = (objective(context + bump) - objective(context - bump)) / (2 * step)
        torch.testing.assert_close(gradient[token, channel], numeric, rtol=1e-5, atol=1e-9)


def test_token_indices_keep_the_full_softmax(tiny):
    images, context, noise = _inputs()
    full = attention_maps(tiny, images, context, noise=noise, image_size=256)
    chosen = attention_maps(tiny, images, context, noise=noise, image_size=256, token_indices=[4, 1])
    torch.testing.assert_close(chosen, full[:, [4, 1]])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(images=torch.rand(2, 4, 64, 64)), r"\[B, 3, H, W\]"),
        (dict(images=torch.rand(3, 64, 64)), r"\[B, 3, H, W\]"),
        (dict(images=torch.rand(1, 3, 64, 64) * 2 - 1), r"must lie in \[0, 1\]"),
        (dict(images=torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)), "floating point"),
        (dict(context=torch.randn(4, 31)), "cross-attention width is 32"),
        (dict(context=torch.randn(1, 4, 32)), r"\[num_tokens, 32\]"),
        (dict(layers=(0, 6)), "layer index 6 does not exist"),
        (dict(layers=()), "layers is empty"),
        (dict(noise_level=50), "noise_level 50 is out of range"),
        (dict(token_indices=[0, 9]), "token_indices"),
    ],
)
def test_bad_input_is_a_clear_value_error(tiny, change, message):
    arguments = dict(images=torch.rand(1, 3, 64, 64), context=torch.randn(4, 32))
    arguments.update(change)
    images, context = arguments.pop("images"), arguments.pop("context")
    with pytest.raises(ValueError, match=message):
        attention_maps(tiny, images, context, image_size=64, **arguments)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_half_precision_maps_on_gpu_match_cpu(tiny_model_path, tiny):
    from skp_ray.diffusion import load_diffusion

    gpu = load_diffusion(tiny_model_path, dtype=torch.float16, device="cuda", text_encoder=False)
    images, context, noise = _inputs()
    on_cpu = attention_maps(tiny, images, context, noise=noise, image_size=256)
    on_gpu = attention_maps(gpu, images.cuda(), context.cuda(), noise=noise.cuda(), image_size=256)
    torch.testing.assert_close(on_gpu.float().cpu(), on_cpu, rtol=0, atol=2e-3)
