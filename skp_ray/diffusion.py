"""Loading a Stable Diffusion model, the embedded tiny model, latents and noise.

The model is read with diffusers' ``from_pretrained`` from a hub id or a local
pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``scheduler/`` and,
when present, ``text_encoder/`` and ``tokenizer/``). The hub token, where one
is needed, comes only from the ``HF_TOKEN`` environment variable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel

# SPEC 1.1: DDIM with 50 inference steps gives timesteps 980, 960, ..., 20, 0.
NUM_INFERENCE_STEPS = 50


# The weight precisions a job can ask for by name (--dtype).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local pipeline folder nor reachable on the hub or in its cache."""


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
) -> Diffusion:
    """Load a frozen Stable Diffusion model from a hub id or a local folder.

    ``text_encoder=False`` skips the text encoder and tokenizer (Stable
    Keypoints feeds its learned context straight to the UNet and needs
    neither). A hub id is read from the Hugging Face cache when it is there;
    otherwise, unless ``local_files_only`` (default: ``HF_HUB_OFFLINE``), the
    hub is asked once whether the model can be fetched before downloading it,
    so a model that cannot be had fails at once with one clear error.
    """
    source = _model_source(model)
    parts = _from_folder_cache_or_hub(
        model, revision, local_files_only, lambda hub: _load_parts(source, dtype, text_encoder, hub)
    )
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.to(device).eval().requires_grad_(False)
    return Diffusion(model_id=str(model), revision=revision, **parts)


def check_model(model: str | os.PathLike, *, revision: str | None = None, local_files_only: bool | None = None) -> None:
    """Raise ModelNotFoundError, as ``load_diffusion`` would, if the model cannot be had; loads no weights.

    Jobs call it on the driver so that a wrong ``--model`` fails once, at once,
    instead of in every worker. Reads the pipeline's configs (from the folder,
    the cache, or the hub) and, for a local folder, checks that the UNet's and
    the VAE's weight files are there.
    """
    source = _model_source(model)
    _from_folder_cache_or_hub(model, revision, local_files_only, lambda hub: _read_configs(source, hub))
    if Path(source).is_dir():
        for part in ("unet", "vae"):
            if not any(Path(source, part).glob("diffusion_pytorch_model*")):
                missing = FileNotFoundError(f"{part}/ holds no diffusion_pytorch_model weights")
                raise ModelNotFoundError(_not_found_message(str(model), True, missing))


def _from_folder_cache_or_hub(model, revision: str | None, local_files_only: bool | None, read):
    """``read(hub options)`` from the folder or the Hugging Face cache; failing that (unless offline),
    after one quick question to the hub, from the hub. Every failure is one ModelNotFoundError."""
    source = _model_source(model)
    if local_files_only is None:
        from huggingface_hub import constants

        local_files_only = bool(constants.HF_HUB_OFFLINE)
    hub = dict(revision=revision, token=os.environ.get("HF_TOKEN") or None)
    try:
        return read(dict(hub, local_files_only=True))
    except (OSError, ValueError) as error:
        if Path(source).is_dir() or local_files_only:
            raise ModelNotFoundError(_not_found_message(str(model), local_files_only, error)) from None
        problem = _hub_problem(source, hub)
        if problem is not None:
            raise ModelNotFoundError(_not_found_message(str(model), local_files_only, problem)) from None
        return read(dict(hub, local_files_only=False))


def _read_configs(source: str, hub: dict) -> None:
    DiffusionPipeline.load_config(source, **hub)
    UNet2DConditionModel.load_config(source, subfolder="unet", **hub)
    AutoencoderKL.load_config(source, subfolder="vae", **hub)
    DDIMScheduler.load_config(source, subfolder="scheduler", **hub)


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


def _hub_problem(repo_id: str, hub: dict) -> Exception | None:
    """One quick request to the hub: None if the model can be fetched, else what went wrong."""
    from huggingface_hub import HfApi

    try:
        HfApi(token=hub["token"]).model_info(repo_id, revision=hub["revision"], timeout=20)
    except Exception as error:  # network, 401/403 (gated), 404: all end the load the same way
        return error
    return None


def _model_source(model: str | os.PathLike) -> str:
    """A local folder as an absolute path, otherwise the hub id unchanged."""
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path.resolve())
    looks_like_path = text.startswith(("/", ".", "~")) or text.count("/") > 1
    if looks_like_path:
        raise ModelNotFoundError(
            f"Model folder {text!r} does not exist. Pass a folder that holds a diffusers pipeline "
            "(model_index.json, unet/, vae/, scheduler/) or a hub id such as "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5'."
        )
    return text


def _load_text_encoder(source: str, index: dict, dtype: torch.dtype, hub: dict):
    import transformers

    encoder_class = getattr(transformers, index["text_encoder"][1])
    tokenizer_class = getattr(transformers, index["tokenizer"][1])
    encoder = encoder_class.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **hub)
    tokenizer = tokenizer_class.from_pretrained(source, subfolder="tokenizer", **hub)
    return encoder, tokenizer


def _not_found_message(model: str, local_files_only: bool, error: Exception) -> str:
    from huggingface_hub import constants

    # Only the first line of the cause: hub errors can carry request details.
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(model).expanduser().is_dir():
        return (
            f"Could not load the diffusers pipeline in folder {model!r}: it must hold model_index.json, unet/, "
            f"vae/ and scheduler/ (as save_pretrained or make_tiny_diffusion write them).\nCause: {reason}"
        )
    hub = (
        "offline mode is on (HF_HUB_OFFLINE), so the hub was not asked"
        if local_files_only
        else "it could not be fetched from the Hugging Face hub"
    )
    return (
        f"Could not load diffusion model {model!r}: it is not a local folder, it is not in the Hugging Face "
        f"cache at {constants.HF_HUB_CACHE}, and {hub}.\n"
        "To fix: pass a local folder that holds a diffusers pipeline (model_index.json, unet/, vae/, "
        "scheduler/); or point HF_HOME at the cache that holds the model; or allow downloads "
        "(unset HF_HUB_OFFLINE, and set HF_TOKEN in the environment for a gated model).\n"
        f"Cause: {reason}"
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
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


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
    noise = noise.to(device=latents.device, dtype=latents.dtype)
    return diffusion.scheduler.add_noise(latents, noise, timestep.reshape(1).to(latents.device))


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
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    vocab, _ = _tiny_vocabulary()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        _sharpen_cross_attention(unet, TINY_ATTENTION_GAIN)
        vae = AutoencoderKL(**TINY_VAE)
        encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
                hidden_size=TINY_UNET["cross_attention_dim"],
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
            )
        )
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    encoder.save_pretrained(path / "text_encoder")
    DDIMScheduler(**SD15_SCHEDULER).save_pretrained(path / "scheduler")
    _write_tiny_tokenizer(path / "tokenizer")
    _write_model_index(path)
    return str(path)


def _tiny_vocabulary() -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary of printable ASCII plus a few merges, as CLIP's files hold it."""
    symbols = [chr(code) for code in range(33, 127)]
    merges = ["o f</w>", "p h", "o t", "ph ot", "phot o</w>"]
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, merges


def _write_tiny_tokenizer(folder: Path) -> None:
    vocab, merges = _tiny_vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}
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


def default_tiny_model() -> str:
    """The embedded default model folder, built on first use under the user's cache.

    Built in a staging folder and renamed into place, so processes that start
    together (Ray workers, say) never read a half-written model.
    """
    root = Path(os.environ.get("SKP_RAY_CACHE", Path.home() / ".cache" / "skp_ray"))
    folder = root / "tiny-sd15-v2"
    if not (folder / "model_index.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".tiny-sd15-"))
        make_tiny_diffusion(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


# The name artifacts record for the embedded tiny model: its folder is per machine, so each
# process that loads it resolves the name to its own copy.
TINY_MODEL = "skp_ray/tiny-sd15"


def model_location(model: str | None) -> str:
    """Where to load ``model`` from: the embedded tiny model for None or ``TINY_MODEL``, else ``model``."""
    return default_tiny_model() if model in (None, TINY_MODEL) else model
