"""The labelling pipeline on a real local Ray (Ray Data actors on the CPU, tiny model)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import torch
from PIL import Image

from skp_ray.artifact import KeypointArtifact, load_artifact, save_artifact
from skp_ray.detection import detect_keypoints
from skp_ray.diffusion import TINY_MODEL, load_diffusion, model_location
from skp_ray.images import read_image, to_tensor
from skp_ray.labelling import (
    OUTPUT_SCHEMA,
    LabelConfig,
    detection_generator,
    detection_options,
    image_id,
    parse_actors,
    run_labelling,
)
from skp_ray.samples import write_sample_images

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(600)  # a hung Ray run fails here instead of eating CI's budget
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # on_batch runs in Ray actors


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> str:
    """A small artifact for the tiny model (no discovery run needed to test labelling)."""
    folder = str(tmp_path_factory.mktemp("artifact") / "tiny")
    context = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    settings = dict(image_size=128, feature_upsample_res=32, layers=[0, 1, 2, 3], noise_level=-1,
                    augment_degrees=15.0, augment_scale=[0.8, 1.0], augment_translate=[0.25, 0.25])  # fmt: skip
    save_artifact(KeypointArtifact(context, [3, 7, 11], model=TINY_MODEL, settings=settings), folder)
    return folder


def config(artifact: str, input: str, output: str, **changes) -> LabelConfig:
    settings = dict(augmentation_iterations=2, batch_size=2, cpus_per_actor=0.5, progress=False, max_pixels=200_000)
    return LabelConfig(artifact=artifact, input=input, output=output, **{**settings, **changes})


def write_awkward_images(folder: Path) -> dict[str, str]:
    """Images in every mode the issue names, and broken files; returns file name -> expected error cause."""
    write_sample_images(folder, n=2, size=96, seed=4)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8), "RGB")
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (64, 64), dtype=np.uint16)).save(folder / "deep16.png")
    Image.new("RGB", (600, 400)).save(folder / "huge.png")  # above the test's max_pixels
    data = (folder / "gray.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    return {"huge.png": "too_large", "truncated.png": "truncated", "empty.jpg": "empty", "notes.jpg": "not_an_image"}


def test_every_image_gets_one_row_with_the_documented_schema(ray_session, artifact, tmp_path):
    broken = write_awkward_images(tmp_path / "in")
    summary = run_labelling(config(artifact, str(tmp_path / "in"), str(tmp_path / "out")))
    table = pq.read_table(tmp_path / "out")
    assert table.schema.remove_metadata() == OUTPUT_SCHEMA
    frame = pd.read_parquet(tmp_path / "out")
    names = frame["uri"].map(lambda uri: Path(uri).name)
    assert sorted(names) == sorted(p.name for p in (tmp_path / "in").iterdir() if p.name != "landmarks.json")
    assert frame["image_id"].is_unique and (frame["image_id"] == frame["uri"].map(image_id)).all()
    for name, row in zip(names, frame.itertuples()):
        if name in broken:
            assert row.status == "error" and row.error_cause == broken[name] and name in row.error, row
            assert row.keypoints_xy is None and pd.isna(row.width)
        else:
            assert row.status == "ok" and pd.isna(row.error) and len(row.keypoints_xy) == 3, row
    assert summary.labelled == len(frame) and summary.errors == {cause: 1 for cause in broken.values()}
    gray = frame[names == "gray.png"].iloc[0]
    assert (gray.width, gray.height) == (120, 80)


def test_keypoints_equal_a_direct_detect_keypoints_call(ray_session, artifact, tmp_path):
    write_sample_images(tmp_path / "in", n=3, size=100, seed=5)
    run_labelling(config(artifact, str(tmp_path / "in"), str(tmp_path / "out"), seed=7))
    rows = pd.read_parquet(tmp_path / "out")
    loaded = load_artifact(artifact)
    diffusion = load_diffusion(model_location(loaded.model), device="cpu", text_encoder=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actor (Ray gives it one thread), so sums round alike
    try:
        direct = [detect_directly(diffusion, loaded, row.uri) for row in rows.itertuples()]
    finally:
        torch.set_num_threads(threads)
    for row, (points, peaks) in zip(rows.itertuples(), direct):
        expected_xy = points[0].flip(-1).numpy()
        np.testing.assert_allclose(np.stack(row.keypoints_xy_normalized), expected_xy, atol=1e-6)
        np.testing.assert_allclose(np.stack(row.keypoints_xy), expected_xy * [row.width, row.height], atol=1e-4)
        np.testing.assert_allclose(row.peaks, peaks[0].numpy(), rtol=1e-5)


def detect_directly(diffusion, loaded, uri):
    image = to_tensor(read_image(uri))
    return detect_keypoints(
        diffusion, image[None], loaded.context, loaded.token_indices, augmentation_iterations=2,
        generator=detection_generator(7, image_id(uri)), **detection_options(loaded.settings),
    )  # fmt: skip


def test_an_interrupted_run_resumes_without_duplicates_or_gaps(ray_session, artifact, tmp_path):
    write_sample_images(tmp_path / "in", n=8, size=64, seed=6)
    marker = tmp_path / "batches"

    def stop_after_two_batches(rows):
        marker.write_text(str(int(marker.read_text() or 0) + 1) if marker.exists() else "1")
        if int(marker.read_text()) > 2:
            raise RuntimeError("simulated stop")

    job = config(artifact, str(tmp_path / "in"), str(tmp_path / "out"), batch_size=1)
    with pytest.raises(Exception, match="simulated stop"):
        run_labelling(job, on_batch=stop_after_two_batches)
    written = pd.read_parquet(tmp_path / "out") if (tmp_path / "out").exists() else pd.DataFrame({"image_id": []})
    assert len(written) < 8

    resumed = run_labelling(job)
    assert resumed.already_labelled == len(written) and resumed.labelled == 8 - len(written)
    rows = pd.read_parquet(tmp_path / "out")
    assert len(rows) == 8 and rows["image_id"].is_unique

    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    again = run_labelling(job)
    assert again.labelled == 0 and again.already_labelled == 8
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == files  # nothing written


def test_a_grown_input_labels_only_the_new_images(ray_session, artifact, tmp_path):
    write_sample_images(tmp_path / "in", n=2, size=64, seed=8)
    run_labelling(config(artifact, str(tmp_path / "in"), str(tmp_path / "out")))
    (tmp_path / "in" / "late.png").write_bytes((tmp_path / "in" / "sample_000.png").read_bytes())
    second = run_labelling(config(artifact, str(tmp_path / "in"), str(tmp_path / "out")))
    assert (second.already_labelled, second.labelled) == (2, 1)
    assert len(pd.read_parquet(tmp_path / "out")) == 3


def test_a_cut_off_output_file_is_set_aside_and_its_images_relabelled(ray_session, artifact, tmp_path):
    write_sample_images(tmp_path / "in", n=2, size=64, seed=9)
    run_labelling(config(artifact, str(tmp_path / "in"), str(tmp_path / "out"), batch_size=2))
    (written,) = list((tmp_path / "out").glob("*.parquet"))
    written.write_bytes(written.read_bytes()[:50])  # as if the writer died mid-file
    summary = run_labelling(config(artifact, str(tmp_path / "in"), str(tmp_path / "out"), batch_size=2))
    assert summary.labelled == 2 and (written.parent / f"_incomplete-{written.name}").exists()
    assert len(pd.read_parquet(tmp_path / "out")) == 2


def test_buckets_in_and_out_through_a_real_s3_server(ray_session, s3_endpoint, artifact, tmp_path):
    import fsspec

    s3 = fsspec.filesystem("s3")
    s3.mkdir("skp-label")
    write_sample_images("s3://skp-label/images", n=3, size=64, seed=10)
    s3.pipe_file("skp-label/images/broken.png", b"\x89PNG\r\n\x1a\nbroken")
    summary = run_labelling(config(artifact, "s3://skp-label/images/", "s3://skp-label/labels"))
    assert summary.labelled == 4 and summary.errors == {"truncated": 1}
    s3.invalidate_cache()
    rows = pq.read_table("s3://skp-label/labels/").to_pandas()
    assert set(rows["uri"]) == {f"s3://skp-label/images/sample_00{i}.png" for i in range(3)} | {
        "s3://skp-label/images/broken.png"
    }
    assert run_labelling(config(artifact, "s3://skp-label/images/", "s3://skp-label/labels")).labelled == 0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"actors": "0"}, "--actors '0'"),
        ({"actors": "4,2"}, "MIN,MAX"),
        ({"dtype": "int8"}, "--dtype 'int8'"),
        ({"artifact": "/nonexistent"}, "not a keypoint artifact"),
        ({"input": "/nonexistent"}, "does not exist"),
    ],
)
def test_bad_input_is_a_clear_error(artifact, tmp_path, changes, message):
    write_sample_images(tmp_path / "in", n=1, size=32)
    job = config(artifact, str(tmp_path / "in"), str(tmp_path / "out"))
    for key, value in changes.items():
        setattr(job, key, value)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_labelling(job)


def test_actor_pool_sizes():
    assert parse_actors("3").min_size == parse_actors("3").max_size == 3
    pool = parse_actors("1,8")
    assert (pool.min_size, pool.max_size) == (1, 8)


def test_the_job_prints_a_summary(ray_session, artifact, tmp_path):
    write_sample_images(tmp_path / "in", n=2, size=64, seed=11)
    (tmp_path / "in" / "bad.png").write_text("nope")
    environment = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    command = [sys.executable, "jobs/label.py", "--artifact", artifact, "--input", str(tmp_path / "in"),
               "--output", str(tmp_path / "out"), "--augmentation_iterations", "2", "--cpus_per_actor", "0.5",
               "--no-progress"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[label] done: 3 images labelled (2 ok, 1 errors: not_an_image 1)" in result.stdout
    assert result.stdout.rstrip().endswith(f"[label] output: {tmp_path / 'out'}")


def test_a_preempted_actor_loses_and_duplicates_nothing(ray_session, artifact, tmp_path):
    """An actor killed outright (as a spot GPU node would be) mid-run: Ray Data restarts it and
    retries its batch, and every image still ends with exactly one row."""
    write_sample_images(tmp_path / "in", n=6, size=64, seed=12)
    marker = tmp_path / "killed"

    def kill_after_first_batch(rows):
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    job = config(artifact, str(tmp_path / "in"), str(tmp_path / "out"), batch_size=1)
    summary = run_labelling(job, on_batch=kill_after_first_batch)
    assert marker.exists()
    rows = pd.read_parquet(tmp_path / "out")
    assert len(rows) == 6 and rows["image_id"].is_unique and (rows["status"] == "ok").all()
    assert summary.labelled == 6
