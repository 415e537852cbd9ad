"""The discovery job on real Ray Train workers (CPU, tiny model, small images)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
from PIL import Image

from skp_ray.artifact import load_artifact
from skp_ray.discovery import DiscoveryConfig, discovery_config, run_discovery
from skp_ray.samples import write_sample_images

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(600)  # a hung Ray run fails here instead of eating CI's budget

# The step callbacks below run on Ray workers, which cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("images")
    write_sample_images(folder, n=4, size=128, seed=1)
    return str(folder)


def small_config(data: str, output: Path, **changes) -> DiscoveryConfig:
    settings = dict(
        data=data, output=str(output), num_steps=4, num_tokens=16, batch_size=4, top_k=3,
        furthest_point_num_samples=6, num_indices=4, image_size=128, feature_upsample_res=32,
        checkpoint_every=2, log_every=1, preview_images=1, augmentation_iterations=2, cpus_per_worker=0.5,
        max_failures=0, lr=0.05,
    )  # fmt: skip
    return discovery_config({**settings, **changes})


@pytest.fixture(scope="module")
def uninterrupted(ray_session, images, tmp_path_factory):
    """The same run on one worker (4 images a step) and on two (2 images each a step)."""
    output = tmp_path_factory.mktemp("runs")
    return {
        workers: run_discovery(small_config(images, output, name=f"w{workers}", num_workers=workers))
        for workers in (1, 2)
    }


def test_two_workers_give_the_same_context_as_one(uninterrupted):
    one, two = uninterrupted[1].artifact, uninterrupted[2].artifact
    assert one.context.shape == (16, 32)
    # Rounding only: the workers encode and capture in batches of 2, not 4 (each first latent is cached),
    # and Adam turns a float32 difference in a near-zero gradient into up to ~2e-5 here; a wrong reduction
    # moves the context by the learning rate's order (0.05).
    torch.testing.assert_close(two.context, one.context, rtol=0, atol=1e-4)
    assert two.token_indices == one.token_indices
    assert two.loss_history == pytest.approx(one.loss_history, rel=1e-4)


def test_artifact_round_trips_and_describes_the_run(uninterrupted):
    result = uninterrupted[2]
    loaded = load_artifact(result.folder)
    assert torch.equal(loaded.context, result.artifact.context)
    assert loaded.token_indices == result.artifact.token_indices
    assert len(loaded.token_indices) == 3 and len(set(loaded.token_indices)) == 3
    assert loaded.model == "skp_ray/tiny-sd15" and loaded.revision is None
    assert loaded.settings["num_workers"] == 2 and loaded.settings["lr"] == 0.05
    assert loaded.images == {"listed": 4, "used": 4, "skipped": {}, "used_for_token_selection": 4}
    assert len(loaded.loss_history) == 4
    metrics = [json.loads(line) for line in Path(result.folder, "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in metrics] == [1, 2, 3, 4]
    assert {"total", "sharpening", "equivariance", "images_per_s"} <= set(metrics[0])
    assert Image.open(result.loss_curve).size[0] > 100
    assert Image.open(result.picture).size[0] > 128
    assert result.resumed_from_step == 0


def wait_for_checkpoint(run_folder: Path) -> None:
    """Ray Train registers a reported checkpoint when it next polls its workers (every 2 s);
    a failure before then restarts from the checkpoint before. Wait until it is on record."""
    deadline = time.monotonic() + 60
    while not (run_folder / "train" / "checkpoint_manager_snapshot.json").exists():
        assert time.monotonic() < deadline, "the step-2 checkpoint was never registered"
        time.sleep(0.2)


def test_a_killed_worker_resumes_from_its_checkpoint(uninterrupted, images, tmp_path):
    marker = tmp_path / "killed"

    def kill_rank_1_at_step_3(rank, step, record):
        if rank == 1 and step == 2 and not marker.exists():  # steps count from 0: after the checkpoint at 2
            wait_for_checkpoint(tmp_path / "w2")
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    config = small_config(images, tmp_path, name="w2", num_workers=2, max_failures=2)
    result = run_discovery(config, on_step=kill_rank_1_at_step_3)
    assert marker.exists() and result.resumed_from_step == 2
    torch.testing.assert_close(result.artifact.context, uninterrupted[2].artifact.context, rtol=0, atol=1e-6)
    assert result.artifact.token_indices == uninterrupted[2].artifact.token_indices
    assert [round(v, 6) for v in result.artifact.loss_history] == [
        round(v, 6) for v in uninterrupted[2].artifact.loss_history
    ]


def test_rerunning_the_same_name_resumes_instead_of_starting_over(uninterrupted, images, tmp_path):
    def fail_at_step_3(rank, step, record):
        if step == 2:
            wait_for_checkpoint(tmp_path / "w1")
            raise RuntimeError("simulated crash")

    config = small_config(images, tmp_path, name="w1", num_workers=1)
    with pytest.raises(Exception, match="simulated crash"):
        run_discovery(config, on_step=fail_at_step_3)
    assert not (tmp_path / "w1" / "artifact.json").exists()

    changed = dataclasses.replace(config, lr=0.01)
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.05 -> 0.01\)"):
        run_discovery(changed)

    result = run_discovery(config)
    assert result.resumed_from_step == 2
    torch.testing.assert_close(result.artifact.context, uninterrupted[1].artifact.context, rtol=0, atol=1e-6)
    metrics = [json.loads(line) for line in Path(result.folder, "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in metrics] == [1, 2, 3, 4]  # no step lost or counted twice

    with pytest.raises(FileExistsError, match="an artifact already exists"):
        run_discovery(config)  # a finished artifact is never overwritten


def test_loss_decreases_and_unreadable_images_are_skipped(ray_session, tmp_path):
    data = tmp_path / "data"
    write_sample_images(data, n=4, size=128, seed=2)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (data / "notes.jpg").write_text("not an image")
    config = small_config(str(data), tmp_path, name="long", num_steps=32, checkpoint_every=16, preview_images=0, lr=0.1)
    result = run_discovery(config)
    losses = result.artifact.loss_history
    assert sum(losses[-6:]) / 6 < 0.85 * sum(losses[:6]) / 6, losses  # each step draws new transforms: noisy
    images = result.artifact.images
    assert images["listed"] == 6 and images["used"] == 4
    assert sum(images["skipped"].values()) == 2, images
    assert result.picture is None and not Path(result.folder, "keypoints.png").exists()  # preview_images=0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"data": "EMPTY"}, "no images found"),
        ({"data": "/nonexistent/folder"}, "does not exist"),
        ({"num_workers": 3}, "must be a multiple of --num-workers 3"),
        ({"dtype": "float8"}, "--dtype 'float8' is not one of"),
        ({"top_k": 10}, "--top_k \\(10\\) <= --furthest_point_num_samples \\(6\\)"),
    ],
)
def test_bad_input_fails_before_any_worker_starts(images, tmp_path, changes, message):
    changes = dict(changes)
    data = changes.pop("data", images)
    if data == "EMPTY":
        (tmp_path / "empty").mkdir()
        data = str(tmp_path / "empty")
    with pytest.raises(ValueError, match=message):
        run_discovery(small_config(data, tmp_path / "out", name="bad", **changes))
    assert not (tmp_path / "out" / "bad" / "train").exists()


def test_the_job_runs_from_a_yaml_config_with_flags_on_top(ray_session, tmp_path):
    """jobs/discover.py joins the running Ray (as under `ray job submit`), renders the sample images
    when given no data, and prints where its results are; paths relative to where it runs work."""
    (tmp_path / "discover.yaml").write_text(
        "num_steps: 2\nnum_tokens: 16\ntop_k: 3\nfurthest_point_num_samples: 6\nnum_indices: 4\n"
        "image_size: 128\nfeature_upsample_res: 32\naugmentation_iterations: 2\npreview_images: 2\n"
        "cpus_per_worker: 0.5\nlr: 0.5\n"
    )
    environment = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    command = [sys.executable, str(REPO / "jobs" / "discover.py"), "--config", "discover.yaml", "--lr", "0.02",
               "--output", "out", "--name", "cli"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.rstrip().splitlines()[-2:] == [
        "[discover] artifact: out/cli",
        "[discover] picture: out/cli/keypoints.png",
    ]
    artifact = load_artifact(str(tmp_path / "out" / "cli"))
    assert artifact.settings["lr"] == 0.02 and artifact.settings["num_steps"] == 2  # flag over file
    assert artifact.settings["checkpoint_every"] == 5  # the embedded default fills what neither sets
    assert artifact.images["used"] == 8 and (tmp_path / "out" / "sample-images" / "landmarks.json").exists()
    assert "step 2/2: loss" in result.stdout + result.stderr


def test_the_job_learns_from_photos_with_yaml_strings_for_numbers(ray_session, photos, tmp_path):
    """Ordinary photos (saturated regions, JPEG and PNG, not square) through jobs/discover.py, with the
    settings file as people write it: PyYAML reads 5e-3 and "0 1 2 3" as strings."""
    (tmp_path / "discover.yaml").write_text(
        "num_steps: 2\nnum_tokens: 16\ntop_k: 3\nfurthest_point_num_samples: 6\nnum_indices: 4\n"
        "image_size: 128\nfeature_upsample_res: 32\naugmentation_iterations: 2\npreview_images: 2\n"
        "cpus_per_worker: 0.5\nlr: 5e-3\nlayers: 0 1 2 3\n"
    )
    environment = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    command = [sys.executable, str(REPO / "jobs" / "discover.py"), "--config", "discover.yaml",
               "--data", str(photos), "--output", "out", "--name", "photos"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    artifact = load_artifact(str(tmp_path / "out" / "photos"))
    assert artifact.settings["lr"] == 0.005 and artifact.settings["layers"] == [0, 1, 2, 3]
    assert artifact.images["used"] == 4 and artifact.images["skipped"] == {}
    with Image.open(tmp_path / "out" / "photos" / "keypoints.png") as picture:
        assert picture.width > 0


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"lr": "fast"}, ValueError, "lr: expected a number, got 'fast'"),
        ({"model": "/nowhere/model"}, FileNotFoundError, "/nowhere/model"),
        ({"data": "UNREADABLE"}, ValueError, "only 0 of 5 images can be read"),
        ({"alpha": "black"}, ValueError, "--alpha 'black'"),
        ({"peak_disc": "square"}, ValueError, "--peak_disc 'square'"),
    ],
)
def test_a_refused_run_is_refused_on_the_driver_and_leaves_its_name_free(
    images, tmp_path, refuse_ray, changes, error, message
):
    refuse_ray("skp_ray.discovery")
    changes = dict(changes)
    data = changes.pop("data", images)
    if data == "UNREADABLE":
        data = tmp_path / "unreadable"
        data.mkdir()
        for i in range(5):
            (data / f"{i}.png").write_bytes(b"")
    with pytest.raises(error, match=message):
        run_discovery(small_config(str(data), tmp_path / "out", name="refused", **changes))
    assert not (tmp_path / "out" / "refused").exists()  # no run-settings.json: the name stays usable


def test_use_gpu_without_gpus_fails_after_a_bounded_wait(ray_session, images, tmp_path, capsys):
    with pytest.raises(TimeoutError, match="needs 1 GPU\\(s\\), and after [0-9]+ s the cluster has 0") as info:
        run_discovery(small_config(images, tmp_path / "out", name="gpu", use_gpu=True, gpu_wait_s=2))
    assert "--no-use-gpu" in str(info.value) and "--gpu_wait_s" in str(info.value)
    assert not (tmp_path / "out" / "gpu").exists()


def test_data_and_output_on_object_storage(ray_session, s3_endpoint, tmp_path):
    """Images read from a bucket, checkpoints and the artifact written back to it (moto's S3 server)."""
    import fsspec

    s3 = fsspec.filesystem("s3")
    s3.mkdir("skp-discovery")
    write_sample_images("s3://skp-discovery/images", n=4, size=128, seed=3)
    config = small_config("s3://skp-discovery/images/", "s3://skp-discovery/keypoints", name="s3run", num_steps=3)
    result = run_discovery(config)
    assert result.folder == "s3://skp-discovery/keypoints/s3run"
    loaded = load_artifact(result.folder)
    assert torch.equal(loaded.context, result.artifact.context) and loaded.images["used"] == 4
    s3.invalidate_cache()
    stored = {path.rsplit("/", 1)[-1] for path in s3.ls("skp-discovery/keypoints/s3run")}
    assert {"artifact.json", "context.safetensors", "metrics.jsonl", "loss.png", "keypoints.png", "train"} <= stored
    assert any(path.rsplit("/", 1)[-1].startswith("checkpoint_") for path in s3.ls("skp-discovery/keypoints/s3run/train"))
    with pytest.raises(FileExistsError):
        run_discovery(config)
