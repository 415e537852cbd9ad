"""Evaluation (SPEC 1.6): labelled keypoints of a dataset's train and test splits -> the published metric.

The way through:

1. the dataset adapter writes the manifest (``<output>/manifest.parquet``);
2. without ``--labels``, the labelling pipeline labels the images of the dataset's
   fitting and test splits with the artifact (``<output>/labels``; a rerun resumes);
3. the labels are joined to the manifest by URI; the regressor is fitted on the
   fitting split's keypoints (``DatasetInfo.fit_split``: "train", or
   "regression_train" for Tai-Chi) and applied to the test split;
4. ``metrics.json``, ``metrics.md`` and the report (``report.html`` with its
   pictures) are written to ``<output>``.

Transfer (an artifact learned on one dataset, evaluated on another) is the same
call with that artifact and the other dataset.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import asdict, dataclass, field, fields

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from skp_ray.artifact import load_artifact
from skp_ray.config import option
from skp_ray.datasets import DATASETS, ManifestConfig, make_manifest, read_manifest, write_manifest
from skp_ray.images import absolute_uri, join_uri
from skp_ray.label_store import read_labels
from skp_ray.labelling import LabelConfig, run_labelling
from skp_ray.metrics import inter_eye_distance, mean_average_error, orientation_invariant_error, pck, visible_error
from skp_ray.regression import (
    H36M_SWAP_PAIRS,
    PUBLISHED_H36M_SWAP_PAIRS,
    fit_regressor,
    fit_regressor_with_swaps,
    predict_landmarks,
)

MANIFEST_FILE = "manifest.parquet"
EVALUATED_MANIFEST_FILE = "manifest_evaluated.parquet"  # the rows of the fitting and test splits, when not all
LABELS_FOLDER = "labels"
METRICS_FILE = "metrics.json"
TABLE_FILE = "metrics.md"

SWAP_PAIRS = {"correct": H36M_SWAP_PAIRS, "published": PUBLISHED_H36M_SWAP_PAIRS}


@dataclass(frozen=True)
class MetricInfo:
    description: str
    reported_scale: float  # the paper's tables show value x reported_scale
    higher_is_better: bool = False


METRICS = {
    "inter_eye_distance": MetricInfo("error, % of the inter-ocular distance", 100.0),
    "visible": MetricInfo("error over visible landmarks, % of the image side", 100.0),
    "mean_average_error": MetricInfo("summed L2 error of the visible landmarks, 256-pixel frame", 1.0),
    "pck": MetricInfo("PCK, % of landmarks within 6 pixels of 256", 100.0, higher_is_better=True),
    "orientation_invariant": MetricInfo("left/right-invariant L2 error, 128-pixel frame", 1.0),
}

# SPEC 1.6's published figures, as the paper reports them (after reported_scale).
PUBLISHED = {
    "celeba_wild": 4.35,
    "celeba_aligned": 3.60,
    "cub_aligned": 5.06,
    "cub_all": 5.4,
    "cub_001": 10.5,
    "cub_002": 10.5,
    "cub_003": 10.5,
    "taichi": 234.89,
    "deepfashion": 70.0,
    "h36m": 4.45,
}


def labelling_option(name: str):
    """An option of ``LabelConfig`` with its default and help, for jobs that label on the way."""
    (field,) = [field for field in fields(LabelConfig) if field.name == name]
    return option(field.default, field.metadata["help"])


@dataclass
class EvaluateConfig:
    dataset: str = option(help="a dataset name (skp_ray.datasets.DATASETS), e.g. celeba_wild or taichi")
    root: str = option(help="the dataset's folder, as distributed")
    output: str = option(help="folder for the manifest, labels, metrics and report")
    labels: str | None = option(None, "Parquet labels of the manifest's images; default: label them with --artifact")
    artifact: str | None = option(None, "keypoint artifact; needed without --labels, adds attention maps and loss")
    manifest: str | None = option(None, "a ready manifest instead of building one from --root")
    seed: int = option(0, "the manifest's seeded crops (h36m_unaligned) and the labelling augmentations")
    swap_pairs: str = option("correct", "Human3.6M swap pairs: correct, or published (reproduces the paper's figure)")
    report_images: int = option(8, "test images drawn in the report's pictures")
    # Labelling, when the job labels the images itself: the labelling job's options, defaults and help.
    model: str | None = labelling_option("model")
    augmentation_iterations: int = labelling_option("augmentation_iterations")
    batch_size: int = labelling_option("batch_size")
    actors: str = labelling_option("actors")
    use_gpu: bool | None = labelling_option("use_gpu")
    cpus_per_actor: float = labelling_option("cpus_per_actor")
    dtype: str = labelling_option("dtype")
    max_pixels: int = labelling_option("max_pixels")
    progress: bool = labelling_option("progress")


@dataclass
class SplitData:
    """One split's labelled images: keypoints [N, K, 2] and landmarks [N, M, 2], both normalised (x, y)."""

    rows: list[dict]  # the manifest rows, in manifest order
    keypoints: np.ndarray
    landmarks: np.ndarray
    visible: np.ndarray  # [N, M] bool
    unlabelled: dict[str, int] = field(default_factory=dict)  # cause -> images left out


@dataclass
class Evaluation:
    metrics: dict  # what metrics.json holds
    train: SplitData
    test: SplitData
    prediction: np.ndarray  # [N_test, M, 2] normalised (x, y)
    output: str


def run_evaluation(config: EvaluateConfig) -> Evaluation:
    """Manifest, labels (made when not given), regression and metric, metrics files and the report."""
    info = _dataset_info(config)
    output = absolute_uri(config.output)
    manifest_path = config.manifest or _write_manifest(config, output)
    manifest = read_manifest(manifest_path)
    splits = (info.fit_split, info.test_split)
    labels = config.labels or _label(config, _evaluated_manifest(manifest, manifest_path, splits, output), output)
    by_uri = _labels_by_uri(labels)
    rows = manifest.to_pylist()
    train, test = (_split_data(rows, by_uri, split) for split in splits)
    prediction = _predict(info.regressor, train, test, SWAP_PAIRS[config.swap_pairs])
    value = _metric(info.metric, prediction, test, SWAP_PAIRS[config.swap_pairs])
    metrics = _metrics_record(config, info, value, train, test, by_uri, manifest_path, labels)
    artifact = load_artifact(config.artifact) if config.artifact is not None else None
    if artifact is not None and metrics["artifact_id"] != artifact.id:
        raise ValueError(
            f"the labels in {labels!r} were made with artifact {metrics['artifact_id']}, not with --artifact "
            f"{config.artifact!r}; evaluate into another --output (or delete those labels)"
        )
    evaluation = Evaluation(metrics, train, test, prediction, output)
    _write_metrics(evaluation)
    from skp_ray.report import REPORT_FILE, write_report  # torch and diffusers: the driver needs them only here

    write_report(evaluation, artifact=artifact, config=config)
    print(f"[evaluate] {describe(metrics)}\n[evaluate] report: {join_uri(output, REPORT_FILE)}")
    return evaluation


def describe(metrics: dict) -> str:
    published = metrics["published"]
    against = f" (published: {published})" if published is not None else ""
    return (
        f"{metrics['dataset']} {metrics['metric']} = {metrics['reported']:.4g}{against}; "
        f"{metrics['images']['train']} train / {metrics['images']['test']} test images"
    )


def markdown_table(metrics: dict) -> str:
    """The short Markdown table written beside metrics.json."""
    published = metrics["published"]
    lines = [
        "| dataset | metric | value | published | train images | test images | artifact |",
        "|---|---|---|---|---|---|---|",
        f"| {metrics['dataset']} | {metrics['metric']} ({metrics['description']}) | {metrics['reported']:.4g} | "
        f"{'-' if published is None else published} | {metrics['images']['train']} | {metrics['images']['test']} | "
        f"{metrics['artifact_id']} |",
    ]
    return "\n".join(lines) + "\n"


def _dataset_info(config: EvaluateConfig):
    info = DATASETS.get(config.dataset)
    if info is None:
        raise ValueError(f"--dataset {config.dataset!r} is not one of {', '.join(sorted(DATASETS))}")
    if info.metric is None:
        raise ValueError(
            f"--dataset {config.dataset!r} has no ground truth to evaluate against; "
            "label it with jobs/label.py instead"
        )
    if config.swap_pairs not in SWAP_PAIRS:
        raise ValueError(f"--swap_pairs {config.swap_pairs!r} is not one of {sorted(SWAP_PAIRS)}")
    if config.labels is None and config.artifact is None:
        raise ValueError("give --labels (Parquet from jobs/label.py) or --artifact (to label the images here)")
    return info


def _write_manifest(config: EvaluateConfig, output: str) -> str:
    manifest = ManifestConfig(config.dataset, config.root, join_uri(output, MANIFEST_FILE), seed=config.seed)
    return make_manifest(manifest)


def _evaluated_manifest(manifest: pa.Table, manifest_path: str, splits: tuple[str, str], output: str) -> str:
    """A manifest of the rows in ``splits`` only, so that labelling skips the others (Tai-Chi's training frames)."""
    present = set(manifest.column("split").to_pylist())
    for split in splits:
        if split not in present:
            raise ValueError(f"manifest {manifest_path!r} has no {split!r} rows to evaluate (it has {sorted(present)})")
    evaluated = pc.is_in(manifest.column("split"), value_set=pa.array(splits))
    if pc.all(evaluated).as_py():
        return manifest_path
    path = join_uri(output, EVALUATED_MANIFEST_FILE)
    write_manifest(manifest.filter(evaluated), path)
    return path


def _label(config: EvaluateConfig, manifest_path: str, output: str) -> str:
    labels = join_uri(output, LABELS_FOLDER)
    shared = {item.name: getattr(config, item.name) for item in fields(LabelConfig) if hasattr(config, item.name)}
    run_labelling(LabelConfig(**{**shared, "input": manifest_path, "output": labels}))
    return labels


def _labels_by_uri(labels: str) -> dict[str, dict]:
    """The label rows (from jobs/label.py) keyed by URI: the newest row of each image."""
    fs, path = fsspec.core.url_to_fs(labels)
    if not fs.exists(path):
        raise ValueError(f"--labels {labels!r} does not exist; expected the Parquet output of jobs/label.py")
    columns = ["uri", "status", "error_cause", "keypoints_xy_normalized", "artifact_id"]
    try:
        table = read_labels(labels, columns)
    except ValueError as error:
        raise ValueError(f"--labels: {error}") from error
    return {row["uri"]: row for row in table.to_pylist()}


def _split_data(manifest: list[dict], by_uri: dict[str, dict], split: str) -> SplitData:
    rows, keypoints, landmarks, visible, unlabelled = [], [], [], [], {}
    for row in manifest:
        if row["split"] != split:
            continue
        label = by_uri.get(absolute_uri(row["uri"]))
        if label is None or label["status"] != "ok":
            cause = "not_labelled" if label is None else label["error_cause"] or "error"
            unlabelled[cause] = unlabelled.get(cause, 0) + 1
            continue
        rows.append(row)
        keypoints.append(label["keypoints_xy_normalized"])
        landmarks.append(row["landmarks_xy"])
        visible.append(row["visible"])
    if not rows:
        raise ValueError(f"no labelled images in the {split!r} split (left out: {unlabelled or 'none listed'})")
    landmarks = np.array(landmarks, dtype=np.float64)
    visible = np.array(visible, dtype=bool) & np.isfinite(landmarks).all(axis=-1)
    # absent landmarks carry NaN; their value is never used (visible variants), but NaN * 0 is NaN
    landmarks = np.where(visible[..., None], landmarks, 0.5)
    return SplitData(rows, np.array(keypoints, dtype=np.float64), landmarks, visible, unlabelled)


def _predict(regressor: str, train: SplitData, test: SplitData, pairs) -> np.ndarray:
    if regressor == "visible":
        weights = fit_regressor(train.keypoints, train.landmarks, train.visible)
    elif regressor == "swap":
        weights, _ = fit_regressor_with_swaps(train.keypoints, train.landmarks, pairs=pairs)
    else:
        weights = fit_regressor(train.keypoints, train.landmarks)
    return predict_landmarks(weights, test.keypoints)


def _metric(metric: str, prediction: np.ndarray, test: SplitData, pairs) -> float:
    if metric == "inter_eye_distance":
        return inter_eye_distance(prediction, test.landmarks)
    if metric == "visible":
        return visible_error(prediction, test.landmarks, test.visible)
    if metric == "mean_average_error":
        return mean_average_error(prediction, test.landmarks, test.visible)
    if metric == "pck":
        return pck(prediction, test.landmarks)
    return orientation_invariant_error(prediction, test.landmarks, pairs=pairs)


def _metrics_record(config, info, value, train, test, by_uri, manifest_path, labels) -> dict:
    artifact_ids = sorted({by_uri[absolute_uri(row["uri"])]["artifact_id"] for row in train.rows + test.rows})
    if len(artifact_ids) > 1:
        raise ValueError(f"--labels {labels!r} mixes keypoints of several artifacts: {artifact_ids}")
    metric = METRICS[info.metric]
    return {
        "dataset": config.dataset,
        "metric": info.metric,
        "description": metric.description,
        "value": value,
        "reported": value * metric.reported_scale,
        "reported_scale": metric.reported_scale,
        "higher_is_better": metric.higher_is_better,
        "published": PUBLISHED.get(config.dataset),
        "regressor": info.regressor,
        "images": {
            "train": len(train.rows),
            "test": len(test.rows),
            "left_out": {"train": train.unlabelled, "test": test.unlabelled},
        },
        "keypoints": int(train.keypoints.shape[1]),
        "landmarks": int(train.landmarks.shape[1]),
        "artifact_id": artifact_ids[0],
        "manifest": manifest_path,
        "labels": labels,
        "settings": {key: value for key, value in asdict(config).items() if _is_plain(value)},
    }


def _is_plain(value) -> bool:
    return value is None or isinstance(value, (str, int, bool)) or (isinstance(value, float) and math.isfinite(value))


def _write_metrics(evaluation: Evaluation) -> None:
    fs, path = fsspec.core.url_to_fs(evaluation.output)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(posixpath.join(path, METRICS_FILE), json.dumps(evaluation.metrics, indent=2).encode())
    fs.pipe_file(posixpath.join(path, TABLE_FILE), markdown_table(evaluation.metrics).encode())
