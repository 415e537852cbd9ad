import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from skp_ray.diffusion import (
    add_noise,
    default_tiny_model,
    encode_images,
    load_diffusion,
    make_tiny_diffusion,
    timestep_at,
)
from skp_ray.model_source import TINY_MODEL, ModelNotFoundError, model_location


def test_tiny_model_has_sd15_topology(tiny):
    unet = tiny.unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    cross = {name.split(".")[0] + "." + name.split(".")[1] for name, m in unet.named_modules() if name.endswith("attn2")}
    assert cross == {"down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block.attentions", "up_blocks.1", "up_blocks.2", "up_blocks.3"}
    assert tiny.vae_scale_factor == 8 and tiny.image_size == 512
    latents = encode_images(tiny, torch.rand(1, 3, 512, 512))
    assert latents.shape == (1, 4, 64, 64)


def test_tiny_model_tokenizer_and_text_encoder_load(tiny):
    ids = tiny.tokenizer("a photo of a bird", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    assert ids[0, 0] == tiny.tokenizer.bos_token_id
    hidden = tiny.text_encoder(ids).last_hidden_state
    assert hidden.shape == (1, 77, tiny.context_dim)


def test_tiny_model_is_seeded(tmp_path, tiny_model_path):
    again = make_tiny_diffusion(tmp_path / "again", seed=0)
    other = make_tiny_diffusion(tmp_path / "other", seed=1)
    reference = load_file(f"{tiny_model_path}/unet/diffusion_pytorch_model.safetensors")
    same = load_file(f"{again}/unet/diffusion_pytorch_model.safetensors")
    different = load_file(f"{other}/unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert not all(torch.equal(reference[k], different[k]) for k in reference)


def test_scheduler_follows_spec_timesteps_and_noise(tiny):
    assert tiny.timesteps.tolist() == list(range(980, -1, -20))
    assert int(timestep_at(tiny, -1)) == 0 and int(timestep_at(tiny, 0)) == 980
    # scaled_linear betas re-derived in float64: linspace of square roots, squared.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    for level, t in ((-1, 0), (-2, 20), (0, 980)):
        expected = np.sqrt(alphas_cumprod[t]) * latents.double() + np.sqrt(1 - alphas_cumprod[t]) * noise.double()
        noisy = add_noise(tiny, latents, timestep_at(tiny, level), noise=noise)
        # float32 arithmetic on values up to about 4: a few float32 ulps (~5e-7 each) of absolute slack
        torch.testing.assert_close(noisy.double(), expected, rtol=1e-5, atol=2e-6)
    assert abs(np.sqrt(alphas_cumprod[0]) - 0.99957) < 1e-5


def test_noise_draws_follow_the_generator(tiny):
    latents = torch.zeros(1, 4, 8, 8)
    t = timestep_at(tiny, 0)
    first = add_noise(tiny, latents, t, generator=torch.Generator().manual_seed(3))
    second = add_noise(tiny, latents, t, generator=torch.Generator().manual_seed(3))
    third = add_noise(tiny, latents, t, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, second) and not torch.equal(first, third)


def test_noise_level_out_of_range_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="noise_level 50 is out of range"):
        timestep_at(tiny, 50)


def test_encode_images_uses_posterior_mean_and_scaling_factor(tiny):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    latents = encode_images(tiny, images)
    moments = tiny.vae.quant_conv(tiny.vae.encoder(images * 2 - 1))
    mean = moments[:, :4]
    torch.testing.assert_close(latents, mean * 0.18215)
    assert not latents.requires_grad


def test_load_in_float64_without_text_encoder(tiny_model_path):
    model = load_diffusion(tiny_model_path, dtype=torch.float64, text_encoder=False)
    assert model.dtype == torch.float64 and model.vae.dtype == torch.float64
    assert model.text_encoder is None and model.tokenizer is None
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert model.model_id == tiny_model_path


def test_missing_local_folder_is_one_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_diffusion(tmp_path / "nowhere")


def test_missing_hub_model_names_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    with pytest.raises(ModelNotFoundError) as error:
        load_diffusion("no-such-org/no-such-model", local_files_only=True)
    message = str(error.value)
    assert "no-such-org/no-such-model" in message
    assert "HF_HOME" in message and "offline" in message and "local folder" in message
    assert "hf_secret_value_123" not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_folder_that_is_not_a_pipeline_says_what_it_needs(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="must hold model_index.json, unet/, vae/ and scheduler/"):
        load_diffusion(tmp_path)


def test_unreachable_hub_fails_at_once_without_retries(monkeypatch):
    import huggingface_hub

    asked = []

    def unreachable(self, repo_id, **kwargs):
        asked.append(repo_id)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(ModelNotFoundError, match="could not be fetched from the Hugging Face hub") as error:
        load_diffusion("some-org/some-model", local_files_only=False)
    assert asked == ["some-org/some-model"]
    assert "Name or service not known" in str(error.value)


def test_default_tiny_model_is_built_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SKP_RAY_CACHE", str(tmp_path))
    folder = default_tiny_model()
    stamp = os.stat(Path(folder) / "unet" / "config.json").st_mtime_ns
    assert default_tiny_model() == folder
    assert os.stat(Path(folder) / "unet" / "config.json").st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-sd15-v2"]  # no staging folders left
    assert model_location(None) == model_location(TINY_MODEL) == folder
    assert model_location("some/hub-id") == "some/hub-id"
