"""Batch labelling: image corpora streamed through model-holding actors to Parquet keypoints (Ray Data).

The pipeline, one streaming Ray Data dataset (no stage waits for the whole input):

1. the driver checks the settings, the artifact, the model and the input (what
   it is, not what it holds) and takes the output's lease (one writer at a time);
2. Ray Data reads the input in parallel (``skp_ray.source_dataset``: manifests
   through its readers, folders listed per sub-folder in tasks), and each block
   of sources asks the resume filter (``skp_ray.label_resume``, an actor holding
   the ids the output already has) which of its rows still need a row, so a
   rerun resumes, a grown bucket labels only its new images and a URI listed
   twice is labelled once;
3. CPU actors of their own (``ImageDecoder``), ahead of the detectors, read
   and decode each image, crop it as the manifest says, resize it to the
   model's size and apply its mask (pixels sent on as uint8), turning any
   failure into an error row instead of an exception;
4. an actor pool (one GPU per actor when GPUs are used) holds the model and
   the artifact, and runs SPEC 1.5 detection on a whole batch in one call,
   each image with its own augmentations;
5. the rows are written as they come, in Parquet files of ``rows_per_file``
   rows beside any earlier ones (``skp_ray.row_store``); the summary is added up
   from this run's files, batch by batch.

Every input yields exactly one row: ``status`` "ok" with keypoints, or "error"
with the cause. Each image's augmentations come from (seed, the hash of its
decoded pixels), so its keypoints depend neither on batching, actor count and
reruns, nor on its name: byte-identical files get identical keypoints.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from skp_ray.artifact import check_artifact
from skp_ray.confidence import DEFAULT_MAX_SPREAD_PX, ConfidenceTally
from skp_ray.config import checked, option
from skp_ray.images import ALPHA_MODES, DEFAULT_MAX_PIXELS, ImageDecoder, absolute_uri
from skp_ray.label_resume import PendingImages, pending_sources
from skp_ray.label_store import LABELS, OUTPUT_SCHEMA, label_files, read_labels
from skp_ray.lease import OutputLease
from skp_ray.model_source import DTYPE_NAMES, check_artifact_model
from skp_ray.progress import ProgressLog
from skp_ray.ray_cluster import connect, imported_in_actor, parse_actors, quiet_cpu_alarm, use_gpus, wait_for_gpus
from skp_ray.row_store import SUMMARY_FAILURES, RowFileNames, failure_lines, parquet_location, run_failure, write_summary
from skp_ray.source_dataset import LISTING_BATCH_ROWS, SourceInput, find_input, image_id

__all__ = [
    "LabelConfig",
    "LabelSummary",
    "LabellingFailed",
    "run_labelling",
    "read_labels",
    "OUTPUT_SCHEMA",
    "image_id",
]


@dataclass
class LabelConfig:
    artifact: str = option(help="the discovery job's artifact folder or URI")
    input: str = option(
        help="folder, s3:// or gs:// prefix, glob, or manifest (.txt; .csv/.parquet with a uri column), "
        "or a folder or glob of manifest files"
    )
    output: str = option(help="folder or URI for the Parquet rows (labels-*.parquet) and the run summaries")
    model: str | None = option(None, "hub id or folder of the model; default: the artifact's model and revision")
    augmentation_iterations: int = option(10, "test-time augmentations per image (SPEC 1.5)")
    batch_size: int = option(16, "images per actor call")
    actors: str = option("1", "actor pool: a fixed size N, or MIN,MAX to autoscale")
    use_gpu: bool | None = option(None, "one GPU per actor; default: GPUs if the cluster has them")
    cpus_per_actor: float = option(1.0, "CPUs per actor when no GPUs are used")
    dtype: str = option("float32", "model weights: float32, float16 or bfloat16")
    copies_per_call: int | None = option(
        None, "augmented copies per UNet call, across a batch's images (default: from a memory budget)"
    )
    tta_latent: bool = option(False, "warp each image's latent instead of the image: one VAE call an image, approximate")
    compile: bool = option(False, "torch.compile the UNet's uncaptured parts (the first batches take longer)")
    channels_last_vae: bool | None = option(
        None, "channels-last VAE encoder (same latents up to rounding); default: on for CPU actors, off on GPUs"
    )
    seed: int = option(0, "seed of the test-time augmentations (keyed with each image's content)")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "images with more pixels become too_large error rows")
    alpha: str = option("white", "transparency: 'white' composites onto white, 'drop' discards it (published)")
    retry_errors: bool = option(False, "label again the images whose only rows are error rows")
    rows_per_file: int = option(1000, "rows per output file: a crash loses at most the files being filled")
    max_error_fraction: float = option(0.5, "exit non-zero when more than this fraction of the images fail")
    max_spread_px: float = option(
        DEFAULT_MAX_SPREAD_PX, "the summary counts an image unreliable when its median keypoint spread exceeds this (pixels)"
    )
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
    confidence: ConfidenceTally = dataclasses.field(default_factory=ConfidenceTally)  # this run's ok rows

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
        if self.labelled > self.error_count:
            lines += self.confidence.describe()
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
            "confidence": self.confidence.result(),
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


def run_labelling(config: LabelConfig, *, on_batch: Callable[[int], None] | None = None) -> LabelSummary:
    """Label every input image that has no row in ``config.output`` yet; returns the run's summary.

    Everything that would make every image fail (settings, artifact, model,
    an output that cannot be written, another run writing to it, an input that
    does not exist) is refused here on the driver before Ray starts an actor.
    Raises LabellingFailed, after writing the rows and the summary, when too
    many images failed. ``on_batch(rows)`` runs in the actor after each batch
    it labels. Joins the Ray cluster that ``RAY_ADDRESS`` names, or starts a
    local one.
    """
    started = time.perf_counter()
    config = checked(config)
    compute = _check_settings(config)
    artifact = check_artifact(config.artifact)
    check_artifact_model(artifact, config.model)
    output = absolute_uri(config.output)
    run_id = uuid.uuid4().hex[:12]
    with OutputLease(output, run_id, stale_after_s=config.lease_timeout_s):
        found = find_input(config.input)
        files = label_files(output)
        print(f"[label] labelling the images at {config.input} without a row in {output} (listed as they are read)")
        totals, labelling_seconds = _label(config, artifact, found, files, output, run_id, compute, on_batch)
        if not totals["listed"]:
            raise ValueError(f"no images found at {config.input!r}; expected files ending in image extensions or manifest entries")
        summary = _summarise(output, run_id, totals, started, labelling_seconds, config.max_spread_px)
        failure = summary.failure(config.max_error_fraction)
        write_summary(output, run_id, summary.record(config, artifact.id, failure))
    print(summary.describe())
    if failure:
        raise LabellingFailed(f"[label] failed: {failure} (rows and summary written to {output})", summary)
    return summary


# Decoding actors claim no CPU, like GPU detectors: the repartition before them runs in tasks of a whole
# CPU, for which a standing claim of theirs beside a one-CPU detector would leave no room on a two-CPU
# node (a deadlock, seen).
DECODE_CPUS = 0
# Decoding actors at most per detector actor (of the pool's maximum). A GPU detector can outpace one
# decoder on large photos. A CPU detector shares its node's cores with them, where a second one only
# competes: on 2 cores it started while the detector imported torch and put the first rows off by ~1.2 s.
DECODERS_PER_GPU_DETECTOR = 2
DECODERS_PER_CPU_DETECTOR = 1
# The detector actors' class, imported in the actors only: the driver never imports torch and diffusers.
KEYPOINT_DETECTOR = imported_in_actor("skp_ray.label_detector.KeypointDetector")


def _check_settings(config: LabelConfig) -> ray.data.ActorPoolStrategy:
    problems = []
    if config.dtype not in DTYPE_NAMES:
        problems.append(f"--dtype {config.dtype!r} is not one of {sorted(DTYPE_NAMES)}")
    if config.batch_size < 1 or config.augmentation_iterations < 1:
        problems.append("--batch-size and --augmentation_iterations must be at least 1")
    if config.copies_per_call is not None and config.copies_per_call < 1:
        problems.append(f"--copies_per_call must be at least 1 (got {config.copies_per_call})")
    if config.rows_per_file < 1:
        problems.append(f"--rows_per_file must be at least 1 (got {config.rows_per_file})")
    if config.alpha not in ALPHA_MODES:
        problems.append(f"--alpha {config.alpha!r} is not one of {list(ALPHA_MODES)}")
    if not config.max_spread_px > 0:
        problems.append(f"--max_spread_px must be a positive number of pixels (got {config.max_spread_px})")
    if not 0 <= config.max_error_fraction <= 1:
        problems.append(f"--max_error_fraction must lie in [0, 1] (got {config.max_error_fraction})")
    if problems:
        raise ValueError("invalid labelling settings: " + "; ".join(problems))
    return parse_actors(config.actors)


def _label(config, artifact, found: SourceInput, files, output: str, run_id: str, compute, on_batch):
    """Runs the pipeline: list, drop what the output has, decode, detect, write as blocks finish.
    Returns the listing's totals and the seconds spent labelling (start-up excluded)."""
    path, filesystem = parquet_location(output)
    connect()
    config = dataclasses.replace(config, use_gpu=use_gpus(config.use_gpu))
    if config.use_gpu:
        wait_for_gpus(1, timeout_s=config.gpu_wait_s, what="the labelling actors")
    ray.data.DataContext.get_current().enable_progress_bars = config.progress
    pending = PendingImages.remote(files, config.retry_errors)
    detector_options = {"config": config, "run_id": run_id, "counter": pending, "on_batch": on_batch}
    decoders_per_detector = DECODERS_PER_GPU_DETECTOR if config.use_gpu else DECODERS_PER_CPU_DETECTOR
    pipeline = (
        found.dataset()
        .map_batches(
            pending_sources,
            fn_kwargs={"pending": pending},
            batch_size=LISTING_BATCH_ROWS,
            batch_format="pyarrow",
            num_cpus=0.5,
        )
        # Listing blocks can hold many thousands of rows; the detectors get them a batch at a time, so each
        # batch's rows leave the actor (and reach a file) as soon as it is labelled.
        .repartition(target_num_rows_per_block=config.batch_size)
        .map_batches(
            ImageDecoder,
            fn_constructor_kwargs={"size": artifact.image_size, "max_pixels": config.max_pixels, "alpha": config.alpha},
            batch_size=config.batch_size,
            num_cpus=DECODE_CPUS,
            compute=ray.data.ActorPoolStrategy(
                min_size=compute.min_size, max_size=decoders_per_detector * compute.max_size
            ),
        )
        .map_batches(
            KEYPOINT_DETECTOR,
            fn_constructor_kwargs=detector_options,
            batch_size=config.batch_size,
            compute=compute,
            num_gpus=1 if config.use_gpu else 0,
            num_cpus=0 if config.use_gpu else config.cpus_per_actor,
        )
    )
    if not ray.available_resources().get("CPU"):
        print("[label] every CPU of the cluster is in use right now: decoding starts when one frees up")
    to_label = functools.partial(_to_label, pending, timeout_s=config.log_every_s)
    with ProgressLog(pending, to_label, interval_s=config.log_every_s) as progress, quiet_cpu_alarm():
        pipeline.write_parquet(
            path,
            filesystem=filesystem,
            filename_provider=RowFileNames(LABELS, run_id),
            schema=OUTPUT_SCHEMA,
            min_rows_per_file=config.rows_per_file,
            max_rows_per_file=config.rows_per_file,
            ray_remote_args={"num_cpus": 0.5},  # writes are I/O; a whole CPU each can starve them on small nodes
        )
    totals = ray.get(pending.totals.remote())
    snapshot = ray.get(pending.snapshot.remote())
    print(progress.line(snapshot, total=_to_label(pending)))
    ray.kill(pending)
    return totals, snapshot["working_seconds"]


def _to_label(pending, timeout_s: float | None = None) -> int:
    """Images listed so far that need a row (the resume filter's count)."""
    totals = ray.get(pending.totals.remote(), timeout=timeout_s)
    return totals["listed"] - totals["already_labelled"]


class RunTally:
    """What the summary says about this run's rows, added up one record batch at a time: rows, errors
    by cause, and the first ``SUMMARY_FAILURES`` failures."""

    columns = ["uri", "status", "error_cause", "error"]

    def __init__(self):
        self.labelled, self.errors, self.failures = 0, Counter(), []

    def add(self, batch: pa.RecordBatch) -> None:
        self.labelled += batch.num_rows
        failed = batch.filter(pc.equal(batch.column("status"), "error"))
        self.errors.update(failed.column("error_cause").to_pylist())
        room = SUMMARY_FAILURES - len(self.failures)
        if room > 0:
            rows = failed.slice(0, room).to_pylist()
            self.failures += [{"uri": row["uri"], "cause": row["error_cause"], "error": row["error"]} for row in rows]


def _summarise(
    output: str, run_id: str, totals: dict, started: float, labelling_s: float, max_spread_px: float
) -> LabelSummary:
    """The run's summary, streaming over this run's own files batch by batch (never the whole output)."""
    files = label_files(output, log=lambda _: None)
    tally, confidence = RunTally(), ConfidenceTally(max_spread_px=max_spread_px)
    columns = [*tally.columns, "keypoint_spread_px", "peak_share"]
    for batch in files.batches(columns, paths=files.of_run(run_id)):  # one pass over this run's rows
        tally.add(batch)
        confidence.add(batch)
    seconds = time.perf_counter() - started
    return LabelSummary(
        output,
        run_id,
        totals["listed"],
        totals["already_labelled"],
        tally.labelled,
        dict(tally.errors),
        tally.failures,
        seconds,
        labelling_s,
        confidence,
    )
