"""The evaluation job: manifest + labels -> regressor -> published metric, metrics files and the report."""

import base64
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from skp_ray.datasets import ManifestConfig, make_manifest, manifest_table, read_manifest, write_manifest
from skp_ray.evaluation import EvaluateConfig, run_evaluation
from skp_ray.label_store import OUTPUT_SCHEMA, label_file_name
from skp_ray.labelling import image_id
from skp_ray.samples import write_sample_images

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(600)


def fake_labels(path: Path, rows: list[dict], keypoints: np.ndarray, errors: dict[int, str] = {}) -> str:
    """A labels file as jobs/label.py writes it, with the given normalised (x, y) keypoints per row."""
    path.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    records = []
    for i, (row, points) in enumerate(zip(rows, keypoints)):
        error = errors.get(i)
        records.append(
            dict(
                image_id=image_id(row["uri"]), uri=row["uri"], width=64, height=64, crop_box=None,
                keypoints_xy=None if error else (points * 64).tolist(),
                keypoints_xy_normalized=None if error else points.tolist(), peaks=None,
                artifact_id="artifact-1", model="tiny", status="error" if error else "ok", error_cause=error,
                error=error, labelled_at=now, run_id="run-1",
            )
        )  # fmt: skip
    pq.write_table(pa.Table.from_pylist(records, schema=OUTPUT_SCHEMA), path / label_file_name("abc123", "w", 0))
    return str(path)


def linear_keypoints(landmarks: np.ndarray, k: int, seed: int, noise: float) -> np.ndarray:
    """Keypoints [N, K, 2] that are a fixed linear map of the landmarks (about 0.5) plus noise."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(landmarks.shape[1] * 2, k * 2)) / 4
    flat = (landmarks.reshape(len(landmarks), -1) - 0.5) @ mixing + 0.5
    keypoints = (flat + rng.normal(scale=noise, size=flat.shape)).reshape(len(landmarks), k, 2)
    return keypoints.astype(np.float32).astype(np.float64)  # as the labels store them


def least_squares_prediction(train_x, train_y, test_x):
    """An independent fit: numpy's lstsq on the centred, flattened coordinates."""
    weights, *_ = np.linalg.lstsq(train_x.reshape(len(train_x), -1) - 0.5, train_y.reshape(len(train_y), -1) - 0.5)
    return ((test_x.reshape(len(test_x), -1) - 0.5) @ weights + 0.5).reshape(len(test_x), -1, 2)


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> dict:
    """The bundled faces as a dataset (12 images: 9 train, 3 test) with its manifest."""
    root = tmp_path_factory.mktemp("faces")
    write_sample_images(root, n=12, size=64, seed=3)
    manifest = make_manifest(ManifestConfig("samples", str(root), str(root / "manifest.parquet")))
    return {"root": str(root), "manifest": manifest, "rows": read_manifest(manifest).to_pylist()}


def test_metric_equals_an_independent_least_squares_and_inter_ocular_computation(faces, tmp_path):
    rows = faces["rows"]
    landmarks = np.array([row["landmarks_xy"] for row in rows])
    keypoints = linear_keypoints(landmarks, k=3, seed=0, noise=0.01)
    labels = fake_labels(tmp_path / "labels", rows, keypoints, errors={0: "truncated"})

    result = run_evaluation(
        EvaluateConfig(dataset="samples", root=faces["root"], output=str(tmp_path / "eval"), labels=labels)
    )

    train = [i for i, row in enumerate(rows) if row["split"] == "train" and i != 0]
    test = [i for i, row in enumerate(rows) if row["split"] == "test"]
    prediction = least_squares_prediction(keypoints[train], landmarks[train], keypoints[test])
    per_image = [
        np.mean([np.hypot(*(p - t)) for p, t in zip(pred, truth)]) / np.hypot(*(truth[0] - truth[1]))
        for pred, truth in zip(prediction, landmarks[test])
    ]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["value"] == pytest.approx(np.mean(per_image), rel=1e-9)
    assert metrics["reported"] == pytest.approx(100 * np.mean(per_image), rel=1e-9)
    assert metrics["metric"] == "inter_eye_distance" and metrics["regressor"] == "plain"
    assert metrics["images"] == {"train": 8, "test": 3, "left_out": {"train": {"truncated": 1}, "test": {}}}
    assert metrics["artifact_id"] == "artifact-1" and metrics["keypoints"] == 3 and metrics["landmarks"] == 5
    assert metrics["settings"]["dataset"] == "samples"
    np.testing.assert_allclose(result.prediction, prediction, atol=1e-9)

    table = (tmp_path / "eval" / "metrics.md").read_text()
    assert "| samples | inter_eye_distance" in table and f"{metrics['reported']:.4g}" in table


def test_the_report_embeds_its_pictures_and_links_the_files(faces, tmp_path):
    rows = faces["rows"]
    landmarks = np.array([row["landmarks_xy"] for row in rows])
    labels = fake_labels(tmp_path / "labels", rows, linear_keypoints(landmarks, k=3, seed=1, noise=0.02))
    output = tmp_path / "eval"
    run_evaluation(EvaluateConfig(dataset="samples", root=faces["root"], output=str(output), labels=labels))

    page = (output / "report.html").read_text()
    embedded = [part.split('"', 1)[0] for part in page.split("data:image/png;base64,")[1:]]
    assert len(embedded) == 2  # keypoints and landmarks; attention and loss need the artifact
    for name, data in zip(("keypoints.png", "landmarks.png"), embedded):
        assert f'href="{name}"' in page
        assert base64.b64decode(data) == (output / name).read_bytes()
        with Image.open(output / name) as picture:  # 3 test images side by side, 192 px each
            assert picture.size == (3 * 192 + 4 * 4, 192 + 2 * 4)


def test_visible_variant_ignores_absent_landmarks_from_a_given_manifest(faces, tmp_path):
    """A Tai-Chi-style manifest (visible regressor, summed error x 256) where some landmarks are absent."""
    rows = [dict(row) for row in faces["rows"]]
    landmarks = np.array([row["landmarks_xy"] for row in rows])
    visible = np.ones(landmarks.shape[:2], dtype=bool)
    visible[[1, 4, 10], [2, 3, 0]] = False
    for row, points, seen in zip(rows, landmarks, visible):
        row["landmarks_xy"] = np.where(seen[:, None], points, np.nan).tolist()
        row["visible"] = seen.tolist()
        row["split"] = "regression_train" if row["split"] == "train" else row["split"]  # Tai-Chi fits there
    manifest = tmp_path / "manifest.parquet"
    write_manifest(manifest_table(rows, "taichi"), str(manifest))
    keypoints = linear_keypoints(landmarks, k=3, seed=2, noise=0.01)
    labels = fake_labels(tmp_path / "labels", rows, keypoints)

    config = EvaluateConfig(
        dataset="taichi", root="unused", manifest=str(manifest), output=str(tmp_path / "eval"), labels=labels
    )
    value = run_evaluation(config).metrics["value"]

    train = [i for i, row in enumerate(rows) if row["split"] == "regression_train"]
    test = [i for i, row in enumerate(rows) if row["split"] == "test"]
    prediction = np.zeros((len(test), 5, 2))
    for j in range(5):  # each landmark fitted on the training rows where it is visible
        rows_j = [i for i in train if visible[i, j]]
        full = least_squares_prediction(keypoints[rows_j], landmarks[rows_j], keypoints[test])
        prediction[:, j] = full[:, j]
    errors = np.hypot(*(prediction - landmarks[test]).transpose(2, 0, 1)) * 256
    assert value == pytest.approx((errors * visible[test]).sum(axis=1).mean(), rel=1e-9)


def test_labels_of_another_artifact_are_refused(faces, tmp_path):
    import torch

    from skp_ray.artifact import KeypointArtifact, save_artifact

    rows = faces["rows"]
    landmarks = np.array([row["landmarks_xy"] for row in rows])
    labels = fake_labels(tmp_path / "labels", rows, linear_keypoints(landmarks, k=3, seed=1, noise=0.02))
    artifact = save_artifact(KeypointArtifact(torch.zeros(4, 8), [0, 1, 2], "tiny"), str(tmp_path / "artifact"))
    config = EvaluateConfig(
        dataset="samples", root=faces["root"], output=str(tmp_path / "eval"), labels=labels, artifact=artifact
    )
    with pytest.raises(ValueError, match="were made with artifact artifact-1"):
        run_evaluation(config)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(dataset="imagenet"), "is not one of"),
        (dict(dataset="custom"), "no ground truth"),
        (dict(labels=None), "give --labels"),
        (dict(swap_pairs="mine"), "--swap_pairs"),
        (dict(labels="/nowhere/labels"), "does not exist"),
    ],
)
def test_bad_input_is_a_clear_error(faces, tmp_path, changes, message):
    settings = dict(dataset="samples", root=faces["root"], output=str(tmp_path / "eval"), labels=str(tmp_path))
    with pytest.raises(ValueError, match=message):
        run_evaluation(EvaluateConfig(**{**settings, **changes}))


# --- end to end on Ray: discovery -> labelling -> evaluation ---------------------------------------------


def padded_manifest(root: Path, pad: int) -> str:
    """The faces' manifest with every image cropped to a box reaching ``pad`` pixels outside it (black),
    the landmarks renormalised to that box: discovery and labelling must both crop."""
    manifest = ManifestConfig("samples", str(root), str(root / "plain.parquet"))
    rows = read_manifest(make_manifest(manifest)).to_pylist()
    for row in rows:
        size = 96
        row["crop_box"] = [-pad, -pad, size + pad, size + pad]
        points = np.array(row["landmarks_xy"]) * size
        row["landmarks_xy"] = ((points + pad) / (size + 2 * pad)).tolist()
    path = root / "padded.parquet"
    write_manifest(manifest_table(rows, "samples"), str(path))
    return str(path)


def test_discovery_labelling_and_evaluation_run_through(ray_session, tiny_model_path, tmp_path):
    from skp_ray.discovery import discovery_config, run_discovery

    root = tmp_path / "faces"
    write_sample_images(root, n=8, size=96, seed=5)
    manifest = padded_manifest(root, pad=8)
    discovery = run_discovery(
        discovery_config(
            dict(
                model=tiny_model_path, data=manifest, split="train", output=str(tmp_path / "runs"), name="faces",
                num_steps=3, num_tokens=16, batch_size=2, top_k=3, furthest_point_num_samples=6, num_indices=4,
                image_size=64, feature_upsample_res=16, checkpoint_every=3, log_every=1, preview_images=1,
                augmentation_iterations=2, cpus_per_worker=0.5, max_failures=0,
            )
        )
    )  # fmt: skip
    assert discovery.artifact.images["listed"] == 6  # the train split only

    output = tmp_path / "eval"
    command = [
        sys.executable, str(REPO / "jobs" / "evaluate.py"), "--artifact", discovery.folder, "--dataset", "samples",
        "--root", str(root), "--manifest", manifest, "--output", str(output), "--augmentation_iterations", "2",
        "--cpus_per_actor", "0.5", "--batch-size", "4", "--no-progress",
    ]  # fmt: skip
    environment = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[evaluate] samples inter_eye_distance" in result.stdout

    metrics = json.loads((output / "metrics.json").read_text())
    assert np.isfinite(metrics["value"]) and metrics["value"] > 0
    assert metrics["images"]["train"] == 6 and metrics["images"]["test"] == 2
    assert metrics["artifact_id"] == discovery.artifact.id
    assert "| samples |" in (output / "metrics.md").read_text()
    page = (output / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    for name in ("keypoints.png", "landmarks.png", "attention.png", "loss.png"):
        assert (output / name).stat().st_size > 0
    with Image.open(output / "attention.png") as strips:  # one row per keypoint, one column per test image
        width, height = strips.size  # a column of row labels ("keypoint k") at the left
        assert height == 3 * (192 + 2 * 2) + 4 * 2 and width > 1 * (2 * 192 + 3 * 2) + 2 * 2

    labels = pq.read_table(output / "labels").to_pylist()
    assert len(labels) == 8 and {row["status"] for row in labels} == {"ok"}
    for row in labels:  # pixel keypoints = crop origin + normalised keypoints x the crop's size
        assert row["crop_box"] == [-8, -8, 104, 104]
        expected = np.array(row["keypoints_xy_normalized"]) * 112 - 8
        np.testing.assert_allclose(row["keypoints_xy"], expected, atol=1e-3)


def taichi_layout(root: Path) -> None:
    """The bundled faces laid out as Tai-Chi-HD: frames under eval_images/taichi-256/{split}/ and landmark
    pickles in 256-pixel (x, y), one landmark of one image at 0 (invisible)."""
    import pandas

    for split, count, seed in (("train", 6, 7), ("test", 2, 8)):
        folder = root / "eval_images" / "taichi-256" / split
        write_sample_images(folder, n=count, size=96, seed=seed)
        landmarks = json.loads((folder / "landmarks.json").read_text())
        values = [np.array(points)[:, ::-1] * 256 for points in landmarks.values()]
        values[0][2] = 0.0
        (root / "landmark").mkdir(exist_ok=True)
        frame = pandas.DataFrame({"file_name": list(landmarks), "value": values})
        frame.to_pickle(root / "landmark" / f"taichi_{split}_gt.pkl")


def test_transfer_is_one_command(ray_session, tiny_model_path, tmp_path):
    """An artifact learned on one dataset (the faces) evaluated against another's layout (Tai-Chi's)."""
    from skp_ray.discovery import discovery_config, run_discovery

    faces = tmp_path / "faces"
    write_sample_images(faces, n=4, size=64, seed=9)
    artifact = run_discovery(
        discovery_config(
            dict(
                model=tiny_model_path, data=str(faces), output=str(tmp_path / "runs"), name="faces", num_steps=2,
                num_tokens=16, batch_size=2, top_k=3, furthest_point_num_samples=6, num_indices=4, image_size=64,
                feature_upsample_res=16, checkpoint_every=2, preview_images=0, cpus_per_worker=0.5, max_failures=0,
            )
        )
    ).folder  # fmt: skip
    root = tmp_path / "taichi"
    taichi_layout(root)

    config = EvaluateConfig(
        dataset="taichi", root=str(root), output=str(tmp_path / "eval"), artifact=artifact,
        augmentation_iterations=2, cpus_per_actor=0.5, batch_size=4, report_images=2, progress=False,
    )  # fmt: skip
    metrics = run_evaluation(config).metrics

    assert metrics["dataset"] == "taichi" and metrics["metric"] == "mean_average_error"
    assert metrics["regressor"] == "visible" and metrics["published"] == 234.89
    assert metrics["images"]["train"] == 6 and metrics["images"]["test"] == 2
    assert np.isfinite(metrics["value"]) and metrics["reported"] == metrics["value"]
    assert (tmp_path / "eval" / "report.html").exists()
