"""Batch labelling: image corpora streamed through model-holding actors to Parquet keypoints (Ray Data).

The pipeline, one Ray Data dataset:

1. the driver lists the inputs, drops those that already have a row in the
   output (so a rerun resumes, and a grown bucket labels only its new images);
2. CPU tasks read and decode each image, apply the manifest's mask and crop
   if it gives them, and resize it to the model's size,
   turning a failure into an error row instead of an exception;
3. an actor pool (one GPU per actor when GPUs are used) holds the model and
   the artifact, and runs SPEC 1.5 detection per image, the augmentations of
   an image as one batch;
4. the rows are written as Parquet files beside any earlier ones.

Every input yields exactly one row: ``status`` "ok" with keypoints, or "error"
with the cause. Each image's augmentations come from (seed, image id), so its
keypoints do not depend on batching, actor count or reruns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray
import ray.data
import torch

from skp_ray.artifact import KeypointArtifact, load_artifact
from skp_ray.detection import detect_keypoints
from skp_ray.diffusion import DTYPES, Diffusion, load_diffusion, model_location
from skp_ray.images import (
    DEFAULT_MAX_PIXELS,
    ImageReadError,
    ImageSource,
    absolute_source,
    absolute_uri,
    list_sources,
    read_source,
    resize_batch,
    to_tensor,
)
from skp_ray.randomness import keyed_generator
from skp_ray.ray_cluster import connect, use_gpus

# One row per input image. Keypoints are [K][2] lists: (x, y) in original-image pixels
# (a pixel's centre at index + 0.5) and (x, y) normalised to [0, 1] in the frame the model saw:
# the manifest's crop box when it gives one (crop_box), else the whole image (width, height).
OUTPUT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("crop_box", pa.list_(pa.int32())),
        ("keypoints_xy", pa.list_(pa.list_(pa.float32()))),
        ("keypoints_xy_normalized", pa.list_(pa.list_(pa.float32()))),
        ("peaks", pa.list_(pa.float32())),
        ("artifact_id", pa.string()),
        ("model", pa.string()),
        ("status", pa.string()),
        ("error_cause", pa.string()),
        ("error", pa.string()),
        ("labelled_at", pa.timestamp("us", tz="UTC")),
        ("run_id", pa.string()),
    ]
)

# SPEC 1.1's image side, for artifacts that do not record theirs.
DEFAULT_IMAGE_SIZE = 512


@dataclass
class LabelConfig:
    artifact: str  # the discovery job's artifact folder or URI
    input: str  # folder, s3:// or gs:// prefix, glob, or manifest (.txt, .csv/.parquet with a `uri` column)
    output: str  # folder or URI for the Parquet files
    model: str | None = None  # None: the artifact's model (and revision)
    augmentation_iterations: int = 10
    batch_size: int = 8  # images per actor call
    actors: str = "1"  # a fixed pool size "N", or "MIN,MAX" to autoscale
    use_gpu: bool | None = None  # None: use GPUs if the cluster has them
    cpus_per_actor: float = 1.0
    dtype: str = "float32"
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images become "too_large" error rows
    progress: bool = True  # Ray Data's progress bars


@dataclass
class LabelSummary:
    output: str
    listed: int  # distinct input images
    already_labelled: int  # skipped because the output had their row
    labelled: int  # rows written by this run
    errors: dict[str, int]  # error cause -> rows, this run
    seconds: float
    run_id: str

    @property
    def images_per_second(self) -> float:
        return self.labelled / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        errors = sum(self.errors.values())
        causes = ", ".join(f"{cause} {count}" for cause, count in sorted(self.errors.items()))
        return (
            f"[label] done: {self.labelled} images labelled ({self.labelled - errors} ok, {errors} errors"
            f"{': ' + causes if causes else ''}), {self.already_labelled} already labelled, "
            f"{self.images_per_second:.2f} images/s over {self.seconds:.1f} s\n[label] output: {self.output}"
        )


def image_id(uri: str) -> str:
    """A stable id for an image: the first 16 hex digits of the sha256 of its URI."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def parse_actors(actors: str) -> ray.data.ActorPoolStrategy:
    """``"4"`` -> a pool of 4 actors; ``"1,8"`` -> an autoscaling pool of 1 to 8."""
    try:
        sizes = [int(part) for part in str(actors).split(",")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1 or sizes != sorted(sizes):
        raise ValueError(f"--actors {actors!r}: give a pool size N or MIN,MAX with 1 <= MIN <= MAX")
    if len(sizes) == 1:
        return ray.data.ActorPoolStrategy(size=sizes[0])
    return ray.data.ActorPoolStrategy(min_size=sizes[0], max_size=sizes[1])


def run_labelling(config: LabelConfig, *, on_batch: Callable[[int], None] | None = None) -> LabelSummary:
    """Label every input image that has no row in ``config.output`` yet; returns the run's summary.

    ``on_batch(rows)`` runs in the actor after each batch it labels. Joins the
    Ray cluster that ``RAY_ADDRESS`` names, or starts a local one.
    """
    started = time.perf_counter()
    if config.dtype not in DTYPES:
        raise ValueError(f"--dtype {config.dtype!r} is not one of {sorted(DTYPES)}")
    if config.batch_size < 1 or config.augmentation_iterations < 1:
        raise ValueError("--batch-size and --augmentation_iterations must be at least 1")
    compute = parse_actors(config.actors)
    artifact = load_artifact(config.artifact)
    output = absolute_uri(config.output)
    sources = _distinct(absolute_source(source) for source in list_sources(config.input))
    done = labelled_ids(output)
    todo = [_item(source) for source in sources if image_id(source.uri) not in done]
    run_id = uuid.uuid4().hex[:12]
    print(f"[label] {len(sources)} images, {len(sources) - len(todo)} already labelled, {len(todo)} to label -> {output}")
    if todo:
        path, filesystem = _parquet_location(output)
        connect()
        config = dataclasses.replace(config, use_gpu=use_gpus(config.use_gpu))
        ray.data.DataContext.get_current().enable_progress_bars = config.progress
        blocks = -(-len(todo) // config.batch_size)
        image_size = artifact.settings.get("image_size") or DEFAULT_IMAGE_SIZE
        (
            ray.data.from_items(todo, override_num_blocks=blocks)
            .map_batches(
                _decode_batch,
                fn_kwargs={"size": image_size, "max_pixels": config.max_pixels},
                batch_size=config.batch_size,
                num_cpus=0.5,
            )
            .map_batches(
                KeypointDetector,
                fn_constructor_kwargs={"config": config, "run_id": run_id, "on_batch": on_batch},
                batch_size=config.batch_size,
                compute=compute,
                num_gpus=1 if config.use_gpu else 0,
                num_cpus=0 if config.use_gpu else config.cpus_per_actor,
            )
            .write_parquet(path, filesystem=filesystem)
        )
    summary = _summarise(output, run_id, len(sources), len(sources) - len(todo), time.perf_counter() - started)
    print(summary.describe())
    return summary


def _distinct(sources) -> list[ImageSource]:
    """One source per URI (the first listed): an image listed twice is labelled once."""
    first = {}
    for source in sources:
        first.setdefault(source.uri, source)
    return list(first.values())


def _item(source: ImageSource) -> dict:
    # No nulls: Ray Data turns an all-null column into floats. No crop is [], no mask "".
    box = list(source.crop_box or ())
    return {"uri": source.uri, "image_id": image_id(source.uri), "crop_box": box, "mask_uri": source.mask_uri or ""}


def _crop_box(value) -> tuple[int, ...] | None:
    return tuple(int(v) for v in value) if len(value) else None


def _decode_batch(batch: dict[str, np.ndarray], size: int, max_pixels: int) -> dict[str, np.ndarray]:
    """Read, decode, mask, crop and resize each image to float [3, size, size]; an unreadable one becomes
    an error row. ``frame`` is the (left, top, right, bottom) of what the model sees, in image pixels."""
    count = len(batch["uri"])
    pixels = np.zeros((count, 3, size, size), dtype=np.float32)
    width, height = np.zeros(count, dtype=np.int32), np.zeros(count, dtype=np.int32)
    frame = np.zeros((count, 4), dtype=np.float32)
    cause, message = [""] * count, [""] * count
    for i, uri in enumerate(batch["uri"]):
        source = ImageSource(uri, _crop_box(batch["crop_box"][i]), batch["mask_uri"][i] or None)
        try:
            view, (height[i], width[i]) = read_source(source, max_pixels=max_pixels)
        except ImageReadError as error:
            cause[i], message[i] = error.cause, str(error)
            continue
        frame[i] = source.crop_box if source.crop_box is not None else (0, 0, width[i], height[i])
        pixels[i] = resize_batch(to_tensor(view)[None], size)[0].numpy()
    return {
        "uri": batch["uri"],
        "image_id": batch["image_id"],
        "crop_box": batch["crop_box"],
        "pixels": pixels,
        "width": width,
        "height": height,
        "frame": frame,
        "error_cause": np.array(cause, dtype=object),
        "error": np.array(message, dtype=object),
    }


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


def detection_generator(seed: int, image: str) -> torch.Generator:
    """Where an image's augmentations come from: keyed by the run's seed and the image id."""
    return keyed_generator(seed, "detect", image)


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

    def __init__(self, config: LabelConfig, run_id: str, on_batch: Callable[[int], None] | None = None):
        artifact = load_artifact(config.artifact)
        self.model = config.model or artifact.model
        device = "cuda" if config.use_gpu else "cpu"
        self.diffusion = load_artifact_model(artifact, model=config.model, dtype=config.dtype, device=device)
        self.context = artifact.context.to(device)
        self.indices = artifact.token_indices
        self.options = detection_options(artifact.settings)
        self.artifact_id = artifact.id
        self.config, self.run_id, self.on_batch = config, run_id, on_batch

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
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
                generator=detection_generator(self.config.seed, batch["image_id"][i]),
                **self.options,
            )
            keypoints_yx[i], peaks[i] = points[0].cpu().numpy(), values[0].cpu().numpy()
        table = _output_table(batch, keypoints_yx, peaks, self.artifact_id, self.model, self.run_id)
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
        "width": [int(w) if good else None for w, good in zip(batch["width"], ok)],
        "height": [int(h) if good else None for h, good in zip(batch["height"], ok)],
        "crop_box": [_crop_box(box) for box in batch["crop_box"]],
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


def labelled_ids(output: str) -> set[str]:
    """Image ids that already have a row in the Parquet files at ``output`` (none if it does not exist).

    A file that cannot be read (a write cut off by a crash) is renamed to ``_incomplete-<name>``:
    its images are labelled again, and Parquet readers skip names that start with "_".
    """
    path, filesystem = _parquet_location(output)
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return set()
    ids = set()
    for info in filesystem.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".parquet") or info.base_name[0] in "._":
            continue
        try:
            table = pads.dataset(info.path, filesystem=filesystem, format="parquet").to_table(columns=["image_id"])
        except (pa.ArrowInvalid, OSError) as error:
            aside = posixpath.join(posixpath.dirname(info.path), "_incomplete-" + info.base_name)
            print(f"[label] {info.path} cannot be read ({error}); moved to {aside}, its images are labelled again")
            filesystem.move(info.path, aside)
            continue
        ids.update(table.column("image_id").to_pylist())
    return ids


def _summarise(output: str, run_id: str, listed: int, already: int, seconds: float) -> LabelSummary:
    errors, labelled = Counter(), 0
    if already < listed:
        path, filesystem = _parquet_location(output)
        dataset = pads.dataset(path, filesystem=filesystem, format="parquet", exclude_invalid_files=True)
        table = dataset.to_table(columns=["status", "error_cause"], filter=pads.field("run_id") == run_id)
        labelled = table.num_rows
        errors = Counter(cause for cause in table.column("error_cause").to_pylist() if cause)
    return LabelSummary(output, listed, already, labelled, dict(errors), seconds, run_id)


def _parquet_location(output: str) -> tuple[str, pafs.FileSystem]:
    """The output as a path on a pyarrow filesystem: fsspec's (s3fs, gcsfs, ...) for URLs, so every
    store fsspec knows works, with the same credentials and settings as the image reads."""
    if "://" not in output:
        return output, pafs.LocalFileSystem()
    filesystem, path = fsspec.core.url_to_fs(output)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))
