"""The labelling pipeline on a real local Ray (Ray Data actors on the CPU, tiny model)."""

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import ray.data
import torch
from PIL import Image

from skp_ray.artifact import KeypointArtifact, load_artifact, save_artifact
from skp_ray.detection import detect_keypoints
from skp_ray.diffusion import load_diffusion
from skp_ray.images import ImageSource, decode_batch, load_source, pixels_from_uint8, pixels_to_uint8, source_item
from skp_ray.label_detector import detection_generator, detection_options
from skp_ray.label_store import OUTPUT_SCHEMA, read_labels
from skp_ray.labelling import LabelConfig, LabellingFailed, image_id, run_labelling
from skp_ray.lease import LeaseHeldError, OutputLease
from skp_ray.model_source import TINY_MODEL, ModelNotFoundError, model_location
from skp_ray.ray_cluster import parse_actors, quiet_cpu_alarm
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
    assert table.schema.remove_metadata() == OUTPUT_SCHEMA.remove_metadata()
    for written in (tmp_path / "out").glob("labels-*.parquet"):  # each file says it is ours
        assert pq.read_schema(written).metadata[b"skp_ray.labels"] == b"1"
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
    # as in a CPU actor: a channels-last VAE, one thread (Ray gives a 0.5-CPU actor one), so sums round alike
    diffusion = load_diffusion(model_location(loaded.model), device="cpu", text_encoder=False, channels_last_vae=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        direct = [detect_directly(diffusion, loaded, row.uri) for row in rows.itertuples()]
    finally:
        torch.set_num_threads(threads)
    for row, (points, peaks) in zip(rows.itertuples(), direct):
        expected_xy = points[0].flip(-1).numpy()
        np.testing.assert_allclose(np.stack(row.keypoints_xy_normalized), expected_xy, atol=1e-6)
        np.testing.assert_allclose(np.stack(row.keypoints_xy), expected_xy * [row.width, row.height], atol=1e-4)
        np.testing.assert_allclose(row.peaks, peaks[0].numpy(), rtol=1e-5)


def job_view(uri: str, size: int):
    """What the job's detector gets for ``uri``: pixels at the model's size, through uint8; the content hash."""
    loaded = load_source(ImageSource(uri), size=size)
    return pixels_from_uint8(pixels_to_uint8(loaded.pixels))[None], loaded.content_hash


def detect_directly(diffusion, loaded, uri):
    pixels, digest = job_view(uri, loaded.settings["image_size"])
    return detect_keypoints(
        diffusion, pixels, loaded.context, loaded.token_indices, augmentation_iterations=2,
        generator=detection_generator(7, digest), **detection_options(loaded.settings),
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


def job(artifact: str, input: str, output: str, *options: str) -> list[str]:
    return [sys.executable, "jobs/label.py", "--artifact", artifact, "--input", input, "--output", output,
            "--augmentation_iterations", "2", "--cpus_per_actor", "0.5", "--no-progress", *options]  # fmt: skip


def run_job(ray_session, command: list[str]) -> subprocess.CompletedProcess:
    environment = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=500)


def test_the_job_labels_photos_and_logs_progress_and_a_summary(ray_session, artifact, photos, tmp_path):
    shutil.copytree(photos, tmp_path / "in")
    (tmp_path / "in" / "bad.png").write_text("nope")
    output = tmp_path / "out"
    result = run_job(ray_session, job(artifact, str(tmp_path / "in"), str(output), "--log_every_s", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[label] done: 5 images labelled (4 ok, 1 errors: not_an_image 1)" in result.stdout
    assert f"failed: {tmp_path / 'in' / 'bad.png'} (not_an_image)" in result.stdout
    assert re.search(r"\[label\] 5/5 images \(100.0 %, 1 errors\), [0-9.]+ images/s, ETA", result.stdout)
    assert result.stdout.rstrip().endswith(f"[label] output: {output}")
    (summary_file,) = (output / "_summary").glob("*.json")
    summary = json.loads(summary_file.read_text())
    assert summary["status"] == "ok" and summary["counts"] == {
        "listed": 5, "already_labelled": 0, "labelled": 5, "ok": 4, "errors": 1
    }  # fmt: skip
    assert summary["error_causes"] == {"not_an_image": 1}
    assert summary["failures"][0]["uri"] == str(tmp_path / "in" / "bad.png")
    assert 0 < summary["timings"]["labelling_s"] < summary["timings"]["total_s"]
    rows = read_labels(str(output))
    assert sorted(rows.column("status").to_pylist()) == ["error"] + ["ok"] * 4


def test_a_run_where_too_many_images_fail_exits_non_zero_after_writing(ray_session, artifact, tmp_path):
    write_sample_images(tmp_path / "in", n=1, size=64, seed=13)
    for name in ("a.png", "b.png"):
        (tmp_path / "in" / name).write_bytes(b"")
    with pytest.raises(LabellingFailed, match="2 of 3 images failed") as info:
        run_labelling(config(artifact, str(tmp_path / "in"), str(tmp_path / "out"), max_error_fraction=0.5))
    assert info.value.summary.labelled == 3 and len(pd.read_parquet(tmp_path / "out")) == 3
    (summary_file,) = (tmp_path / "out" / "_summary").glob("*.json")
    record = json.loads(summary_file.read_text())
    assert record["status"] == "failed" and {f["uri"] for f in record["failures"]} == {
        str(tmp_path / "in" / "a.png"), str(tmp_path / "in" / "b.png")
    }  # fmt: skip

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_text("no image")
    result = run_job(ray_session, job(artifact, str(tmp_path / "broken"), str(tmp_path / "out2")))
    assert result.returncode == 1 and "every one of the 1 images labelled failed" in result.stderr
    assert len(pd.read_parquet(tmp_path / "out2")) == 1


def test_files_that_are_not_ours_are_never_touched(ray_session, artifact, tmp_path, capsys):
    write_sample_images(tmp_path / "in", n=2, size=64, seed=14)
    output = tmp_path / "out"
    (output / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2]}), output / "my_table.parquet")
    pq.write_table(pa.table({"uri": ["elsewhere.png"]}), output / "sub" / "manifest.parquet")
    pq.write_table(pa.table({"image_id": ["forged"]}), output / "labels-abc-def-000000-0.parquet")  # no metadata
    (output / "notes.txt").write_text("mine")
    before = {path: path.read_bytes() for path in output.rglob("*") if path.is_file()}
    assert run_labelling(config(artifact, str(tmp_path / "in"), str(output))).labelled == 2
    assert run_labelling(config(artifact, str(tmp_path / "in"), str(output))).labelled == 0
    assert {path: path.read_bytes() for path in before} == before
    assert not list(output.glob("_incomplete-*"))
    log = capsys.readouterr().out
    assert log.count("ignoring 4 entries") == 2  # once per run
    assert "my_table.parquet" in log and len(read_labels(str(output))) == 2


def test_one_bad_entry_never_stops_a_run(ray_session, artifact, tmp_path):
    write_sample_images(tmp_path / "in", n=1, size=64, seed=15)
    good = tmp_path / "in" / "sample_000.png"
    for name in ("crop.png", "masked.png"):
        (tmp_path / "in" / name).write_bytes(good.read_bytes())
    Image.new("L", (64, 32), 255).save(tmp_path / "in" / "wide_mask.png")
    rows = [
        {"uri": str(good), "crop_box": None, "mask_uri": None},
        {"uri": "nosuchscheme://bucket/a.png", "crop_box": None, "mask_uri": None},
        {"uri": str(tmp_path / "in" / "crop.png"), "crop_box": [40, 0, 10, 30], "mask_uri": None},
        {"uri": str(tmp_path / "in" / "masked.png"), "crop_box": None, "mask_uri": str(tmp_path / "in" / "wide_mask.png")},
        {"uri": "s3://skp-no-such-bucket/a.png", "crop_box": None, "mask_uri": None},
    ]  # fmt: skip
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    summary = run_labelling(config(artifact, str(manifest), str(tmp_path / "out"), max_error_fraction=1.0))
    assert summary.labelled == 5
    frame = pd.read_parquet(tmp_path / "out").set_index("uri")
    assert frame.loc[str(good), "status"] == "ok"
    assert frame.loc["nosuchscheme://bucket/a.png", "error_cause"] == "unsupported_scheme"
    crop = frame.loc[str(tmp_path / "in" / "crop.png")]
    assert crop.error_cause == "bad_crop" and "(40, 0, 10, 30)" in crop.error and "crop.png" in crop.error
    assert frame.loc[str(tmp_path / "in" / "masked.png"), "error_cause"] == "bad_mask"
    assert frame.loc["s3://skp-no-such-bucket/a.png", "error_cause"] in ("not_found", "permission_denied", "storage_error")


def test_what_would_fail_every_image_is_refused_on_the_driver(artifact, tmp_path, refuse_ray):
    refuse_ray("skp_ray.labelling")
    write_sample_images(tmp_path / "in", n=1, size=32)
    loaded = load_artifact(artifact)
    no_model = str(tmp_path / "no-model")
    save_artifact(KeypointArtifact(loaded.context, loaded.token_indices, model="/nowhere/model"), no_model)
    with pytest.raises(ModelNotFoundError, match="/nowhere/model"):
        run_labelling(config(no_model, str(tmp_path / "in"), str(tmp_path / "out")))
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError):
        run_labelling(config(artifact, str(tmp_path / "in"), str(tmp_path / "file" / "out")))
    with OutputLease(str(tmp_path / "busy"), "nightly-1"):
        with pytest.raises(LeaseHeldError, match="run nightly-1"):
            run_labelling(config(artifact, str(tmp_path / "in"), str(tmp_path / "busy")))
    with pytest.raises(ValueError, match="max_error_fraction: expected a number"):
        run_labelling(config(artifact, str(tmp_path / "in"), str(tmp_path / "out"), max_error_fraction="half"))
    wider = str(tmp_path / "wider-model")
    shutil.copytree(model_location(loaded.model), wider)
    unet_config = Path(wider, "unet", "config.json")
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "cross_attention_dim": 64}))
    with pytest.raises(ValueError, match=rf"tokens x {loaded.context.shape[1]}, but .*wider-model .* width 64.*drop --model"):
        run_labelling(config(artifact, str(tmp_path / "in"), str(tmp_path / "out"), model=wider))


def test_a_damaged_artifact_file_is_named(artifact, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(artifact, damaged)
    (damaged / "context.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="context.safetensors"):
        load_artifact(str(damaged))
    (damaged / "context.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="context.safetensors"):
        load_artifact(str(damaged))


def test_retry_errors_relabels_images_whose_only_rows_are_errors(ray_session, artifact, tmp_path):
    write_sample_images(tmp_path / "in", n=1, size=64, seed=16)
    late = tmp_path / "in" / "late.png"
    late.write_bytes(b"\x89PNG\r\n\x1a\nhalf-uploaded")
    job_config = config(artifact, str(tmp_path / "in"), str(tmp_path / "out"), max_error_fraction=1.0)
    assert run_labelling(job_config).errors == {"truncated": 1}
    write_sample_images(tmp_path / "fixed", n=1, size=64, seed=17)
    late.write_bytes((tmp_path / "fixed" / "sample_000.png").read_bytes())
    assert run_labelling(job_config).labelled == 0  # without --retry_errors an error row counts as done
    retried = run_labelling(dataclasses.replace(job_config, retry_errors=True))
    assert (retried.labelled, retried.errors) == (1, {})
    assert len(pd.read_parquet(tmp_path / "out")) == 3  # the error row stays; the newest row wins
    labels = read_labels(str(tmp_path / "out")).to_pandas().set_index("uri")
    assert len(labels) == 2 and labels.loc[str(late), "status"] == "ok"


def test_identical_files_get_identical_keypoints(ray_session, artifact, tmp_path):
    write_sample_images(tmp_path / "in", n=2, size=64, seed=18)
    (tmp_path / "in" / "copy.png").write_bytes((tmp_path / "in" / "sample_000.png").read_bytes())
    run_labelling(config(artifact, str(tmp_path / "in"), str(tmp_path / "out")))
    rows = pd.read_parquet(tmp_path / "out").set_index("uri")
    original, copy = rows.loc[str(tmp_path / "in" / "sample_000.png")], rows.loc[str(tmp_path / "in" / "copy.png")]
    assert original.image_id != copy.image_id and original.content_hash == copy.content_hash
    np.testing.assert_array_equal(np.stack(original.keypoints_xy), np.stack(copy.keypoints_xy))
    np.testing.assert_array_equal(original.peaks, copy.peaks)
    other = rows.loc[str(tmp_path / "in" / "sample_001.png")]
    assert other.content_hash != original.content_hash


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


def test_decoded_batches_have_no_pickled_columns(ray_session, tmp_path):
    """Rows with and without a crop box travel as plain Arrow columns: Ray Data never falls back to
    pickling a column (which it logs as a warning and which costs every row a pickle)."""
    write_sample_images(tmp_path / "in", n=2, size=48, seed=19)
    uris = sorted(str(path) for path in (tmp_path / "in").glob("*.png"))
    sources = [ImageSource(uris[0], crop_box=(0, 0, 32, 40)), ImageSource(uris[1])]
    decoded = ray.data.from_items([source_item(source) for source in sources]).map_batches(
        decode_batch, fn_kwargs={"size": 32, "max_pixels": 10**6, "alpha": "white"}, batch_size=2, num_cpus=0.5
    )
    schema = decoded.schema()
    pickled = [name for name, kind in zip(schema.names, schema.types) if "PythonObject" in type(kind).__name__]
    assert not pickled, schema
    rows = decoded.take_all()
    assert [list(row["crop_box"]) for row in rows] == [[0, 0, 32, 40], [0, 0, 0, 0]]
    assert [bool(row["has_crop"]) for row in rows] == [True, False]


def test_ray_datas_false_cpu_alarm_is_dropped_while_labelling(caplog):
    """After a write has run, Ray Data re-checks for a free CPU while the finished actor pool still holds
    them, and warns that the job "will hang". The pipeline drops that line, and only that one."""
    dataset_logger = logging.getLogger("ray.data.dataset")
    alarm = "Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will hang"
    with caplog.at_level(logging.WARNING, logger="ray.data.dataset"), quiet_cpu_alarm():
        dataset_logger.warning(alarm)
        dataset_logger.warning("another warning")
    assert [record.getMessage() for record in caplog.records] == ["another warning"]
    dataset_logger.warning(alarm)  # outside a labelling run Ray's own warnings are left alone
    assert caplog.records[-1].getMessage() == alarm
