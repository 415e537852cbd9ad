"""Streaming labelling: inputs read by Ray Data, resume by the ids of the output's rows, bounded files,
and a driver killed mid-run (real local Ray, tiny model at 64 px, one augmentation)."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from skp_ray.artifact import KeypointArtifact, save_artifact
from skp_ray.label_resume import PendingImages
from skp_ray.label_store import OUTPUT_SCHEMA, label_file_name, label_files, read_labels
from skp_ray.labelling import LabelConfig, run_labelling
from skp_ray.model_source import TINY_MODEL
from skp_ray.progress import ProgressLog
from skp_ray.source_dataset import source_dataset

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("artifact") / "tiny64")
    context = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    settings = dict(image_size=64, feature_upsample_res=16, layers=[0, 1, 2, 3], noise_level=-1,
                    augment_degrees=15.0, augment_scale=[0.8, 1.0], augment_translate=[0.25, 0.25])  # fmt: skip
    save_artifact(KeypointArtifact(context, [3, 7], model=TINY_MODEL, settings=settings), folder)
    return folder


def write_images(folder: Path, count: int, seed: int) -> list[Path]:
    """``count`` distinct 24 x 24 noise PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"img_{i:04d}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
    return paths


def write_manifests(folder: Path, entries: list[str], shards: int) -> list[Path]:
    """``entries`` split round-robin into ``shards`` Parquet manifests ``part-<i>.parquet``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"part-{i}.parquet" for i in range(shards)]
    for i, path in enumerate(paths):
        pq.write_table(pa.table({"uri": entries[i::shards], "split": ["train"] * len(entries[i::shards])}), path)
    return paths


def config(artifact: str, input: str, output: str, **changes) -> LabelConfig:
    settings = dict(augmentation_iterations=1, batch_size=4, cpus_per_actor=0.5, progress=False, rows_per_file=16)
    return LabelConfig(artifact=artifact, input=input, output=output, **{**settings, **changes})


def raw_rows(output: Path) -> pd.DataFrame:
    """Every row of the output's label files, as written (no newest-row pick)."""
    return pd.concat([pd.read_parquet(path) for path in sorted(output.glob("labels-*.parquet"))])


def test_a_killed_driver_leaves_nothing_lost_or_twice_after_a_rerun(ray_session, artifact, tmp_path):
    images = write_images(tmp_path / "images", 240, seed=0)
    write_manifests(tmp_path / "manifests", [f"../images/{p.name}" for p in images], shards=4)
    output = tmp_path / "out"
    command = [sys.executable, "jobs/label.py", "--artifact", artifact, "--input", str(tmp_path / "manifests"),
               "--output", str(output), "--augmentation_iterations", "1", "--batch-size", "4",
               "--cpus_per_actor", "0.5", "--rows_per_file", "8", "--no-progress"]  # fmt: skip
    environment = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    driver = subprocess.Popen(command, cwd=REPO, env=environment, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(output.glob("labels-*.parquet")) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything in its session, at once
    driver.wait()
    written = list(output.glob("labels-*.parquet"))
    assert written, "the driver was killed before it wrote a row"
    time.sleep(3)  # Ray ends the dead driver's workers

    rerun = run_labelling(config(artifact, str(tmp_path / "manifests"), str(output)))
    expected = {str(p) for p in images}
    labels = read_labels(str(output)).to_pandas()
    assert len(labels) == 240 and set(labels["uri"]) == expected and (labels["status"] == "ok").all()
    rows = raw_rows(output)
    assert len(rows) == 240 and rows["image_id"].is_unique and set(rows["uri"]) == expected
    assert rerun.listed == 240 and rerun.already_labelled + rerun.labelled == 240 and rerun.labelled < 240


def test_sharded_manifests_a_folder_of_them_and_a_glob(ray_session, artifact, tmp_path):
    images = write_images(tmp_path / "images", 9, seed=1)
    write_manifests(tmp_path / "manifests", [f"../images/{p.name}" for p in images], shards=3)
    (tmp_path / "csv").mkdir()
    pd.DataFrame({"uri": [str(images[0]), "../images/" + images[1].name]}).to_csv(tmp_path / "csv" / "a.csv", index=False)
    (tmp_path / "list.txt").write_text(f"# two images\n\nimages/{images[2].name}\n  {images[3]}  \n")

    def listed(location, **options):
        return sorted(row["uri"] for row in source_dataset(location, **options).take_all())

    every = sorted(str(p) for p in images)
    assert listed(tmp_path / "manifests") == every
    assert listed(tmp_path / "manifests" / "part-*.parquet", split="train") == every
    assert listed(tmp_path / "manifests" / "part-[01].parquet") == sorted(str(p) for p in images[:2] + images[3:5] + images[6:8])
    assert listed(tmp_path / "csv") == [str(images[0]), str(images[1])]
    assert listed(tmp_path / "list.txt") == [str(images[2]), str(images[3])]
    with pytest.raises(ValueError, match="no 'split' column"):
        source_dataset(tmp_path / "csv" / "a.csv", split="train")

    summary = run_labelling(config(artifact, str(tmp_path / "manifests" / "part-*.parquet"), str(tmp_path / "out")))
    assert (summary.listed, summary.labelled) == (9, 9)
    assert sorted(read_labels(str(tmp_path / "out")).column("uri").to_pylist()) == every


def test_a_folder_is_listed_per_sub_folder_like_the_driver_would(ray_session, tmp_path):
    top = write_images(tmp_path / "in", 2, seed=2)
    deep = write_images(tmp_path / "in" / "a" / "b", 2, seed=3) + write_images(tmp_path / "in" / "c", 1, seed=4)
    (tmp_path / "in" / "c" / "._hidden.png").write_bytes(b"resource fork")
    (tmp_path / "in" / "c" / "notes.txt").write_text("not an image")
    rows = source_dataset(tmp_path / "in").take_all()
    assert sorted(row["uri"] for row in rows) == sorted(str(p) for p in top + deep)
    assert {row["listed_from"] for row in rows} == {str(tmp_path / "in"), str(tmp_path / "in" / "a"), str(tmp_path / "in" / "c")}


def test_a_rerun_on_a_fully_labelled_output_labels_and_writes_nothing(ray_session, artifact, tmp_path):
    images = write_images(tmp_path / "images", 6, seed=5)
    write_manifests(tmp_path / "m", [str(p) for p in images], shards=2)
    job = config(artifact, str(tmp_path / "m"), str(tmp_path / "out"), rows_per_file=2)
    first = run_labelling(job)
    files = sorted(p.name for p in (tmp_path / "out").glob("labels-*.parquet"))
    assert first.labelled == 6 and len(files) == 3  # files of rows_per_file rows
    again = run_labelling(job)
    assert (again.listed, again.already_labelled, again.labelled) == (6, 6, 0)
    assert sorted(p.name for p in (tmp_path / "out").glob("labels-*.parquet")) == files


def test_retry_errors_relabels_error_rows_through_a_manifest(ray_session, artifact, tmp_path):
    images = write_images(tmp_path / "images", 2, seed=6)
    broken = tmp_path / "images" / "late.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nhalf-uploaded")
    write_manifests(tmp_path / "m", [str(p) for p in images + [broken]], shards=2)
    job = config(artifact, str(tmp_path / "m"), str(tmp_path / "out"), max_error_fraction=1.0)
    assert run_labelling(job).errors == {"truncated": 1}
    broken.write_bytes(images[0].read_bytes())
    assert run_labelling(job).labelled == 0
    retried = run_labelling(dataclasses.replace(job, retry_errors=True))
    assert (retried.listed, retried.already_labelled, retried.labelled, retried.errors) == (3, 2, 1, {})
    labels = read_labels(str(tmp_path / "out")).to_pandas().set_index("uri")
    assert len(labels) == 3 and labels.loc[str(broken), "status"] == "ok"
    assert len(raw_rows(tmp_path / "out")) == 4  # the error row stays; the newest row wins


def test_a_uri_in_two_manifest_files_is_one_row(ray_session, artifact, tmp_path):
    images = write_images(tmp_path / "images", 3, seed=7)
    (tmp_path / "m").mkdir()
    pq.write_table(pa.table({"uri": [f"../images/{images[0].name}", str(images[1])]}), tmp_path / "m" / "a.parquet")
    pq.write_table(pa.table({"uri": [str(images[0]), str(images[2]), str(images[2])]}), tmp_path / "m" / "b.parquet")
    summary = run_labelling(config(artifact, str(tmp_path / "m"), str(tmp_path / "out")))
    assert (summary.listed, summary.labelled) == (3, 3)
    rows = raw_rows(tmp_path / "out")
    assert sorted(rows["uri"]) == sorted(str(p) for p in images)


def write_rows(output: Path, statuses: dict[str, str]) -> None:
    """One label file holding a row per id with the given status (other columns null)."""
    output.mkdir(parents=True, exist_ok=True)
    count = len(statuses)
    columns = {field.name: pa.nulls(count, field.type) for field in OUTPUT_SCHEMA}
    columns["image_id"] = pa.array(list(statuses), pa.string())
    columns["status"] = pa.array(list(statuses.values()), pa.string())
    pq.write_table(pa.table(columns, schema=OUTPUT_SCHEMA), output / label_file_name("abc0", "w0", 0))


def test_the_resume_filter_by_hand(ray_session, tmp_path):
    write_rows(tmp_path / "out", {"a": "ok", "b": "error"})
    files = label_files(str(tmp_path / "out"))
    pending = PendingImages.remote(files, False)
    first = ray.get(pending.claim.remote(np.array(["a", "c", "c", "d"], dtype=object), "block-1"))
    assert first.tolist() == [False, True, False, True]  # a has a row; c listed twice is labelled once
    assert ray.get(pending.claim.remote(np.array(["a", "c", "c", "d"], dtype=object), "block-1")).tolist() == first.tolist()
    second = ray.get(pending.claim.remote(np.array(["d", "b", "e"], dtype=object), "block-2"))
    assert second.tolist() == [False, False, True]
    assert ray.get(pending.totals.remote()) == {"listed": 5, "already_labelled": 2}  # a c d b e; a and b
    ray.get([pending.add.remote(2, 1, 100.0, 104.0), pending.add.remote(1, 0, 99.0, 103.0)])  # the detectors' counts
    assert ray.get(pending.snapshot.remote()) == {"done": 3, "failed": 1, "working_seconds": 5.0}  # 99 s to 104 s
    retrying = PendingImages.remote(files, True)  # b has an error row only: labelled again
    assert ray.get(retrying.claim.remote(np.array(["a", "b"], dtype=object), "k")).tolist() == [False, True]


def test_progress_lines_say_when_the_total_is_not_final():
    snapshot = {"done": 30, "failed": 2, "working_seconds": 10.0}  # 3 images/s
    streaming = ProgressLog(None, lambda: 120, interval_s=60)
    assert streaming.line(snapshot) == (
        "[label] 30/120 images listed so far (2 errors; the total grows until the listing finishes), "
        "3.00 images/s, ETA 30s for those listed so far"
    )
    assert streaming.line(snapshot, total=300) == "[label] 30/300 images (10.0 %, 2 errors), 3.00 images/s, ETA 1m30s"
