"""Labelling at corpus scale: driver memory and start-up against the number of URIs, and a rerun with nothing to do.

    python benchmarks/label_scale.py [--sizes 10000 100000 1000000] [--seconds 60] [--image_size 64]

For each size N it writes a manifest of N URIs (hardlinks of a few tiny PNGs, so
N files cost directory entries only) as several Parquet files, and runs
``jobs/label.py`` on it as a user would (its own local Ray, the embedded tiny
model with a random artifact, one augmentation), stopping it after
``--seconds``. Measured from outside the driver: its peak RSS (VmHWM), the
seconds until the first row file is readable, and rows/s in steady state (rows
written after the first file, over the time since). Then a rerun: an output
holding a row for every URI (written here in the output schema, not labelled)
is labelled again to completion, which must label nothing: its wall time and
driver peak RSS. Prints the figures and their JSON (``--output``: also written
there) and appends a dated section to benchmarks/RESULTS.md (``--no-write``:
print only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from skp_ray.artifact import KeypointArtifact, save_artifact
from skp_ray.label_store import OUTPUT_SCHEMA, label_file_name
from skp_ray.labelling import image_id
from skp_ray.model_source import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
MANIFEST_ROWS_PER_FILE = 100_000
DISTINCT_IMAGES = 16
LINKS_PER_FOLDER = 10_000


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long each labelling run goes on")
    parser.add_argument("--image_size", type=int, default=64, help="model input side")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rows_per_file", type=int, default=64, help="the job's --rows_per_file: when a file appears")
    parser.add_argument("--workdir", help="where the images, manifests and outputs go; default: a temporary folder")
    parser.add_argument("--output", help="write the JSON of the run here too")
    parser.add_argument("--no-write", action="store_true", help="print without appending to RESULTS.md")
    return parser.parse_args()


def tiny_images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(DISTINCT_IMAGES):
        path = folder / f"image-{index:02d}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def linked_uris(images: list[Path], folder: Path, count: int) -> list[str]:
    """``count`` distinct paths, each a hardlink of one of ``images`` (created once, reused across sizes)."""
    uris = []
    for index in range(count):
        path = folder / f"{index // LINKS_PER_FOLDER:04d}" / f"{index:07d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(images[index % len(images)], path)
        uris.append(str(path))
    return uris


def write_manifest(uris: list[str], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, len(uris), MANIFEST_ROWS_PER_FILE)):
        table = pa.table({"uri": uris[start : start + MANIFEST_ROWS_PER_FILE]})
        pq.write_table(table, folder / f"part-{part:04d}.parquet")
    return folder


def random_artifact(folder: Path, image_size: int) -> Path:
    """16 random tokens for the tiny model, 4 of them keypoints: what they are does not change the cost."""
    context = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    settings = dict(image_size=image_size, feature_upsample_res=image_size // 4, layers=[0, 1, 2, 3], noise_level=-1)
    save_artifact(KeypointArtifact(context, [1, 4, 9, 12], model=TINY_MODEL, settings=settings), str(folder))
    return folder


def labelled_output(uris: list[str], folder: Path, rows_per_file: int = 100_000) -> Path:
    """An output holding an ok row for every URI, in the output schema (other columns null)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    for part, start in enumerate(range(0, len(uris), rows_per_file)):
        chunk = uris[start : start + rows_per_file]
        given = {
            "image_id": [image_id(uri) for uri in chunk],
            "uri": chunk,
            "status": ["ok"] * len(chunk),
            "artifact_id": ["benchmark"] * len(chunk),
            "model": [TINY_MODEL] * len(chunk),
            "labelled_at": [now] * len(chunk),
            "run_id": ["0123456789ab"] * len(chunk),
        }
        columns = [
            pa.array(given[field.name], field.type) if field.name in given else pa.nulls(len(chunk), field.type)
            for field in OUTPUT_SCHEMA
        ]
        table = pa.Table.from_arrays(columns, schema=OUTPUT_SCHEMA)
        pq.write_table(table, folder / label_file_name("0123456789ab", "prefilled", part))
    return folder


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def written_rows(output: Path) -> int:
    """Rows in the readable label files (a file still being written is not counted)."""
    rows = 0
    for path in output.glob("labels-*.parquet"):
        try:
            rows += pq.read_metadata(path).num_rows
        except Exception:  # noqa: BLE001 - a file still being written has no footer yet
            pass
    return rows


def label_command(artifact: Path, manifest: Path, output: Path, args) -> list[str]:
    return [
        sys.executable, str(REPO / "jobs" / "label.py"),
        "--artifact", str(artifact), "--input", str(manifest), "--output", str(output),
        "--augmentation_iterations", "1", "--batch_size", str(args.batch_size),
        "--cpus_per_actor", "0.5", "--rows_per_file", str(args.rows_per_file),
        "--no-progress", "--log_every_s", "10",
    ]  # fmt: skip


def timed_labelling(command: list[str], output: Path, seconds: float | None, log: Path) -> dict:
    """Runs the job (killed after ``seconds``, or to its end when None), watching the driver from outside."""
    started = time.perf_counter()
    with log.open("w") as sink:
        driver = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    first_row_s = rows_at_first = None
    peak = 0.0
    while driver.poll() is None:
        elapsed = time.perf_counter() - started
        peak = max(peak, peak_rss_mb(driver.pid) or 0.0)
        if first_row_s is None and written_rows(output):
            first_row_s, rows_at_first = elapsed, written_rows(output)
        if seconds is not None and elapsed >= seconds:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
            break
        time.sleep(0.5)
    wall_s = time.perf_counter() - started
    rows = written_rows(output)
    steady = None
    if first_row_s is not None and wall_s > first_row_s + 1:
        steady = (rows - rows_at_first) / (wall_s - first_row_s)
    return {
        "exit_code": driver.returncode,
        "wall_s": round(wall_s, 1),
        "driver_peak_rss_mb": round(peak, 1),
        "first_row_s": None if first_row_s is None else round(first_row_s, 1),
        "rows_written": rows,
        "rows_per_s_steady": None if steady is None else round(steady, 2),
    }


def measure_size(count: int, images: list[Path], artifact: Path, workdir: Path, args) -> dict:
    uris = linked_uris(images, workdir / "links", count)
    manifest = write_manifest(uris, workdir / "manifests" / str(count))
    fresh_output = workdir / "outputs" / f"fresh-{count}"
    fresh = timed_labelling(
        label_command(artifact, manifest, fresh_output, args), fresh_output, args.seconds, workdir / f"fresh-{count}.log"
    )
    full_output = labelled_output(uris, workdir / "outputs" / f"full-{count}")
    rerun = timed_labelling(
        label_command(artifact, manifest, full_output, args), full_output, None, workdir / f"rerun-{count}.log"
    )
    rerun["rows_written"] -= count  # the prefilled rows
    rerun["summary"] = json.loads(next((full_output / "_summary").glob("*.json")).read_text())["counts"]
    print(f"[benchmark] {count} URIs: labelling {fresh}; rerun {rerun}", flush=True)
    return {"uris": count, "labelling": fresh, "rerun": rerun}


def describe(result: dict) -> str:
    runs = result["runs"]
    base = runs[0]
    lines = [
        f"## {result['date']}: `benchmarks/label_scale.py`",
        "",
        f"device: {result['device']}; model: {TINY_MODEL} at {result['image_size']} px, 1 augmentation, "
        f"batch {result['batch_size']}, {result['rows_per_file']} rows per file, 1 actor x 0.5 CPU; "
        f"manifests as Parquet files of {MANIFEST_ROWS_PER_FILE:,} URIs (hardlinks of {DISTINCT_IMAGES} 32 x 32 PNGs); each labelling run "
        f"stopped after {result['seconds']:.0f} s; the rerun goes over an output prefilled with a row per URI",
        "",
        "| URIs | driver peak RSS | vs smallest | first row after | vs smallest | rows/s (steady) "
        "| rerun wall time | rerun driver peak RSS | rerun labelled |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        fresh, rerun = run["labelling"], run["rerun"]
        lines.append(
            f"| {run['uris']:,} | {fresh['driver_peak_rss_mb']:.0f} MB "
            f"| {ratio(fresh['driver_peak_rss_mb'], base['labelling']['driver_peak_rss_mb'])} "
            f"| {seconds(fresh['first_row_s'])} | {ratio(fresh['first_row_s'], base['labelling']['first_row_s'])} "
            f"| {fresh['rows_per_s_steady']} | {rerun['wall_s']:.1f} s | {rerun['driver_peak_rss_mb']:.0f} MB "
            f"| {rerun['summary'].get('labelled')} |"
        )
    return "\n".join(lines) + "\n"


def ratio(value, base) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def seconds(value) -> str:
    return "never" if value is None else f"{value:.1f} s"


def main() -> None:
    args = arguments()
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        workdir = Path(scratch)
        images = tiny_images(workdir / "images")
        artifact = random_artifact(workdir / "artifact", args.image_size)
        runs = [measure_size(count, images, artifact, workdir, args) for count in sorted(args.sizes)]
    result = {
        "date": date.today().isoformat(),
        "device": f"CPU, {os.cpu_count()} cores ({platform.machine()})",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "rows_per_file": args.rows_per_file,
        "seconds": args.seconds,
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_write:
        with RESULTS.open("a") as results:
            results.write("\n" + describe(result))


if __name__ == "__main__":
    main()
