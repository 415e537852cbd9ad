"""Batch labelling: image corpora streamed through model-holding actors to Parquet keypoints (Ray Data).

The pipeline, one Ray Data dataset:

1. the driver checks the settings, the artifact and the model, takes the
   output's lease (one writer at a time), lists the inputs and drops those
   that already have a row in the output (so a rerun resumes, and a grown
   bucket labels only its new images);
2. CPU tasks read and decode each image, crop it as the manifest says, resize
   it to the model's size and apply its mask, turning any failure into an
   error row instead of an exception;
3. an actor pool (one GPU per actor when GPUs are used) holds the model and
   the artifact, and runs SPEC 1.5 detection per image, the augmentations of
   an image as one batch;
4. the rows are written as Parquet files beside any earlier ones
   (``skp_ray.row_store``), and a summary beside them.

Every input yields exactly one row: ``status`` "ok" with keypoints, or "error"
with the cause. Each image's augmentations come from (seed, the hash of its
decoded pixels), so its keypoints depend neither on batching, actor count and
reruns, nor on its name: byte-identical files get identical keypoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import torch

from skp_ray.artifact import KeypointArtifact, load_artifact
from skp_ray.config import checked, option
from skp_ray.detection import detect_keypoints
from skp_ray.diffusion import DTYPES, Diffusion, check_model, load_diffusion, model_location
from skp_ray.images import (
    ALPHA_MODES,
    DEFAULT_MAX_PIXELS,
    ImageSource,
    absolute_source,
    absolute_uri,
    decode_batch,
    list_sources,
    source_item,
)
from skp_ray.label_store import LABELS, OUTPUT_SCHEMA, label_files, labelled_ids, read_labels
from skp_ray.row_store import SUMMARY_FAILURES, RowFileNames, failure_lines, parquet_location, run_failure, write_summary
from skp_ray.lease import OutputLease
from skp_ray.progress import ProgressCounter, ProgressLog
from skp_ray.randomness import keyed_generator
from skp_ray.ray_cluster import connect, parse_actors, quiet_cpu_alarm, use_gpus, wait_for_gpus

__all__ = ["LabelConfig", "LabelSummary", "LabellingFailed", "run_labelling", "read_labels", "OUTPUT_SCHEMA"]

# SPEC 1.1's image side, for artifacts that do not record theirs.
DEFAULT_IMAGE_SIZE = 512


@dataclass
class LabelConfig:
    artifact: str = option(help="the discovery job's artifact folder or URI")
    input: str = option(help="folder, s3:// or gs:// prefix, glob, or manifest (.txt; .csv/.parquet with a uri column)")
    output: str = option(help="folder or URI for the Parquet rows (labels-*.parquet) and the run summaries")
    model: str | None = option(None, "hub id or folder of the model; default: the artifact's model and revision")
    augmentation_iterations: int = option(10, "test-time augmentations per image (SPEC 1.5)")
    batch_size: int = option(8, "images per actor call")
    actors: str = option("1", "actor pool: a fixed size N, or MIN,MAX to autoscale")
    use_gpu: bool | None = option(None, "one GPU per actor; default: GPUs if the cluster has them")
    cpus_per_actor: float = option(1.0, "CPUs per actor when no GPUs are used")
    dtype: str = option("float32", "model weights: float32, float16 or bfloat16")
    seed: int = option(0, "seed of the test-time augmentations (keyed with each image's content)")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "images with more pixels become too_large error rows")
    alpha: str = option("white", "transparency: 'white' composites onto white, 'drop' discards it (published)")
    retry_errors: bool = option(False, "label again the images whose only rows are error rows")
    max_error_fraction: float = option(0.5, "exit non-zero when more than this fraction of the images fail")
    lease_timeout_s: float = option(300.0, "a lease on --output whose heartbeat is older than this is stale")
    gpu_wait_s: float = option(300.0, "with --use-gpu, how long to wait for a GPU before giving up")
    log_every_s: float = option(30.0, "seconds between progress lines in the log")
    progress: bool = option(True, "Ray Data's progress bars on a terminal")


@dataclass
class LabelSummary:
    output: str
    run_id: str
    listed: int  # distinct input images
    already_labelled: int  # skipped because the output had their row
    labelled: int  # rows written by this run
    errors: dict[str, int]  # error cause -> rows, this run
    failures: list[dict]  # the first failing images: uri, cause, error
    seconds: float  # the whole run
    labelling_seconds: float  # from the first batch's start to the last batch's end

    @property
    def images_per_second(self) -> float:
        return self.labelled / self.labelling_seconds if self.labelling_seconds else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def failure(self, max_error_fraction: float) -> str | None:
        """Why the run counts as failed, or None."""
        return run_failure(self.labelled, self.error_count, max_error_fraction, "images", "labelled")

    def describe(self) -> str:
        causes = ", ".join(f"{cause} {count}" for cause, count in sorted(self.errors.items()))
        lines = [
            f"[label] done: {self.labelled} images labelled ({self.labelled - self.error_count} ok, "
            f"{self.error_count} errors{': ' + causes if causes else ''}), {self.already_labelled} already labelled, "
            f"{self.images_per_second:.2f} images/s over {self.labelling_seconds:.1f} s of labelling "
            f"({self.seconds:.1f} s in all)"
        ]
        failed = [f"{failed['uri']} ({failed['cause']}): {failed['error']}" for failed in self.failures]
        lines += failure_lines("label", failed, self.error_count)
        lines.append(f"[label] output: {self.output}")
        return "\n".join(lines)

    def record(self, config: LabelConfig, artifact_id: str, failure: str | None) -> dict:
        """The summary file's content."""
        return {
            "run_id": self.run_id,
            "status": "failed" if failure else "ok",
            "failure": failure,
            "output": self.output,
            "artifact_id": artifact_id,
            "counts": {
                "listed": self.listed,
                "already_labelled": self.already_labelled,
                "labelled": self.labelled,
                "ok": self.labelled - self.error_count,
                "errors": self.error_count,
            },
            "error_causes": self.errors,
            "failures": self.failures,
            "failures_truncated": self.error_count > len(self.failures),
            "timings": {
                "total_s": self.seconds,
                "labelling_s": self.labelling_seconds,
                "images_per_s": self.images_per_second,
            },
            "settings": dataclasses.asdict(config),
        }


class LabellingFailed(RuntimeError):
    """Too many images failed; the rows and the summary are written all the same."""

    def __init__(self, message: str, summary: LabelSummary):
        super().__init__(message)
        self.summary = summary


def image_id(uri: str) -> str:
    """A stable id for an image: the first 16 hex digits of the sha256 of its URI."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def run_labelling(config: LabelConfig, *, on_batch: Callable[[int], None] | None = None) -> LabelSummary:
    """Label every input image that has no row in ``config.output`` yet; returns the run's summary.

    Everything that would make every image fail (settings, artifact, model,
    an output that cannot be written, another run writing to it) is refused
    here on the driver before Ray starts an actor. Raises LabellingFailed,
    after writing the rows and the summary, when too many images failed.
    ``on_batch(rows)`` runs in the actor after each batch it labels. Joins the
    Ray cluster that ``RAY_ADDRESS`` names, or starts a local one.
    """
    started = time.perf_counter()
    config = checked(config)
    compute = _check_settings(config)
    artifact = load_artifact(config.artifact)
    check_model(model_location(config.model or artifact.model), revision=None if config.model else artifact.revision)
    output = absolute_uri(config.output)
    run_id = uuid.uuid4().hex[:12]
    with OutputLease(output, run_id, stale_after_s=config.lease_timeout_s):
        sources = _distinct(absolute_source(source) for source in list_sources(config.input))
        done = labelled_ids(label_files(output), retry_errors=config.retry_errors)
        todo = [dict(source_item(source), image_id=image_id(source.uri)) for source in sources if image_id(source.uri) not in done]
        print(f"[label] {len(sources)} images, {len(sources) - len(todo)} already labelled, {len(todo)} to label -> {output}")
        labelling_seconds = _label(config, artifact, todo, output, run_id, compute, on_batch) if todo else 0.0
        summary = _summarise(output, run_id, len(sources), len(sources) - len(todo), started, labelling_seconds)
        failure = summary.failure(config.max_error_fraction)
        write_summary(output, run_id, summary.record(config, artifact.id, failure))
    print(summary.describe())
    if failure:
        raise LabellingFailed(f"[label] failed: {failure} (rows and summary written to {output})", summary)
    return summary


def _check_settings(config: LabelConfig) -> ray.data.ActorPoolStrategy:
    problems = []
    if config.dtype not in DTYPES:
        problems.append(f"--dtype {config.dtype!r} is not one of {sorted(DTYPES)}")
    if config.batch_size < 1 or config.augmentation_iterations < 1:
        problems.append("--batch-size and --augmentation_iterations must be at least 1")
    if config.alpha not in ALPHA_MODES:
        problems.append(f"--alpha {config.alpha!r} is not one of {list(ALPHA_MODES)}")
    if not 0 <= config.max_error_fraction <= 1:
        problems.append(f"--max_error_fraction must lie in [0, 1] (got {config.max_error_fraction})")
    if problems:
        raise ValueError("invalid labelling settings: " + "; ".join(problems))
    return parse_actors(config.actors)


def _label(config, artifact, todo: list[dict], output: str, run_id: str, compute, on_batch) -> float:
    """Runs the pipeline over ``todo``; returns the seconds spent labelling (start-up excluded)."""
    path, filesystem = parquet_location(output)
    connect()
    config = dataclasses.replace(config, use_gpu=use_gpus(config.use_gpu))
    if config.use_gpu:
        wait_for_gpus(1, timeout_s=config.gpu_wait_s, what="the labelling actors")
    ray.data.DataContext.get_current().enable_progress_bars = config.progress
    image_size = artifact.settings.get("image_size") or DEFAULT_IMAGE_SIZE
    counter = ProgressCounter.remote()
    detector_options = {"config": config, "run_id": run_id, "counter": counter, "on_batch": on_batch}
    pipeline = (
        ray.data.from_items(todo, override_num_blocks=-(-len(todo) // config.batch_size))
        .map_batches(
            decode_batch,
            fn_kwargs={"size": image_size, "max_pixels": config.max_pixels, "alpha": config.alpha},
            batch_size=config.batch_size,
            num_cpus=0.5,
        )
        .map_batches(
            KeypointDetector,
            fn_constructor_kwargs=detector_options,
            batch_size=config.batch_size,
            compute=compute,
            num_gpus=1 if config.use_gpu else 0,
            num_cpus=0 if config.use_gpu else config.cpus_per_actor,
        )
    )
    if not ray.available_resources().get("CPU"):
        print("[label] every CPU of the cluster is in use right now: decoding starts when one frees up")
    with ProgressLog(counter, len(todo), interval_s=config.log_every_s) as progress, quiet_cpu_alarm():
        pipeline.write_parquet(path, filesystem=filesystem, filename_provider=RowFileNames(LABELS, run_id), schema=OUTPUT_SCHEMA)
    snapshot = ray.get(counter.snapshot.remote())
    print(progress.line(snapshot))
    ray.kill(counter)
    return snapshot["working_seconds"]


def _distinct(sources) -> list[ImageSource]:
    """One source per URI (the first listed): an image listed twice is labelled once."""
    first = {}
    for source in sources:
        first.setdefault(source.uri, source)
    return list(first.values())


def detection_options(settings: dict) -> dict:
    """``detect_keypoints`` options matching the discovery run's maps and augmentations (SPEC 1.5)."""
    options = dict(
        layers=settings.get("layers"),
        noise_level=settings.get("noise_level"),
        feature_upsample_res=settings.get("feature_upsample_res"),
        image_size=settings.get("image_size"),
        degrees=settings.get("augment_degrees"),
        scale=settings.get("augment_scale"),
        translate=settings.get("augment_translate"),
    )
    return {
        key: tuple(value) if isinstance(value, list) else value for key, value in options.items() if value is not None
    }


def detection_generator(seed: int, content_hash: str) -> torch.Generator:
    """Where an image's augmentations come from: keyed by the run's seed and the image's content hash."""
    return keyed_generator(seed, "detect", content_hash)


def load_artifact_model(artifact: KeypointArtifact, *, model: str | None, dtype: str, device: str) -> Diffusion:
    """The model the artifact was learned with (at its revision), or ``model`` instead; no text encoder."""
    return load_diffusion(
        model_location(model or artifact.model),
        dtype=DTYPES[dtype],
        device=device,
        revision=artifact.revision if model is None else None,
        text_encoder=False,
    )


class KeypointDetector:
    """A Ray Data actor: loads the model and artifact once, then labels batches of decoded images."""

    def __init__(self, config: LabelConfig, run_id: str, counter, on_batch: Callable[[int], None] | None = None):
        artifact = load_artifact(config.artifact)
        self.model = config.model or artifact.model
        device = "cuda" if config.use_gpu else "cpu"
        self.diffusion = load_artifact_model(artifact, model=config.model, dtype=config.dtype, device=device)
        self.context = artifact.context.to(device)
        self.indices = artifact.token_indices
        self.options = detection_options(artifact.settings)
        self.artifact_id = artifact.id
        self.config, self.run_id, self.counter, self.on_batch = config, run_id, counter, on_batch

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        started = time.time()
        count, k = len(batch["uri"]), len(self.indices)
        keypoints_yx = np.full((count, k, 2), np.nan, dtype=np.float32)
        peaks = np.full((count, k), np.nan, dtype=np.float32)
        for i in range(count):
            if batch["error_cause"][i]:
                continue
            points, values = detect_keypoints(
                self.diffusion,
                torch.tensor(batch["pixels"][i])[None],  # a copy: Ray hands batches over read-only
                self.context,
                self.indices,
                augmentation_iterations=self.config.augmentation_iterations,
                generator=detection_generator(self.config.seed, batch["content_hash"][i]),
                **self.options,
            )
            keypoints_yx[i], peaks[i] = points[0].cpu().numpy(), values[0].cpu().numpy()
        table = _output_table(batch, keypoints_yx, peaks, self.artifact_id, self.model, self.run_id)
        failed = sum(bool(cause) for cause in batch["error_cause"])
        self.counter.add.remote(count, failed, started, time.time())
        if self.on_batch is not None:
            self.on_batch(count)
        return table


def _output_table(batch, keypoints_yx: np.ndarray, peaks: np.ndarray, artifact_id: str, model: str, run_id: str):
    ok = np.array([not cause for cause in batch["error_cause"]])
    frame = batch["frame"].astype(np.float32)
    normalized = keypoints_yx[:, :, ::-1]  # (y, x) -> (x, y)
    pixels = frame[:, None, :2] + normalized * (frame[:, None, 2:] - frame[:, None, :2])

    def lists(values: np.ndarray) -> list:
        return [row.tolist() if good else None for row, good in zip(values, ok)]

    def text(values) -> list:
        return [str(value) if value else None for value in values]

    count = len(ok)
    columns = {
        "image_id": list(batch["image_id"]),
        "uri": list(batch["uri"]),
        "content_hash": text(batch["content_hash"]),
        "width": [int(w) if good else None for w, good in zip(batch["width"], ok)],
        "height": [int(h) if good else None for h, good in zip(batch["height"], ok)],
        "crop_box": [[int(v) for v in box] if has else None for box, has in zip(batch["crop_box"], batch["has_crop"])],
        "keypoints_xy": lists(pixels),
        "keypoints_xy_normalized": lists(normalized),
        "peaks": lists(peaks),
        "artifact_id": [artifact_id] * count,
        "model": [model] * count,
        "status": ["ok" if good else "error" for good in ok],
        "error_cause": text(batch["error_cause"]),
        "error": text(batch["error"]),
        "labelled_at": [datetime.now(timezone.utc)] * count,
        "run_id": [run_id] * count,
    }
    return pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)


def _summarise(output: str, run_id: str, listed: int, already: int, started: float, labelling_s: float) -> LabelSummary:
    errors, failures, labelled = Counter(), [], 0
    if already < listed:
        table = label_files(output, log=lambda _: None).read(["uri", "status", "error_cause", "error", "run_id"])
        table = table.filter(pc.equal(table["run_id"], run_id))
        labelled = table.num_rows
        failed = table.filter(pc.equal(table["status"], "error"))
        errors = Counter(failed.column("error_cause").to_pylist())
        failures = [
            {"uri": row["uri"], "cause": row["error_cause"], "error": row["error"]}
            for row in failed.slice(0, SUMMARY_FAILURES).to_pylist()
        ]
    seconds = time.perf_counter() - started
    return LabelSummary(output, run_id, listed, already, labelled, dict(errors), failures, seconds, labelling_s)
