"""How much of the detector's speed the labelling job keeps: jobs/label.py against the detector called directly.

    python benchmarks/pipeline_efficiency.py [--model tiny|sd15] [--image_size 128] [--images 800] [--batch_size 16]
        [--augmentations 2] [--cpus_per_actor 1] [--copies_per_call N] [--tta_latent] [--dtype float32]
        [--clusters own running] [--repeats 1] [--device cpu|cuda] [--output run.json] [--no_results]

N rendered sample images are written as PNGs with a random artifact (what its
tokens are does not change the cost). Then, ``--repeats`` times, alternating
which goes first:
- the pipeline: ``jobs/label.py`` as a user runs it (one actor of
  ``--cpus_per_actor`` CPUs, or one GPU) on the folder, once starting its own
  local Ray (``own``) and once joining a Ray cluster that is already up
  (``running``, through ``RAY_ADDRESS``, as under ``ray job submit``). From the
  rows' ``labelled_at`` (stamped as each batch leaves the detector): the
  start-up, job start to the first rows; the steady rate, the rows of the
  second half of the batches over their time (by then Ray has started the
  worker processes the run needs); and the rate after the first batch;
- direct: the same images decoded by the job's own ``decode_batch``, then the
  job's ``KeypointDetector`` called on them in this process, batch by batch,
  with the same options and as many torch threads as Ray gives the actor
  (``--cpus_per_actor``, at least 1); its rates likewise.
Efficiency = pipeline steady images/s / direct steady images/s (medians).

``--model sd15`` writes SD 1.5's UNet and VAE shapes with random weights as a
pipeline folder (about 3.7 GB) and labels with it. Prints the JSON
(``--output``: also there) and appends a dated section to benchmarks/RESULTS.md
(``--no_results``: print only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the job and the running cluster started here must agree

import numpy as np
import ray
import torch

from common import (
    LAYERS,
    benchmark_main,
    REPO,
    base_arguments,
    build_model,
    check_common,
    fmt_ratio,
    header,
    load_line,
    num_tokens,
    ratio,
    run_facts,
)
from skp_ray.artifact import KeypointArtifact, save_artifact
from skp_ray.images import DEFAULT_MAX_PIXELS, ImageSource, decode_batch, list_images, source_item
from skp_ray.label_detector import KeypointDetector
from skp_ray.label_store import read_labels
from skp_ray.labelling import LabelConfig, image_id
from skp_ray.model_source import TINY_MODEL
from skp_ray.samples import write_sample_images


def arguments(argv=None) -> argparse.Namespace:
    parser = base_arguments(__doc__, image_size=128)
    parser.set_defaults(repeats=1)
    parser.add_argument("--images", type=int, default=800, help="enough batches for a steady second half")
    parser.add_argument("--batch_size", type=int, default=LabelConfig.batch_size,
                        help="the job's --batch_size (images per actor call; default: the job's)")
    parser.add_argument("--augmentations", type=int, default=2)
    parser.add_argument("--tokens", type=int, help="context length (default: 500 for sd15, 16 for tiny)")
    parser.add_argument("--keypoints", type=int, default=4)
    parser.add_argument("--feature_upsample_res", type=int, help="the artifact's maps side (default: image_size / 4)")
    parser.add_argument("--cpus_per_actor", type=float, default=1.0)
    parser.add_argument("--copies_per_call", type=int, help="the job's --copies_per_call")
    parser.add_argument("--tta_latent", action="store_true", help="the job's --tta_latent")
    parser.add_argument("--clusters", nargs="+", default=["own", "running"], choices=["own", "running"],
                        help="own: the job starts its local Ray; running: it joins one already up")
    parser.add_argument("--workdir", help="the folder (made if missing) that holds the run's temporary folder of "
                        "images, artifact and outputs, removed at the end; default: the system's temporary folder")
    args = parser.parse_args(argv)
    check_common(parser, args)
    args.tokens = args.tokens or num_tokens(args.model)
    args.feature_upsample_res = args.feature_upsample_res or args.image_size // 4
    if args.images < 4 * args.batch_size:
        parser.error("--images must be at least 4 x --batch_size: the steady rate is measured on the second half")
    return args


def job_options(args) -> dict:
    """The fast-path options asked for, as LabelConfig fields; a clear error if the job has no such option yet."""
    wanted = {"copies_per_call": args.copies_per_call, "tta_latent": args.tta_latent or None}
    fields = {field.name for field in dataclasses.fields(LabelConfig)}
    for name, value in wanted.items():
        if value is not None and name not in fields:
            raise SystemExit(f"jobs/label.py has no --{name} yet (issue 16's fast path is not in this checkout); "
                             f"run without it.")  # fmt: skip
    return {name: value for name, value in wanted.items() if value is not None}


# --- the inputs ---------------------------------------------------------------------------------


def model_folder(args, workdir: Path) -> str:
    """The artifact's model: the embedded tiny one, or SD 1.5's shapes with random weights written as a folder."""
    if args.model == "tiny":
        return TINY_MODEL
    model, _ = build_model("sd15", "cpu", torch.float32, args.seed)
    folder = workdir / "sd15-shape"
    model.unet.save_pretrained(folder / "unet")
    model.vae.save_pretrained(folder / "vae")
    model.scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]}  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


def random_artifact(args, workdir: Path, model: str, width: int) -> Path:
    context = torch.randn(args.tokens, width, generator=torch.Generator().manual_seed(args.seed))
    step = max(1, args.tokens // args.keypoints)
    indices = list(range(0, args.tokens, step))[: args.keypoints]
    settings = dict(image_size=args.image_size, feature_upsample_res=args.feature_upsample_res,
                    layers=list(LAYERS), noise_level=-1)  # fmt: skip
    folder = workdir / "artifact"
    save_artifact(KeypointArtifact(context, indices, model=model, settings=settings), str(folder))
    return folder


def label_config(args, artifact: Path, images: Path, output: Path) -> LabelConfig:
    return LabelConfig(
        artifact=str(artifact), input=str(images), output=str(output), augmentation_iterations=args.augmentations,
        batch_size=args.batch_size, cpus_per_actor=args.cpus_per_actor, dtype=args.dtype,
        use_gpu=args.device == "cuda", progress=False, **job_options(args),
    )  # fmt: skip


def command_line(config: LabelConfig) -> list[str]:
    """``jobs/label.py`` with ``config``'s settings as flags."""
    flags = []
    for field in dataclasses.fields(LabelConfig):
        value = getattr(config, field.name)
        if value is None or value == field.default:
            continue
        if isinstance(value, bool):
            flags.append(f"--{field.name}" if value else f"--no-{field.name}")
        else:
            flags += [f"--{field.name}", str(value)]
    return [sys.executable, str(REPO / "jobs" / "label.py"), *flags]


# --- the two paths ------------------------------------------------------------------------------


def rates(stamps: list[float], rows_per_stamp: list[int]) -> dict:
    """Images/s from the batches' end times: ``images_per_s`` (steady), the second half of the batches over
    their time, and ``after_first_images_per_s``, every batch after the first over the time since it ended."""

    def rate(first: int) -> float | None:
        if len(stamps) - first < 2 or stamps[-1] <= stamps[first]:
            return None
        return sum(rows_per_stamp[first + 1 :]) / (stamps[-1] - stamps[first])

    return dict(images_per_s=rate(len(stamps) // 2), after_first_images_per_s=rate(0))


def pipeline_run(config: LabelConfig, log: Path, address: str | None = None) -> dict:
    """``jobs/label.py`` in a process of its own: starting its own Ray, or joining the one at ``address``."""
    environment = dict(os.environ)
    if address:
        environment["RAY_ADDRESS"] = address
    started = time.time()
    with log.open("w") as sink:
        finished = subprocess.run(command_line(config), stdout=sink, stderr=subprocess.STDOUT, cwd=REPO, env=environment)
    wall = time.time() - started
    if finished.returncode:
        raise SystemExit(f"jobs/label.py failed ({finished.returncode}); its log: {log}\n{log.read_text()[-3000:]}")
    stamps = read_labels(config.output, columns=["labelled_at", "status"]).to_pandas()
    if (stamps["status"] != "ok").any():
        raise SystemExit(f"jobs/label.py wrote error rows; its log: {log}")
    counts = stamps.groupby("labelled_at").size().sort_index()
    times = [stamp.timestamp() for stamp in counts.index]
    dashboard = "[ray] this Ray has no dashboard" not in log.read_text()
    return dict(startup_s=times[0] - started, **rates(times, counts.tolist()), wall_s=wall,
                rows=int(counts.sum()), batches=len(times), dashboard=dashboard,
                batch_stamps_s=[round(t - started, 3) for t in times], rows_per_stamp=counts.tolist())  # fmt: skip


@contextmanager
def running_cluster():
    """The address of a Ray cluster that is up before the job starts: this process's own if it has one
    (a test session's), else a local one started here for the run and shut down after it."""
    owned = not ray.is_initialized()
    if owned:
        ray.init()
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        if owned:
            ray.shutdown()


class _Counter:
    """Stands in for the job's progress counter actor (``counter.add.remote(...)``)."""

    class _Add:
        def remote(self, *values):
            return None

    add = _Add()


def decoded_batches(images: Path, args) -> list[dict]:
    """The job's decode step on every image, in batches of ``--batch_size`` (done once, untimed)."""
    uris = list_images(str(images))
    batches = []
    for start in range(0, len(uris), args.batch_size):
        rows = [dict(source_item(ImageSource(uri)), image_id=image_id(uri)) for uri in uris[start : start + args.batch_size]]
        columns = {key: np.array([row[key] for row in rows]) for key in rows[0]}
        columns["uri"] = np.array([row["uri"] for row in rows], dtype=object)
        columns["image_id"] = np.array([row["image_id"] for row in rows], dtype=object)
        columns["mask_uri"] = np.array([row["mask_uri"] for row in rows], dtype=object)
        batches.append(decode_batch(columns, size=args.image_size, max_pixels=DEFAULT_MAX_PIXELS, alpha="white", uint8=True))
    return batches


def direct_run(detector: KeypointDetector, batches: list[dict], device: str) -> dict:
    stamps, counts = [], []
    for batch in batches:
        table = detector(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.time())
        counts.append(table.num_rows)
    return dict(**rates(stamps, counts), rows=sum(counts))


# --- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    load_before = load_line()
    threads = max(1, int(args.cpus_per_actor))
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        workdir = Path(scratch)
        model = model_folder(args, workdir)
        width = 768 if args.model == "sd15" else 32
        images = workdir / "images"
        write_sample_images(images, n=args.images, size=args.image_size, seed=args.seed)
        artifact = random_artifact(args, workdir, model, width)
        torch.set_num_threads(threads)
        detector = KeypointDetector(label_config(args, artifact, images, workdir / "unused"), "direct", _Counter())
        batches = decoded_batches(images, args)
        print(f"{args.images} images, batch {args.batch_size}, {args.augmentations} augmentations, "
              f"{threads} torch thread(s) direct", flush=True)  # fmt: skip
        paths = ["direct", *args.clusters]
        runs = {path: [] for path in paths}
        for repeat in range(args.repeats):
            for path in paths if repeat % 2 == 0 else paths[::-1]:
                if path == "direct":
                    runs[path].append(direct_run(detector, batches, args.device))
                else:
                    config = label_config(args, artifact, images, workdir / f"labels-{path}-{repeat}")
                    log = workdir / f"job-{path}-{repeat}.log"
                    with running_cluster() if path == "running" else nullcontext() as address:
                        runs[path].append(pipeline_run(config, log, address))
                print(f"  {path}: {runs[path][-1]}", flush=True)
    shape = "embedded tiny SD-1.5-shaped model (skp_ray/tiny-sd15)" if args.model == "tiny" else \
        "SD 1.5 UNet and VAE shapes (random weights, written as a pipeline folder)"

    def median(path: str, key: str) -> float:
        return statistics.median(run[key] or 0 for run in runs[path])

    steady = {path: median(path, "images_per_s") for path in paths}
    return run_facts(args, shape, load_before) | dict(
        images=args.images, batch_size=args.batch_size, augmentations=args.augmentations, tokens=args.tokens,
        keypoints=args.keypoints, feature_upsample_res=args.feature_upsample_res,
        cpus_per_actor=args.cpus_per_actor, direct_torch_threads=threads, job_options=job_options(args),
        runs=runs, images_per_s=steady,
        after_first_images_per_s={path: median(path, "after_first_images_per_s") for path in paths},
        efficiency={path: ratio(steady[path], steady["direct"]) for path in args.clusters},
        startup_s={path: median(path, "startup_s") for path in args.clusters},
    )  # fmt: skip


PATH_NAMES = {
    "direct": "direct (`KeypointDetector` in one process)",
    "own": "`jobs/label.py`, starting its own local Ray",
    "running": "`jobs/label.py`, joining a running Ray cluster",
}


def section(result: dict) -> str:
    options = ", ".join(f"--{k} {v}" for k, v in result["job_options"].items()) or "the job's defaults"
    settings = (
        f"{result['images']} sample PNGs, batch {result['batch_size']}, {result['augmentations']} augmentations, "
        f"{result['tokens']} tokens, K = {result['keypoints']}, maps at {result['feature_upsample_res']}; one actor "
        f"x {result['cpus_per_actor']:g} CPU, direct with {result['direct_torch_threads']} torch thread(s); "
        f"{options}; medians of {result['repeats']} alternated repetitions"
    )
    lines = [
        "| path | images / s, steady (second half of the batches) | images / s after the first batch | "
        "efficiency (steady / direct) | start-up (job start to first rows) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for path, rate in result["images_per_s"].items():
        efficiency = fmt_ratio(result["efficiency"][path]) if path in result["efficiency"] else "-"
        startup = f"{result['startup_s'][path]:.1f} s" if path in result["startup_s"] else "-"
        lines.append(f"| {PATH_NAMES[path]} | {rate:.3g} | {result['after_first_images_per_s'][path]:.3g} | "
                     f"{efficiency} | {startup} |")  # fmt: skip
    return f"{header(result, settings)}\n\n" + "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    return benchmark_main("pipeline_efficiency.py", arguments, run, section, argv)


if __name__ == "__main__":
    main()
