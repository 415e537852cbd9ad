"""Detection's fast path (issue 16): copies of several images per UNet call, latent-space augmentation,
a channels-last VAE, the compile option, and the attention processors the loaded UNet runs."""

from types import SimpleNamespace

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import skp_ray.detection as detection
from skp_ray.attention import CaptureProcessor, capture_maps, captured_layer_names, run_unet
from skp_ray.detection import default_copies_per_call, detect_with_confidence, draw_augmentations
from skp_ray.diffusion import SD15_UNET, SD15_VAE, encode_images, load_diffusion
from skp_ray.geometry import random_affine

SMALL = dict(image_size=128, feature_upsample_res=32, layers=(0, 1), degrees=10.0, scale=(0.9, 1.0))
INDICES = [5, 2, 7]


class _RowCounter:
    """Wraps a callable and records the batch size (rows of its first tensor argument) of every call."""

    def __init__(self, wrapped, position=1):
        self.wrapped, self.position, self.rows = wrapped, position, []

    def __call__(self, *args, **kwargs):
        batch = args[self.position] if args[self.position] is not None else kwargs["latents"]
        self.rows.append(len(batch))
        return self.wrapped(*args, **kwargs)


def _images_and_context(count=3):
    images = torch.rand(count, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    context = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    return images, context


@pytest.mark.parametrize("copies_per_call", [1, 4, 7, 30])
def test_copies_of_several_images_per_call_answer_as_one_image_at_a_time(tiny64, monkeypatch, copies_per_call):
    # In float64, so that the kernels' batch-size-dependent rounding stays far below the tolerance
    # (in float32 a peak moves by up to 1.2e-6, 6e-6 relative, between batches of 1 and of 3 copies).
    tiny = tiny64
    images, context = _images_and_context()
    seeds, count = [4, 5, 6], 3
    alone = [
        detect_with_confidence(tiny, image[None], context, INDICES, augmentation_iterations=count,
                               generator=torch.Generator().manual_seed(seed), copies_per_call=count, **SMALL)
        for image, seed in zip(images, seeds)
    ]  # fmt: skip
    draws = [draw_augmentations(tiny, torch.Generator().manual_seed(s), augmentation_iterations=count, **SMALL) for s in seeds]
    thetas, noise = torch.stack([t for t, _ in draws]), torch.stack([n for _, n in draws])
    spy = _RowCounter(detection.attention_maps)
    monkeypatch.setattr(detection, "attention_maps", spy)
    together = detect_with_confidence(
        tiny, images, context, INDICES, thetas=thetas, noise=noise, copies_per_call=copies_per_call, **SMALL
    )
    total = len(images) * count
    assert spy.rows == [min(copies_per_call, total - start) for start in range(0, total, copies_per_call)]
    for i, single in enumerate(alone):
        torch.testing.assert_close(together.keypoints[i], single.keypoints[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(together.peaks[i], single.peaks[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(together.augmentation_keypoints[i], single.augmentation_keypoints[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(together.peak_share[i], single.peak_share[0], atol=1e-6, rtol=0)


def test_a_generator_draws_as_one_call_per_image_whatever_the_chunks(tiny):
    images, context = _images_and_context(2)
    runs = [
        detect_with_confidence(tiny, images, context, INDICES, augmentation_iterations=3,
                               generator=torch.Generator().manual_seed(2), copies_per_call=chunk, **SMALL)
        for chunk in (1, 5, 6)
    ]  # fmt: skip
    # the order one call per image drew in: all B x A transforms, then each image's A latent noises
    generator = torch.Generator().manual_seed(2)
    thetas = random_affine(6, degrees=10.0, scale=(0.9, 1.0), generator=generator).unflatten(0, (2, 3))
    noise = torch.stack([torch.randn(3, 4, 16, 16, generator=generator) for _ in range(2)])
    replayed = detect_with_confidence(tiny, images, context, INDICES, thetas=thetas, noise=noise, copies_per_call=3, **SMALL)
    for run in runs:  # float32: the kernels round a little differently at other batch sizes
        torch.testing.assert_close(run.keypoints, replayed.keypoints, atol=1e-6, rtol=0)
        torch.testing.assert_close(run.peaks, replayed.peaks, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="copies_per_call must be at least 1"):
        detect_with_confidence(tiny, images, context, INDICES, augmentation_iterations=1, copies_per_call=0, **SMALL)


def _model_of_shapes(unet: dict, vae: dict, dtype, device="cpu"):
    """Just what default_copies_per_call reads from a Diffusion, for shapes too big to build on a CPU."""
    return SimpleNamespace(
        unet=SimpleNamespace(config=SimpleNamespace(**unet)),
        vae=SimpleNamespace(config=SimpleNamespace(**vae)),
        vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
        dtype=dtype,
        device=torch.device(device),
    )


def test_the_default_copies_per_call_follows_the_memory_budget(tiny):
    sd15 = _model_of_shapes(SD15_UNET, SD15_VAE, torch.float16)
    # SD 1.5 in float16 at 512 px: 6 x 2 B x (128 x 512^2 + 320 x 64^2) + 4 B x (3 x 512^2 + 10 x 128^2)
    # = 402.6 MiB a copy, so 64 GiB hold 162 copies (60 GiB, half an H200's free 120 GiB, hold 152).
    per_copy = 6 * 2 * (128 * 512**2 + 320 * 64**2) + 4 * (3 * 512**2 + 10 * 128**2)
    assert default_copies_per_call(sd15, 512, budget_bytes=64 * 2**30) == 64 * 2**30 // per_copy == 162
    in_float32 = _model_of_shapes(SD15_UNET, SD15_VAE, torch.float32)
    assert default_copies_per_call(in_float32, 512, budget_bytes=64 * 2**30) == 81
    assert default_copies_per_call(sd15, 512, budget_bytes=0) == 1  # never none
    assert default_copies_per_call(sd15, 256, budget_bytes=64 * 2**30) == 648  # a quarter of the pixels: 4x
    assert default_copies_per_call(tiny, 128) == detection.CPU_MEMORY_BUDGET // (
        6 * 4 * (8 * 128**2 + 16 * 16**2) + 4 * (3 * 128**2 + 10 * 128**2)
    )


def test_latent_augmentation_encodes_each_image_once(tiny, monkeypatch):
    images, context = _images_and_context()
    options = dict(SMALL, augmentation_iterations=4, copies_per_call=5, generator=torch.Generator().manual_seed(3))
    encode = _RowCounter(tiny.vae.encode, position=0)
    monkeypatch.setattr(tiny.vae, "encode", encode)
    exact = detect_with_confidence(tiny, images, context, INDICES, **options)
    assert encode.rows == [5, 5, 2]  # every copy of every image
    encode.rows.clear()
    options["generator"] = torch.Generator().manual_seed(3)
    latent = detect_with_confidence(tiny, images, context, INDICES, tta_latent=True, **options)
    assert encode.rows == [3]  # each image once
    for name in ("keypoints", "peaks", "augmentation_keypoints", "peak_share"):
        assert getattr(latent, name).shape == getattr(exact, name).shape
    assert ((latent.keypoints >= 0) & (latent.keypoints <= 1)).all()
    # An identity warp of the latent is the latent: then the two modes see the same UNet inputs.
    identity = torch.eye(2, 3).expand(3, 2, 2, 3)
    noise = torch.randn(3, 2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    same = dict(SMALL, thetas=identity, noise=noise, copies_per_call=6)
    exact = detect_with_confidence(tiny, images, context, INDICES, **same)
    latent = detect_with_confidence(tiny, images, context, INDICES, tta_latent=True, **same)
    torch.testing.assert_close(latent.keypoints, exact.keypoints, atol=1e-6, rtol=0)
    torch.testing.assert_close(latent.peaks, exact.peaks, atol=1e-6, rtol=1e-5)


def test_a_channels_last_vae_encodes_as_the_plain_one(tiny, tiny_model_path):
    channels_last = load_diffusion(tiny_model_path, text_encoder=False, channels_last_vae=True)
    assert channels_last.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not tiny.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    plain, fast = encode_images(tiny, images), encode_images(channels_last, images)
    assert fast.is_contiguous()
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))


def test_compile_is_off_by_default_and_leaves_the_captured_layers_eager(tiny, tiny_model_path):
    def compiled(unet):
        return {name for name, module in unet.named_modules() if getattr(module, "_compiled_call_impl", None) is not None}

    assert compiled(tiny.unet) == set()
    unet = load_diffusion(tiny_model_path, text_encoder=False, compile_unet=True).unet  # compiles on first call only
    names = compiled(unet)
    assert {"down_blocks.0", "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1.resnets.0"} <= names
    captured = captured_layer_names(unet)
    assert not any(layer.startswith(name + ".") for name in names for layer in captured)


def test_every_attention_layer_runs_sdpa_and_the_capture_keeps_it(tiny):
    processors = tiny.unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    timestep = tiny.timesteps[-1]
    with torch.no_grad():
        plain = tiny.unet(latents, timestep, encoder_hidden_states=context).sample
        captured = captured_layer_names(tiny.unet)
        with capture_maps(tiny.unet, captured, upsample_res=32, stop_early=False, fast_capture=True) as maps:
            wrapped = [tiny.unet.get_submodule(name).processor for name in captured]
            others = [p for name, p in tiny.unet.attn_processors.items() if name.rsplit(".", 1)[0] not in captured]
            outputs = []
            hook = tiny.unet.register_forward_hook(lambda module, inputs, output: outputs.append(output.sample))
            run_unet(tiny.unet, latents, timestep, context)
            hook.remove()
    assert all(isinstance(p, CaptureProcessor) and isinstance(p.processor, AttnProcessor2_0) for p in wrapped)
    assert others and all(isinstance(p, AttnProcessor2_0) for p in others)
    assert len(maps) == len(captured)
    assert torch.equal(outputs[0], plain)  # the captured layers' own outputs are the wrapped processor's
    assert all(isinstance(p, AttnProcessor2_0) for p in tiny.unet.attn_processors.values())  # restored
