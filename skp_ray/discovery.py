"""Keypoint discovery on Ray Train: the context optimised data-parallel, then the keypoint tokens voted.

One ``TorchTrainer`` worker per GPU (or CPU slot). Each worker loads the
frozen model once and opens its own shard of the images (image ``i`` goes to
worker ``i % num_workers``; ``skp_ray.discovery_data`` reads it per step, with
a bounded uint8 cache and prefetch). Every optimiser step, each worker takes
``batch_size / num_workers`` images of its shard, computes the SPEC 1.3 loss,
and the context gradient is averaged over workers (one all-reduce) before an
Adam step that every worker applies identically, so the contexts never
diverge. The model is never wrapped in DDP: only the context learns.

Randomness is keyed, not streamed: an image's affine transform and latent
noise come from (seed, step, image index), and each worker's image order from
(seed, worker). So an image meets the same draws whichever worker holds it,
and a run resumed from a checkpoint (context, Adam state, step) continues
exactly as if it had never stopped; the seed is the whole RNG state.

After optimisation, token selection (SPEC 1.4) runs on the first
``num_indices`` images: each worker counts the picks of its share and the
counts are summed. Rank 0 reports the result in the final checkpoint and the
driver writes the keypoint artifact.

This module is the driver: settings, the checks that refuse bad input before
Ray starts, the trainer, the artifact. ``skp_ray.discovery_training`` is the
loop on each worker, ``skp_ray.discovery_checkpoint`` its checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fsspec
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from skp_ray.artifact import KeypointArtifact, artifact_exists, save_artifact
from skp_ray.config import checked, option
from skp_ray.discovery_checkpoint import PREVIEW_FILE, read_final
from skp_ray.heatmaps import PEAK_DISCS
from skp_ray.images import (
    ALPHA_MODES,
    ImageReadError,
    ImageSource,
    absolute_source,
    absolute_uri,
    join_uri,
    list_sources,
    load_source,
)
from skp_ray.model_source import DTYPE_NAMES, TINY_MODEL, check_model, model_location
from skp_ray.plotting import line_plot, png_bytes
from skp_ray.ray_cluster import connect, use_gpus, wait_for_gpus
from skp_ray.samples import write_sample_images

# The artifact's loss picture, and the run settings kept beside Ray's run folder.
LOSS_CURVE_FILE = "loss.png"
RUN_SETTINGS_FILE = "run-settings.json"

# Settings that change the optimisation's arithmetic: a resumed run must match its checkpoint in these.
RESUME_KEYS = (
    "num_tokens", "lr", "batch_size", "top_k", "furthest_point_num_samples", "sigma", "layers", "noise_level",
    "feature_upsample_res", "augment_degrees", "augment_scale", "augment_translate", "sharpening_loss_weight",
    "equivariance_attn_loss_weight", "num_subjects", "peak_disc", "model", "revision", "data", "split", "num_workers", "dtype",
    "seed", "image_size",
)  # fmt: skip


@dataclass
class DiscoveryConfig:
    # The published method's settings (SPEC 1.3, 1.4), under its names and defaults.
    num_steps: int = option(500, "optimiser steps (SPEC 1.3)")
    num_tokens: int = option(500, "tokens in the learned context")
    lr: float = option(5e-3, "Adam learning rate")
    batch_size: int = option(4, "images per optimiser step, split evenly over the workers")
    top_k: int = option(10, "keypoints: tokens picked per image and voted (SPEC 1.4)")
    furthest_point_num_samples: int = option(25, "lowest-KL candidates that furthest point sampling picks from")
    sigma: float = option(2.0, "Gaussian target's standard deviation, in pixels of the map")
    layers: tuple[int, ...] = option((0, 1, 2, 3), "captured cross attention layers (indices into the list of up block layers)")
    noise_level: int = option(-1, "index into the 50 DDIM timesteps; -1 is t = 0")
    feature_upsample_res: int = option(128, "side of the attention maps")
    augment_degrees: float = option(15.0, "random rotation, +- degrees")
    augment_scale: tuple[float, float] = option((0.8, 1.0), "random scale range")
    augment_translate: tuple[float, float] = option((0.25, 0.25), "random translation, fraction of the half-side")
    sharpening_loss_weight: float = option(100.0, "weight of the sharpening loss")
    equivariance_attn_loss_weight: float = option(1000.0, "weight of the equivariance loss")
    num_indices: int = option(100, "images that vote for the keypoint tokens")
    num_subjects: int = option(1, "peaks per map in the sharpening target")
    peak_disc: str = option("centred", "with num_subjects > 1, the disc cleared around a peak: centred or published")
    # Where and how it runs.
    model: str | None = option(None, "hub id or folder of a diffusers pipeline; default: the embedded tiny model")
    revision: str | None = option(None, "hub revision of --model")
    data: str | None = option(None, "folder, s3:// or gs:// prefix, glob or manifest; default: rendered samples")
    split: str | None = option(None, "with a dataset manifest: learn from this split only (e.g. train)")
    output: str = option("outputs", "local folder or object-storage URI; the artifact goes to <output>/<name>")
    name: str | None = option(None, "run name; a rerun with the same name resumes (default: discover-<time>)")
    num_workers: int = option(1, "Ray Train workers")
    use_gpu: bool | None = option(None, "one GPU per worker; default: GPUs if the cluster has them")
    cpus_per_worker: float = option(1.0, "CPUs per worker")
    cache_images: int = option(
        256, "decoded images (uint8, before resizing) each worker keeps in memory; the rest are read per step; 0: none"
    )
    cache_latents: int = option(
        4096, "latents of untransformed images each worker keeps (encoded once; 64 KB each at 512 px); 0: none"
    )
    fast_capture: bool = option(
        True, "capture maps with matrix-product upsampling and a slab-wise softmax (same maps up to rounding)"
    )
    dtype: str = option("float32", "model weights: float32, float16 or bfloat16 (the context stays float32)")
    seed: int = option(0, "every random draw derives from it")
    image_size: int | None = option(None, "side the images are resized to; default: the model's (512 for SD 1.5)")
    alpha: str = option("white", "transparency: 'white' composites onto white, 'drop' discards it (published)")
    checkpoint_every: int = option(50, "checkpoint interval in steps")
    max_failures: int = option(3, "worker-group restarts Ray Train may make")
    log_every: int = option(10, "progress line interval in steps")
    gpu_wait_s: float = option(300.0, "with --use-gpu, how long to wait for the workers' GPUs before giving up")
    preview_images: int = option(4, "images drawn with their keypoints in keypoints.png")
    augmentation_iterations: int = option(10, "test-time augmentations for those keypoints (SPEC 1.5)")


# With no --model the job runs the embedded default: a small run that finishes in about a minute on a laptop.
EMBEDDED_DEFAULT = dict(
    num_steps=10, num_tokens=32, top_k=6, furthest_point_num_samples=12, num_indices=8, checkpoint_every=5,
    log_every=1, augmentation_iterations=4, image_size=256, feature_upsample_res=64,
)  # fmt: skip


def discovery_config(settings: dict) -> DiscoveryConfig:
    """A config from given settings; with no model the embedded default fills what is not given."""
    if settings.get("model") in (None, TINY_MODEL):
        settings = {**EMBEDDED_DEFAULT, **settings}
    return DiscoveryConfig(**settings)


@dataclass
class DiscoveryResult:
    artifact: KeypointArtifact
    folder: str  # the artifact folder
    picture: str | None  # keypoints.png in it (None with preview_images=0)
    loss_curve: str  # loss.png in it
    resumed_from_step: int  # 0 when the run started fresh


def run_discovery(
    config: DiscoveryConfig, *, on_step: Callable[[int, int, dict], None] | None = None
) -> DiscoveryResult:
    """Discover keypoint tokens with Ray Train and write the artifact to ``<output>/<name>``.

    ``on_step(rank, step, record)`` runs on every worker after every step.
    Joins the Ray cluster that ``RAY_ADDRESS`` names, or starts a local one.
    """
    config = checked(config)
    _check_config(config)
    name = config.name or time.strftime("discover-%Y%m%d-%H%M%S")
    folder = join_uri(config.output, name)
    if artifact_exists(folder):
        raise FileExistsError(
            f"an artifact already exists at {folder!r}; pass another --name, or delete it to run again"
        )
    sources = [absolute_source(source) for source in _image_sources(config)]  # workers run in their own folders
    if len(sources) < config.batch_size:
        raise ValueError(
            f"--data {config.data!r} holds {len(sources)} images; --batch_size {config.batch_size} needs more"
        )
    _check_readable(config, sources)
    check_model(model_location(config.model), revision=config.revision)

    connect(dashboard=True)  # Ray Train's placement-group cleaner queries the dashboard's state API
    config = dataclasses.replace(config, use_gpu=use_gpus(config.use_gpu))
    if config.use_gpu:
        wait_for_gpus(config.num_workers, timeout_s=config.gpu_wait_s, what=f"{config.num_workers} discovery worker(s)")
    _claim_run_folder(config, folder)  # only once every check has passed, so a refused run leaves --name free
    print(f"[discover] {len(sources)} images, {config.num_workers} worker(s), {config.num_steps} steps -> {folder}")
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"config": dataclasses.asdict(config), "sources": sources, "on_step": on_step},
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
        ),
        run_config=RunConfig(
            name="train",
            storage_path=absolute_uri(folder),
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as checkpoint:
        return _write_artifact(config, name, folder, Path(checkpoint))


def _check_config(config: DiscoveryConfig) -> None:
    problems = []
    if config.num_workers < 1:
        problems.append(f"--num-workers must be at least 1 (got {config.num_workers})")
    elif config.batch_size % config.num_workers:
        problems.append(
            f"--batch_size {config.batch_size} must be a multiple of --num-workers {config.num_workers} "
            "(each worker takes an equal share of every batch)"
        )
    if config.dtype not in DTYPE_NAMES:
        problems.append(f"--dtype {config.dtype!r} is not one of {sorted(DTYPE_NAMES)}")
    if config.alpha not in ALPHA_MODES:
        problems.append(f"--alpha {config.alpha!r} is not one of {list(ALPHA_MODES)}")
    if config.peak_disc not in PEAK_DISCS:
        problems.append(f"--peak_disc {config.peak_disc!r} is not one of {list(PEAK_DISCS)}")
    for key in ("cache_images", "cache_latents"):
        if getattr(config, key) < 0:
            problems.append(f"--{key} must be 0 (no cache) or more (got {getattr(config, key)})")
    for key in ("num_steps", "num_tokens", "batch_size", "top_k", "num_indices", "checkpoint_every", "log_every"):
        if getattr(config, key) < 1:
            problems.append(f"--{key} must be at least 1 (got {getattr(config, key)})")
    if config.top_k > config.furthest_point_num_samples or config.furthest_point_num_samples > config.num_tokens:
        problems.append(
            f"need --top_k ({config.top_k}) <= --furthest_point_num_samples ({config.furthest_point_num_samples}) "
            f"<= --num_tokens ({config.num_tokens})"
        )
    if problems:
        raise ValueError("invalid discovery settings: " + "; ".join(problems))


def _check_readable(config: DiscoveryConfig, sources: list[ImageSource]) -> None:
    """Refuse, on the driver, a --data that does not hold a batch of readable images.

    Images are read in order until ``batch_size`` of them decode; unreadable
    ones are counted by cause. A corpus that is mostly readable costs a few reads.
    """
    readable, skipped, examples = 0, Counter(), []
    for source in sources:
        try:
            load_source(source, alpha=config.alpha)
        except ImageReadError as error:
            skipped[error.cause] += 1
            examples.append(str(error))
            continue
        readable += 1
        if readable == config.batch_size:
            return
    raise ValueError(
        f"--data {config.data or 'the sample images'!r}: only {readable} of {len(sources)} images can be read "
        f"(--batch_size {config.batch_size} needs at least that many); unreadable by cause: {dict(skipped)}; "
        f"first: {examples[0] if examples else 'none'}"
    )


def _image_sources(config: DiscoveryConfig) -> list[ImageSource]:
    if config.data is not None:
        return list_sources(config.data, split=config.split)
    samples = join_uri(config.output, "sample-images")
    fs, path = fsspec.core.url_to_fs(samples)
    if not fs.exists(posixpath.join(path, "landmarks.json")):
        write_sample_images(samples, n=8)
    return list_sources(samples)


def _claim_run_folder(config: DiscoveryConfig, folder: str) -> None:
    """Record the run's settings; a rerun under the same name must keep those that shape its arithmetic."""
    fs, path = fsspec.core.url_to_fs(folder)
    settings_path = posixpath.join(path, RUN_SETTINGS_FILE)
    current = {key: _plain(getattr(config, key)) for key in RESUME_KEYS}
    if fs.exists(settings_path):
        saved = json.loads(fs.cat_file(settings_path))
        changed = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
        if changed:
            details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
            raise ValueError(
                f"{folder!r} holds an unfinished run with other settings ({details}); "
                "rerun with the same settings to resume, or pass another --name"
            )
        print(f"[discover] {folder} holds an unfinished run with these settings: resuming it")
        return
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(settings_path, json.dumps(current, indent=2).encode())


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _train_loop(loop_config: dict) -> None:
    """Ray Train's per-worker loop, imported where it runs: the driver never imports diffusers (~3 s of
    a job's start-up on 2 cores, beside its workers' own imports)."""
    from skp_ray.discovery_training import train_worker

    train_worker(loop_config)


def _write_artifact(config: DiscoveryConfig, name: str, folder: str, checkpoint: Path) -> DiscoveryResult:
    record, context, preview = read_final(checkpoint)
    history = record["history"]
    losses = [entry["total"] for entry in history]
    artifact = KeypointArtifact(
        context=context,
        token_indices=record["token_indices"],
        model=config.model or TINY_MODEL,
        revision=config.revision,
        settings={**dataclasses.asdict(config), "name": name, "image_size": record["image_size"]},
        loss_history=losses,
        images=record["images"],
    )
    files = {
        "metrics.jsonl": "".join(json.dumps(entry) + "\n" for entry in history).encode(),
        LOSS_CURVE_FILE: png_bytes(line_plot(losses, title="discovery loss")),
    }
    if preview is not None:
        files[PREVIEW_FILE] = preview
    save_artifact(artifact, folder, files=files)
    images = record["images"]
    picture = join_uri(folder, PREVIEW_FILE) if PREVIEW_FILE in files else None
    print(
        f"[discover] done: {images['used']} images used, {sum(images['skipped'].values())} skipped"
        f"{' ' + str(images['skipped']) if images['skipped'] else ''}, tokens {artifact.token_indices}, "
        f"final loss {losses[-1]:.5f}\n"
        f"[discover] loss curve: {join_uri(folder, LOSS_CURVE_FILE)}\n[discover] artifact: {folder}"
        + (f"\n[discover] picture: {picture}" if picture else "")
    )
    return DiscoveryResult(artifact, folder, picture, join_uri(folder, LOSS_CURVE_FILE), record["resumed_from_step"])
