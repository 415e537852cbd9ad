"""Loading a Stable Diffusion model, the embedded tiny models (SD 1.5 and SD 2.1 shapes),
replacement UNet weights, latents and noise.

The model is read with diffusers' ``from_pretrained`` from a hub id or a local
pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``scheduler/`` and,
when present, ``text_encoder/`` and ``tokenizer/``). The hub token, where one
is needed, comes only from the ``HF_TOKEN`` environment variable.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel

from skp_ray.model_source import (
    DTYPE_NAMES,
    NUM_INFERENCE_STEPS,
    TINY_MODEL,
    TINY_SD21_MODEL,
    from_folder_cache_or_hub,
    hub_weights_file,
    model_source,
    tiny_model_folder,
    weights_missing_message,
    weights_source,
)

# The weight precisions a job can ask for by name (--dtype).
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass
class Diffusion:
    """A frozen Stable Diffusion model, the parts the keypoint methods use."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDIMScheduler
    model_id: str
    revision: str | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: object | None = None

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """The side, in pixels, that the model was trained on (512 for SD 1.5)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def context_dim(self) -> int:
        return self.unet.config.cross_attention_dim

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps


def load_diffusion(
    model: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    text_encoder: bool = True,
    local_files_only: bool | None = None,
    channels_last_vae: bool = False,
    compile_unet: bool = False,
) -> Diffusion:
    """Load a frozen Stable Diffusion model from a hub id or a local folder.

    ``text_encoder=False`` skips the text encoder and tokenizer (Stable
    Keypoints feeds its learned context straight to the UNet and needs
    neither). A hub id is read from the Hugging Face cache when it is there;
    otherwise, unless ``local_files_only`` (default: ``HF_HUB_OFFLINE``), the
    hub is asked once whether the model can be fetched before downloading it,
    so a model that cannot be had fails at once with one clear error.

    ``channels_last_vae`` stores the VAE encoder's weights channels-last (NHWC),
    and ``encode_images`` then feeds it channels-last pixels: the layout
    cuDNN's fastest convolutions want on a GPU; the same latents up to
    rounding. ``compile_unet`` compiles, with ``torch.compile``, the UNet's
    parts that hold no captured layer (see :func:`compile_uncaptured`); the
    first calls then take longer while it compiles.
    """
    source = model_source(model)
    parts = from_folder_cache_or_hub(
        model, revision, local_files_only, lambda hub: _load_parts(source, dtype, text_encoder, hub)
    )
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.to(device).eval().requires_grad_(False)
    if channels_last_vae:
        for module in (parts["vae"].encoder, parts["vae"].quant_conv):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if compile_unet:
        compile_uncaptured(parts["unet"])
    return Diffusion(model_id=str(model), revision=revision, **parts)


def compile_uncaptured(unet: UNet2DConditionModel) -> list[str]:
    """``torch.compile`` in place the UNet's blocks that hold no captured layer; returns their names.

    The captured cross-attention layers get a new processor on every map
    capture and the last one ends the UNet call with an exception, neither of
    which a compiled graph survives without recompiling; so a block holding a
    captured layer stays eager and only its ResNets are compiled. The
    uncaptured blocks (all down blocks, the mid block, the lowest up block)
    are most of the work, the 64 x 64 level above all.
    """
    from skp_ray.attention import captured_layer_names  # attention imports this module

    captured = captured_layer_names(unet)
    compiled = []
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)] + [("mid_block", unet.mid_block)]
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for name, block in blocks:
        if block is None:
            continue
        if any(layer.startswith(name + ".") for layer in captured):
            targets = [(f"{name}.resnets.{i}", resnet) for i, resnet in enumerate(block.resnets)]
        else:
            targets = [(name, block)]
        for target_name, target in targets:
            target.compile()
            compiled.append(target_name)
    return compiled


def _load_parts(source: str, dtype: torch.dtype, text_encoder: bool, hub: dict) -> dict:
    index = DiffusionPipeline.load_config(source, **hub)
    parts = dict(
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **hub),
        vae=AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **hub),
        scheduler=spec_scheduler(DDIMScheduler.load_config(source, subfolder="scheduler", **hub)),
    )
    if text_encoder and index.get("text_encoder", [None])[0] and index.get("tokenizer", [None])[0]:
        parts["text_encoder"], parts["tokenizer"] = _load_text_encoder(source, index, dtype, hub)
    return parts


def _load_text_encoder(source: str, index: dict, dtype: torch.dtype, hub: dict):
    import transformers

    encoder_class = getattr(transformers, index["text_encoder"][1])
    tokenizer_class = getattr(transformers, index["tokenizer"][1])
    encoder = encoder_class.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **hub)
    tokenizer = tokenizer_class.from_pretrained(source, subfolder="tokenizer", **hub)
    return encoder, tokenizer


# --- replacement UNet weights (e.g. CleanDIFT's noise-free SD 2.1 UNet) ---------------------


def load_unet_weights(diffusion: Diffusion, location: str | os.PathLike, *, revision: str | None = None) -> None:
    """Replace ``diffusion.unet``'s weights, in place, with a safetensors state dict; keeps dtype and device.

    ``location``: a local path, a ``file://`` or other fsspec URL (``s3://...``)
    of a ``.safetensors`` file, or a hub reference ``<owner>/<repo>/<path in
    repo>.safetensors`` (read from the Hugging Face cache or downloaded, at
    ``revision``; the token only from ``HF_TOKEN``); a relative path that exists
    is read as a local file first. The keys must be exactly the
    UNet's (strict): anything else is a ValueError that lists the differences.
    """
    state = _read_unet_state(location, revision)
    _check_unet_state(diffusion.unet, state, location)
    diffusion.unet.load_state_dict(state, strict=True)


def _read_unet_state(location, revision: str | None) -> dict[str, torch.Tensor]:
    """The state dict in the file, on the CPU (load_state_dict then copies it to the UNet's device and dtype)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes
    from safetensors.torch import load_file

    kind, where = weights_source(location)
    if kind == "hub":
        kind, where = "local", hub_weights_file(location, where, revision)
    try:
        if kind == "local":
            return load_file(where)
        import fsspec

        with fsspec.open(where, "rb") as file:
            return load_bytes(file.read())
    except FileNotFoundError:
        raise FileNotFoundError(weights_missing_message(location)) from None
    except SafetensorError as error:
        raise ValueError(
            f"UNet weights {os.fspath(location)!r} are not a readable safetensors file ({error}); "
            "save the UNet's state dict with safetensors.torch.save_file."
        ) from None


def _check_unet_state(unet: UNet2DConditionModel, state: dict, location) -> None:
    expected = unet.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshapen = sorted(
        f"{key} {tuple(state[key].shape)} (UNet: {tuple(expected[key].shape)})"
        for key in expected.keys() & state.keys()
        if state[key].shape != expected[key].shape
    )
    if not (missing or unexpected or misshapen):
        return

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")

    problems = [
        f"{label}: {some(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
        if keys
    ]
    raise ValueError(
        f"UNet weights {os.fspath(location)!r} do not fit this model's UNet ({len(state)} tensors in the file, "
        f"{len(expected)} in the UNet); " + "; ".join(problems) + ". The file must be a full state dict of the "
        "same diffusers UNet2DConditionModel architecture (e.g. CleanDIFT's SD 2.1 UNet for an SD 2.1 model), "
        "with diffusers' key names (unet.state_dict(); convert an original-format checkpoint first)."
    )


def spec_scheduler(config: dict) -> DDIMScheduler:
    """DDIM on the model's betas, with SPEC 1.1's timesteps 980, 960, ..., 0.

    SD 1.5 ships a PNDM config with ``steps_offset=1`` (timesteps 981, ..., 1);
    the published method builds DDIM with no offset, so the offset is reset.
    """
    scheduler = DDIMScheduler.from_config(
        config,
        steps_offset=0,
        timestep_spacing="leading",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    scheduler.set_timesteps(NUM_INFERENCE_STEPS)
    return scheduler


def encode_images(diffusion: Diffusion, images: torch.Tensor) -> torch.Tensor:
    """Latents of images [B, 3, S, S] in [0, 1]: the VAE posterior mean x scaling factor, no gradient."""
    vae = diffusion.vae
    with torch.no_grad():
        pixels = images.to(device=vae.device, dtype=vae.dtype) * 2 - 1
        if _encoder_is_channels_last(vae):
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        return latents.contiguous()  # the UNet's usual layout


def _encoder_is_channels_last(vae: AutoencoderKL) -> bool:
    """Whether ``load_diffusion(channels_last_vae=True)`` stored the encoder channels-last (its first
    convolution's weight [C, 3, 3, 3] tells: its strides differ between the two layouts)."""
    weight = vae.encoder.conv_in.weight
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def timestep_at(diffusion: Diffusion, noise_level: int) -> torch.Tensor:
    """The DDIM timestep that ``noise_level`` indexes (-1, the default, is t = 0)."""
    timesteps = diffusion.timesteps
    if not -len(timesteps) <= noise_level < len(timesteps):
        raise ValueError(
            f"noise_level {noise_level} is out of range: it indexes the {len(timesteps)} DDIM timesteps "
            f"({int(timesteps[0])}, ..., {int(timesteps[-1])}); use -{len(timesteps)}..{len(timesteps) - 1}."
        )
    return timesteps[noise_level]


def add_noise(
    diffusion: Diffusion,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noise latents to ``timestep``: a fresh standard Gaussian unless ``noise`` is given.

    The draw happens on the generator's device, so a CPU generator gives the
    same noise whichever device the model is on.
    """
    if noise is None:
        draw_device = generator.device if generator is not None else latents.device
        noise = torch.randn(latents.shape, generator=generator, device=draw_device, dtype=torch.float32)
    elif noise.shape != latents.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; it must match the latents {tuple(latents.shape)}.")
    # At least float32: bfloat16 rounds sqrt(1 - alpha_bar) at t = 0 (0.029) to 0 and would drop the noise.
    working = torch.promote_types(latents.dtype, torch.float32)
    noise = noise.to(device=latents.device, dtype=working)
    noisy = diffusion.scheduler.add_noise(latents.to(working), noise, timestep.reshape(1).to(latents.device))
    return noisy.to(latents.dtype)


# --- the embedded tiny model --------------------------------------------------------------

# SD 1.5's topology at toy width: 4 UNet levels, cross-attention in down blocks 0-2, the mid
# block and up blocks 1-3, two layers per down block (three per up block); the VAE has four
# levels (8x downsampling) and the UNet's native latent side is 64, so images are 512 px.
TINY_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=2,
    attention_head_dim=2,
    cross_attention_dim=32,
    norm_num_groups=8,
)
TINY_VAE = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    norm_num_groups=8,
)
# The real SD 1.5 UNet's shape (stable-diffusion-v1-5/unet/config.json), for tests and
# benchmarks that need the full-size network with random weights (~860 M parameters).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
# The real SD 1.5 VAE's shape (stable-diffusion-v1-5/vae/config.json), for benchmarks.
SD15_VAE = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
)
# SD 1.5's scheduler config, offset and all, so the loader's DDIM conversion is exercised.
SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


# Random initialisation leaves cross-attention almost uniform over the tokens, where a trained
# model's maps are peaked and respond to the context. Scaling the query and key projections of the
# cross-attention layers (logits x gain^2) gives the tiny model that behaviour, so that a short
# discovery run on it visibly lowers the loss.
TINY_ATTENTION_GAIN = 4.0


def _sharpen_cross_attention(unet: UNet2DConditionModel, gain: float) -> None:
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(gain)
                module.to_k.weight.mul_(gain)


def make_tiny_diffusion(path: str | os.PathLike, *, seed: int = 0) -> str:
    """Write a randomly initialised SD-1.5-shaped pipeline folder and return its path.

    Its keypoints carry no meaning (the weights are random); it exists so the
    whole system runs offline, in seconds, through the same loading path as
    real weights. The same seed writes the same weights.
    """
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        _sharpen_cross_attention(unet, TINY_ATTENTION_GAIN)
        vae = AutoencoderKL(**TINY_VAE)
        encoder = _tiny_text_encoder(TINY_UNET["cross_attention_dim"], pad_token="<|endoftext|>", activation="quick_gelu")
    return _save_tiny_pipeline(path, unet, vae, encoder, SD15_SCHEDULER, pad_token=None)


def _tiny_text_encoder(width: int, *, pad_token: str, activation: str):
    """A two-layer CLIP text encoder over the tiny vocabulary (drawn from torch's current random state)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = _tiny_vocabulary()
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab[pad_token],
            hidden_act=activation,
            hidden_size=width,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
        )
    )


def _save_tiny_pipeline(path: Path, unet, vae, encoder, scheduler: dict, *, pad_token: str | None) -> str:
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    encoder.save_pretrained(path / "text_encoder")
    DDIMScheduler(**scheduler).save_pretrained(path / "scheduler")
    _write_tiny_tokenizer(path / "tokenizer", pad_token=pad_token)
    _write_model_index(path)
    return str(path)


def _tiny_vocabulary() -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary of printable ASCII plus a few merges, as CLIP's files hold it."""
    symbols = [chr(code) for code in range(33, 127)]
    merges = ["o f</w>", "p h", "o t", "ph ot", "phot o</w>"]
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, merges


def _write_tiny_tokenizer(folder: Path, *, pad_token: str | None = None) -> None:
    """CLIP tokenizer files; ``pad_token`` None keeps CLIPTokenizer's default (<|endoftext|>, as SD 1.5)."""
    vocab, merges = _tiny_vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}
    if pad_token is not None:
        specials = {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": pad_token,
        }
        config.update(specials)
        (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _write_model_index(path: Path) -> None:
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


# --- the embedded tiny SD 2.1 model (DIFT's topology) ----------------------------------------

# The real SD 2.1 UNet's shape (stable-diffusion-2-1/unet/config.json). SD 2's quirk:
# ``attention_head_dim`` holds the head COUNTS per level (diffusers reads it as
# num_attention_heads), so every level's heads are 64 wide. 768 px images (sample_size 96).
SD21_UNET = dict(
    sample_size=96,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=32,
)
# SD 2.1 at toy width: the same levels, block types, layers, linear projections, upcast attention
# and head counts in attention_head_dim (1, 2, 4, 4, SD 2.1's 5, 10, 20, 20 over 5: every head
# 8 wide, as SD 2.1's are all 64 wide); sample_size 96 with the 8x tiny VAE, so images are
# 768 px as for SD 2.1. The first level is the narrowest (8) because at 768 px its 96 x 96
# self-attention is most of the CPU time.
TINY_SD21_UNET = dict(
    SD21_UNET,
    block_out_channels=(8, 16, 32, 32),
    cross_attention_dim=32,
    attention_head_dim=(1, 2, 4, 4),
    norm_num_groups=8,
)
TINY_SD21_VAE = dict(TINY_VAE, sample_size=768)
# SD 2.1's scheduler config: the SD 1.5 betas, but the UNet predicts v, not the noise.
SD21_SCHEDULER = dict(SD15_SCHEDULER, prediction_type="v_prediction")
# SD 2.1's tokenizer pads with "!" (OpenCLIP's convention), not with <|endoftext|> as SD 1.5's does.
SD21_PAD_TOKEN = "!"


def make_tiny_sd21(path: str | os.PathLike, *, seed: int = 0) -> str:
    """Write a randomly initialised SD-2.1-shaped pipeline folder and return its path.

    Like ``make_tiny_diffusion``: random weights, offline, seconds, the same
    loading path as the real model; the same seed writes the same weights. The
    text encoder uses gelu (SD 2.1's converted OpenCLIP-H does, SD 1.5's CLIP
    quick_gelu) and the tokenizer pads with "!".
    """
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_SD21_UNET)
        vae = AutoencoderKL(**TINY_SD21_VAE)
        encoder = _tiny_text_encoder(TINY_SD21_UNET["cross_attention_dim"], pad_token=SD21_PAD_TOKEN, activation="gelu")
    return _save_tiny_pipeline(path, unet, vae, encoder, SD21_SCHEDULER, pad_token=SD21_PAD_TOKEN)


def default_tiny_model() -> str:
    """The embedded default model folder, built on first use under the user's cache."""
    return tiny_model_folder(TINY_MODEL)


def default_tiny_sd21() -> str:
    """The embedded tiny SD-2.1-shaped model folder, built once under the user's cache like ``default_tiny_model``."""
    return tiny_model_folder(TINY_SD21_MODEL)
