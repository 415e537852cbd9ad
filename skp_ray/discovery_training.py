"""Discovery on one Ray Train worker: the frozen model loaded once, the context optimised on this worker's
shard with the gradient averaged over workers, then the keypoint tokens voted and the final checkpoint
reported. ``skp_ray.discovery`` (the driver) describes the whole run."""

from __future__ import annotations

import logging
import time
from collections import Counter

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from skp_ray.attention import attention_maps
from skp_ray.detection import count_token_picks, detect_keypoints
from skp_ray.diffusion import DTYPES, Diffusion, load_diffusion
from skp_ray.discovery import DiscoveryConfig
from skp_ray.discovery_checkpoint import TrainingState, report, restore
from skp_ray.discovery_data import ShardReader
from skp_ray.geometry import random_affine
from skp_ray.latent_cache import LatentCache
from skp_ray.model_source import model_location
from skp_ray.optimization import image_order, init_context, training_loss
from skp_ray.plotting import keypoint_sheet, png_bytes
from skp_ray.randomness import keyed_generator
from skp_ray.selection import top_voted_tokens

logger = logging.getLogger(__name__)  # Ray Train forwards its records to the driver


def train_worker(loop_config: dict) -> None:
    """Ray Train's loop on one worker: load the model, open the shard, optimise, vote, report."""
    config = DiscoveryConfig(**loop_config["config"])
    context_info = ray.train.get_context()
    rank, world = context_info.get_world_rank(), context_info.get_world_size()
    diffusion = load_diffusion(
        model_location(config.model),
        dtype=DTYPES[config.dtype],
        device=ray.train.torch.get_device(),
        revision=config.revision,
        text_encoder=False,
    )
    image_size = config.image_size or diffusion.image_size
    shard = ShardReader(loop_config["sources"], rank, world, image_size, config.alpha, config.cache_images)
    try:
        _train_on_shard(config, loop_config, diffusion, shard, rank, world, image_size)
    finally:
        shard.close()


def _train_on_shard(
    config: DiscoveryConfig, loop_config: dict, diffusion: Diffusion, shard: ShardReader, rank: int, world: int,
    image_size: int,
) -> None:
    """The optimisation, token selection and final report of one worker, reading its images from ``shard``."""
    state = restore(config.lr, diffusion.device) or _fresh_state(config, diffusion)
    if rank == 0 and state.step:
        logger.info("[discover] resuming from the checkpoint at step %d", state.step)

    share = config.batch_size // world
    if len(shard) < share:
        raise ValueError(
            f"worker {rank} has {len(shard)} readable images, fewer than its share of a batch ({share}); "
            f"skipped: {dict(shard.skipped)}"
        )
    order_generator = keyed_generator(config.seed, "order", rank)
    order = image_order(len(shard), share, config.num_steps, order_generator).tolist()

    def picks(step: int) -> list[int]:
        return order[step * share : (step + 1) * share]

    latent_cache = LatentCache(config.cache_latents)
    while state.step < config.num_steps:
        started = time.perf_counter()
        pixels = shard.batch(picks(state.step))
        if state.step + 1 < config.num_steps:
            shard.prefetch(picks(state.step + 1))  # read while this step computes
        indices = [shard.indices[i] for i in picks(state.step)]
        latents = latent_cache.latents(diffusion, pixels, indices)
        record = _optimizer_step(config, diffusion, pixels, latents, indices, state, image_size)
        record["images_per_s"] = config.batch_size / (time.perf_counter() - started)
        state.history.append(record)
        if loop_config["on_step"] is not None:
            loop_config["on_step"](rank, state.step, record)
        state.step += 1
        if rank == 0 and (state.step % config.log_every == 0 or state.step == config.num_steps):
            _log_progress(state.step, config.num_steps, record)
        if state.step % config.checkpoint_every == 0 and state.step < config.num_steps:
            report(state, rank, {})

    counts = _count_picks(config, diffusion, shard, state.context.detach(), image_size)
    state.token_indices = top_voted_tokens(counts, config.top_k).tolist()
    images = _image_counts(shard, config.num_indices, len(loop_config["sources"]))
    preview = _preview(config, diffusion, shard, state) if rank == 0 else None
    final = {
        "images": images,
        "resumed_from_step": state.resumed_from_step,
        "image_size": image_size,
    }
    report(state, rank, final, preview)


def _fresh_state(config: DiscoveryConfig, diffusion: Diffusion) -> TrainingState:
    generator = keyed_generator(config.seed, "context")
    context = init_context(config.num_tokens, diffusion.context_dim, generator=generator).to(diffusion.device)
    context.requires_grad_(True)
    return TrainingState(context, torch.optim.Adam([context], lr=config.lr))


def _optimizer_step(
    config, diffusion: Diffusion, images: torch.Tensor, latents: torch.Tensor, image_indices: list[int],
    state: TrainingState, size: int,
) -> dict:
    """One Adam step on this worker's images [n, 3, S, S] and their latents, whose global indices key
    their draws."""
    thetas, noise_images, noise_transformed = _image_draws(config, diffusion, image_indices, state.step, size)
    state.optimizer.zero_grad()
    parts = training_loss(
        diffusion,
        images,
        state.context,
        thetas=thetas,
        noise=(noise_images, noise_transformed),
        top_k=config.top_k,
        furthest_point_num_samples=config.furthest_point_num_samples,
        sigma=config.sigma,
        num_subjects=config.num_subjects,
        peak_disc=config.peak_disc,
        sharpening_loss_weight=config.sharpening_loss_weight,
        equivariance_attn_loss_weight=config.equivariance_attn_loss_weight,
        latents=latents,
        **_map_options(config, size),
    )
    parts.total.backward()
    _all_reduce_mean(state.context.grad)
    state.optimizer.step()
    reduced = _all_reduce_mean(torch.stack([part.detach().float() for part in parts]))
    return {"step": state.step + 1, **{name: float(value) for name, value in zip(parts._fields, reduced)}}


def _image_draws(config, diffusion: Diffusion, image_indices: list[int], step: int, size: int):
    """Each image's affine transform and the latent noise for it and its copy, from (seed, step, image)."""
    thetas, noise_images, noise_transformed = [], [], []
    for index in image_indices:
        generator = keyed_generator(config.seed, "step", step, index)
        augment = dict(degrees=config.augment_degrees, scale=config.augment_scale, translate=config.augment_translate)
        thetas.append(random_affine(1, generator=generator, **augment))
        noise_images.append(_latent_noise(diffusion, size, generator))
        noise_transformed.append(_latent_noise(diffusion, size, generator))
    return torch.cat(thetas), torch.stack(noise_images), torch.stack(noise_transformed)


def _count_picks(config, diffusion: Diffusion, shard: ShardReader, context: torch.Tensor, size: int) -> torch.Tensor:
    """SPEC 1.4 votes of this worker's images among the first ``num_indices``, summed over workers."""
    counts = torch.zeros(config.num_tokens, dtype=torch.long)
    mine = [i for i, index in enumerate(shard.indices) if index < config.num_indices]
    for start in range(0, len(mine), config.batch_size):
        chunk = mine[start : start + config.batch_size]
        noise = [
            _latent_noise(diffusion, size, keyed_generator(config.seed, "select", shard.indices[i])) for i in chunk
        ]
        counts += count_token_picks(
            diffusion,
            shard.batch(chunk),
            context,
            top_k=config.top_k,
            furthest_point_num_samples=config.furthest_point_num_samples,
            sigma=config.sigma,
            num_subjects=config.num_subjects,
            peak_disc=config.peak_disc,
            batch_size=len(chunk),
            noise=torch.stack(noise),
            **_map_options(config, size),
        )
    return _all_reduce_sum(counts)


def _map_options(config: DiscoveryConfig, size: int) -> dict:
    return dict(
        layers=config.layers,
        noise_level=config.noise_level,
        feature_upsample_res=config.feature_upsample_res,
        image_size=size,
        fast_capture=config.fast_capture,
    )


def _image_counts(shard: ShardReader, num_indices: int, listed: int) -> dict:
    gathered = [None] * _world_size()
    summary = {
        "used": len(shard.indices),
        "skipped": dict(shard.skipped),
        "selection": sum(i < num_indices for i in shard.indices),
    }
    if dist.is_initialized():
        dist.all_gather_object(gathered, summary)
    else:
        gathered = [summary]
    skipped = sum((Counter(part["skipped"]) for part in gathered), Counter())
    return {
        "listed": listed,
        "used": sum(part["used"] for part in gathered),
        "skipped": dict(skipped),
        "used_for_token_selection": sum(part["selection"] for part in gathered),
    }


def _preview(config, diffusion: Diffusion, shard: ShardReader, state: TrainingState) -> bytes | None:
    """keypoints.png: a few of rank 0's images with their detected keypoints, and the first one's maps."""
    count = min(config.preview_images, len(shard))
    if count == 0:
        return None
    size = shard.size
    images = shard.batch(list(range(count)))
    context = state.context.detach()
    generator = keyed_generator(config.seed, "preview")
    options = _map_options(config, size)
    keypoints, _ = detect_keypoints(
        diffusion,
        images,
        context,
        state.token_indices,
        augmentation_iterations=config.augmentation_iterations,
        degrees=config.augment_degrees,
        scale=config.augment_scale,
        translate=config.augment_translate,
        generator=generator,
        **options,
    )
    with torch.no_grad():
        maps = attention_maps(
            diffusion, images[:1], context, token_indices=state.token_indices, generator=generator, **options
        )[0]
    return png_bytes(keypoint_sheet(images.cpu(), keypoints.cpu(), maps.cpu(), sizes=shard.sizes[:count]))


def _latent_noise(diffusion: Diffusion, size: int, generator: torch.Generator) -> torch.Tensor:
    """Standard Gaussian noise [C, h, w] for the latent of one image of side ``size``."""
    side = size // diffusion.vae_scale_factor
    return torch.randn(diffusion.unet.config.in_channels, side, side, generator=generator)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        reduced = tensor.to(device)
        dist.all_reduce(reduced)
        tensor.copy_(reduced.to(tensor.device))
    return tensor


def _all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    return _all_reduce_sum(tensor).div_(_world_size())


def _log_progress(step: int, num_steps: int, record: dict) -> None:
    logger.info(
        "[discover] step %d/%d: loss %.5f (sharpening %.5f, equivariance %.6f), %.2f images/s",
        step, num_steps, record["total"], record["sharpening"], record["equivariance"], record["images_per_s"],
    )  # fmt: skip
