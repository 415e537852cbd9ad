"""DIFT features (SPEC 2): a diffusion UNet's up-block activations for a lightly noised image.

Conventions. Images are [B, 3, H, W] floats in [0, 1]; each is resized to
``image_size`` x ``image_size`` (aspect not kept), mapped to [-1, 1] and
encoded by the VAE once. Each image then gets E = ``ensemble_size`` copies,
each with its own posterior sample ``(mean + std * eps) * scaling_factor``
and its own noise, added by the scheduler's ``add_noise`` at the raw training
timestep ``timestep`` (0..999 for SD, not an index into the DDIM steps). The
UNet, conditioned on the prompt's text embedding, stops right after
``up_blocks[up_block]``; that block's output (its upsampler included), averaged
over the E copies, is the image's feature map [C, h, w]. For SD 2.1 at 768 px
and up_block 1: 1280 x 48 x 48, 1/16 of the input side.

Randomness: ``eps`` (``latent_noise``) and the added ``noise`` are either
passed in, [B, E, 4, h, w] each with h = w = image_size / 8, or drawn from
``generator`` by ``draw_dift_noise``, latent_noise first. Zeros for both with
timestep 0 give a noise-free feature (CleanDIFT-style weights).
"""

from __future__ import annotations

import operator

import torch

from skp_ray.attention import check_images, capture_output, run_unet
from skp_ray.diffusion import Diffusion, add_noise
from skp_ray.images import resize_batch

# SPEC 2's published settings for semantic matching (geometric matching: t 0, up_blocks[2];
# video propagation: t 51, up_blocks[2]).
DIFT_TIMESTEP = 261
DIFT_UP_BLOCK = 1
DIFT_ENSEMBLE_SIZE = 8
DIFT_IMAGE_SIZE = 768


def dift_features(
    diffusion: Diffusion,
    images: torch.Tensor,
    *,
    prompt: str = "",
    prompt_embeds: torch.Tensor | None = None,
    timestep: int = DIFT_TIMESTEP,
    up_block: int = DIFT_UP_BLOCK,
    ensemble_size: int = DIFT_ENSEMBLE_SIZE,
    image_size: int = DIFT_IMAGE_SIZE,
    latent_noise: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    max_batch: int = 16,
) -> torch.Tensor:
    """DIFT feature maps [B, C, h, w] of images [B, 3, H, W] in [0, 1], on the model's device.

    Float32 (float64 for a float64 model) whatever the model's precision; no
    gradient. ``prompt_embeds`` [1 or B, T, D] replaces ``prompt`` (one row is
    shared by all images; B rows give each image its own, e.g. "a photo of a
    {category}" per image via ``encode_prompt``). ``latent_noise`` and ``noise``
    [B, E, 4, h, w] replace the draws from ``generator`` (a missing one is taken
    from ``draw_dift_noise(generator)``, as in a run that drew both). Images and
    their ensembles share UNet calls of at most ``max_batch`` samples.
    """
    check_images(images)
    timestep = _checked_timestep(diffusion, timestep)
    _check_up_block(diffusion.unet, up_block)
    _check_counts(ensemble_size=ensemble_size, max_batch=max_batch)
    count = len(images)
    context = _context(diffusion, prompt, prompt_embeds, count)
    latent_noise, noise = _noise_or_draws(diffusion, count, ensemble_size, image_size, latent_noise, noise, generator)
    with torch.no_grad():
        latents = _posterior_samples(diffusion, images, image_size, latent_noise, max_batch)
        noisy = add_noise(diffusion, latents, torch.tensor(timestep), noise=noise.flatten(0, 1))
        return _ensemble_mean(diffusion, noisy, timestep, context, up_block, ensemble_size, max_batch)


def encode_prompt(diffusion: Diffusion, prompt: str) -> torch.Tensor:
    """The text encoder's last hidden state for ``prompt``: [1, L, D], L = tokenizer.model_max_length (77).

    As DIFT and diffusers' SD pipelines encode it: padded to L with the
    tokenizer's own pad token ("!" for SD 2.1, <|endoftext|> for SD 1.5),
    truncated to L, and encoded without an attention mask.
    """
    if diffusion.text_encoder is None or diffusion.tokenizer is None:
        raise ValueError(
            f"Model {diffusion.model_id!r} has no text encoder and tokenizer, so a prompt cannot be encoded: "
            "load it with load_diffusion(..., text_encoder=True) (the default) from a pipeline that has them, "
            f"or pass prompt_embeds [1 or B, 77, {diffusion.context_dim}]."
        )
    if not isinstance(prompt, str):
        raise ValueError(
            f"prompt must be one string; got {type(prompt).__name__}. For one prompt per image, "
            "concatenate encode_prompt's rows and pass them as prompt_embeds [B, 77, D]."
        )
    tokenizer, encoder = diffusion.tokenizer, diffusion.text_encoder
    ids = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return encoder(ids.to(encoder.device))[0]


def draw_dift_noise(
    diffusion: Diffusion,
    count: int,
    *,
    ensemble_size: int = DIFT_ENSEMBLE_SIZE,
    image_size: int = DIFT_IMAGE_SIZE,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard Gaussian ``(latent_noise, noise)`` for ``count`` images, each [count, E, C, h, w] float32.

    Drawn on the generator's device (the model's without one), latent_noise
    first: exactly the draws ``dift_features`` makes from the same generator,
    so a caller that keys its noise per image can draw here and pass them in.
    """
    shape = _noise_shape(diffusion, count, ensemble_size, image_size)
    device = generator.device if generator is not None else diffusion.device
    latent_noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return latent_noise, noise


def _work_dtype(diffusion: Diffusion) -> torch.dtype:
    """Latents and features are kept in at least float32, whatever the model's precision."""
    return torch.promote_types(diffusion.dtype, torch.float32)


def _posterior_samples(diffusion, images, image_size, latent_noise, max_batch) -> torch.Tensor:
    """Scaled VAE posterior samples [B * E, C, h, w]: each image encoded once, then E draws of mean + std * eps."""
    vae, work = diffusion.vae, _work_dtype(diffusion)
    pixels = resize_batch(images.to(device=vae.device, dtype=work), image_size) * 2 - 1
    means, stds = [], []
    for chunk in pixels.split(max_batch):
        posterior = vae.encode(chunk.to(vae.dtype)).latent_dist
        means.append(posterior.mean.to(work))
        stds.append(posterior.std.to(work))
    mean, std = torch.cat(means)[:, None], torch.cat(stds)[:, None]
    samples = mean + std * latent_noise.to(device=vae.device, dtype=work)
    return (samples * vae.config.scaling_factor).flatten(0, 1)


def _ensemble_mean(diffusion, noisy, timestep, context, up_block, ensemble_size, max_batch) -> torch.Tensor:
    """Run the UNet on the noisy samples [B * E, ...] in chunks; each image's mean feature over its E samples.

    Sample j belongs to image j // E. A chunk may hold parts of several
    images' ensembles; each part is summed into its own image (plain sums, not
    index_add_, whose CUDA atomics would make replays differ in the last bits).
    """
    unet, count = diffusion.unet, len(noisy) // ensemble_size
    unet_timestep = torch.tensor(timestep, device=unet.device)
    total = None
    for start in range(0, len(noisy), max_batch):
        end = min(start + max_batch, len(noisy))
        owners = [j // ensemble_size for j in range(start, end)] if len(context) > 1 else [0] * (end - start)
        sample, sample_context = noisy[start:end].to(unet.dtype), context[owners]
        feature = _up_block_output(unet, sample, unet_timestep, sample_context, up_block).to(noisy.dtype)
        if total is None:
            total = feature.new_zeros((count, *feature.shape[1:]))
        for image in range(start // ensemble_size, (end - 1) // ensemble_size + 1):
            first, last = max(start, image * ensemble_size), min(end, (image + 1) * ensemble_size)
            total[image] += feature[first - start : last - start].sum(dim=0)
    return total / ensemble_size


def _up_block_output(unet, latents, timestep, context, up_block: int) -> torch.Tensor:
    """The output of ``unet.up_blocks[up_block]``; the UNet stops there."""
    with capture_output(unet.up_blocks[up_block]) as outputs:
        run_unet(unet, latents, timestep, context)
    if not outputs:
        raise RuntimeError(f"the UNet call never reached up_blocks[{up_block}]")
    return outputs[0]


def _context(diffusion, prompt, prompt_embeds, count) -> torch.Tensor:
    if prompt_embeds is None:
        prompt_embeds = encode_prompt(diffusion, prompt)
    else:
        _check_prompt_embeds(prompt_embeds, count, diffusion.context_dim)
    return prompt_embeds.to(device=diffusion.device, dtype=diffusion.dtype)


def _noise_or_draws(diffusion, count, ensemble_size, image_size, latent_noise, noise, generator):
    shape = _noise_shape(diffusion, count, ensemble_size, image_size)
    for name, given in (("latent_noise", latent_noise), ("noise", noise)):
        if given is None:
            continue
        if not isinstance(given, torch.Tensor) or not given.is_floating_point() or tuple(given.shape) != shape:
            is_tensor = isinstance(given, torch.Tensor)
            got = f"shape {tuple(given.shape)}, {given.dtype}" if is_tensor else type(given).__name__
            raise ValueError(
                f"{name} must be a float tensor [B, E, C, h, w] = {list(shape)} (B = {count} images, "
                f"E = ensemble_size {ensemble_size}, C = the VAE's latent channels, h = w = image_size "
                f"{image_size} / {diffusion.vae_scale_factor}); got {got}. draw_dift_noise makes one."
            )
    if latent_noise is None or noise is None:
        drawn_latent_noise, drawn_noise = draw_dift_noise(
            diffusion, count, ensemble_size=ensemble_size, image_size=image_size, generator=generator
        )
        latent_noise = drawn_latent_noise if latent_noise is None else latent_noise
        noise = drawn_noise if noise is None else noise
    return latent_noise, noise


def _noise_shape(diffusion, count: int, ensemble_size: int, image_size: int) -> tuple[int, ...]:
    _check_counts(ensemble_size=ensemble_size)
    scale = diffusion.vae_scale_factor
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < scale or image_size % scale:
        raise ValueError(
            f"image_size must be a positive multiple of the VAE's downsampling factor {scale}; got {image_size!r} "
            "(DIFT uses 768 for SD 2.1)."
        )
    side = image_size // scale
    return (count, ensemble_size, diffusion.vae.config.latent_channels, side, side)


def _checked_timestep(diffusion, timestep) -> int:
    steps = diffusion.scheduler.config.num_train_timesteps
    try:
        value = None if isinstance(timestep, bool) else operator.index(timestep)
    except TypeError:
        value = None
    if value is None or not 0 <= value < steps:
        raise ValueError(
            f"timestep {timestep!r} is out of range: it is a training timestep, an integer 0..{steps - 1} "
            f"(DIFT: 261 semantic, 0 geometric, 51 video), not an index into the "
            f"{len(diffusion.timesteps)} DDIM steps."
        )
    return value


def _check_up_block(unet, up_block) -> None:
    blocks = unet.up_blocks
    if isinstance(up_block, bool) or not isinstance(up_block, int) or not 0 <= up_block < len(blocks):
        listing = ", ".join(f"{i}: {type(block).__name__}" for i, block in enumerate(blocks))
        raise ValueError(
            f"up_block {up_block!r} is out of range: this UNet has {len(blocks)} up blocks, 0..{len(blocks) - 1} "
            f"({listing}); DIFT uses 1 (semantic matching) or 2 (geometric matching, video)."
        )


def _check_counts(**counts) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")


def _check_prompt_embeds(prompt_embeds, count: int, width: int) -> None:
    shape = tuple(prompt_embeds.shape) if isinstance(prompt_embeds, torch.Tensor) else None
    if shape is None or len(shape) != 3 or shape[0] not in (1, count) or shape[1] < 1 or shape[2] != width:
        got = shape if shape is not None else type(prompt_embeds).__name__
        rows = "1" if count == 1 else f"1 or {count}"
        raise ValueError(
            f"prompt_embeds must be a tensor [1 or B, T, D] = [{rows}, 77, {width}] (one row for all images or "
            f"one per image; T tokens, 77 from a text encoder; D = the UNet's cross-attention width {width}); "
            f"got {got}."
        )
