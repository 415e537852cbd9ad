"""Latency and throughput of the keypoint endpoint against the number of concurrent clients.

    python benchmarks/serving.py [--requests 48] [--concurrency 1 4 16] [--augmentation_iterations 10]
    python benchmarks/serving.py --artifact s3://bucket/keypoints/faces-v1 --model <sd15 folder> --use-gpu

Starts the application of ``jobs/serve.py`` (its own local Ray with 4 logical
CPUs unless RAY_ADDRESS names a cluster), sends ``--requests`` images at each
concurrency from a thread pool over real HTTP, and reports p50 / p95 latency,
requests per second, the throughput's ratio to concurrency 1 in the same run,
and the mean batch the requests were detected in. Without ``--artifact`` it
builds a random artifact for the embedded tiny model. Appends a dated section
to benchmarks/RESULTS.md (``--no-write``: print only).
"""

import argparse
import io
import os
import platform
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx
import numpy as np
import ray
import torch
from PIL import Image
from ray import serve

from skp_ray.artifact import KeypointArtifact, load_artifact, save_artifact
from skp_ray.model_source import TINY_MODEL
from skp_ray.serving import ServeConfig, build_app

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", help="artifact to serve; default: a random one for the tiny model")
    parser.add_argument("--model", help="model to serve it with; default: the artifact's")
    parser.add_argument("--image_size", type=int, default=128, help="model input side of the random artifact")
    parser.add_argument("--requests", type=int, default=48, help="requests at each concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--augmentation_iterations", type=int, default=10)
    parser.add_argument("--replicas", default="1")
    parser.add_argument("--cpus_per_replica", type=float, default=1.0)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--max_batch_size", type=int, default=8)
    parser.add_argument("--batch_wait_timeout_s", type=float, default=0.01)
    parser.add_argument("--upload_side", type=int, default=256, help="side of the JPEG images sent")
    parser.add_argument("--no-write", action="store_true", help="print the table without appending it to RESULTS.md")
    return parser.parse_args()


def random_artifact(folder: str, image_size: int) -> str:
    """16 random tokens for the tiny model, 4 of them keypoints (what the keypoints are does not change the cost)."""
    context = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    settings = dict(image_size=image_size, feature_upsample_res=image_size // 4, layers=[0, 1, 2, 3], noise_level=-1)
    save_artifact(KeypointArtifact(context, [1, 4, 9, 12], model=TINY_MODEL, settings=settings), folder)
    return folder


def uploads(count: int, side: int) -> list[bytes]:
    """Distinct JPEG images (each its own content hash, so its own augmentations)."""
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(client: httpx.Client, images: list[bytes], concurrency: int, iterations: int) -> dict:
    """Send every image once from ``concurrency`` threads; latencies, wall time and batch sizes."""

    def one(data: bytes) -> tuple[float, int]:
        started = time.perf_counter()
        response = client.post("/v1/keypoints", content=data, params={"augmentation_iterations": iterations})
        response.raise_for_status()
        return time.perf_counter() - started, response.json()["batch_size"]

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, images))
    wall = time.perf_counter() - started
    latencies = sorted(latency for latency, _ in results)
    return {
        "concurrency": concurrency,
        "p50_ms": 1e3 * statistics.median(latencies),
        "p95_ms": 1e3 * latencies[min(len(latencies) - 1, int(np.ceil(0.95 * len(latencies))) - 1)],
        "per_s": len(images) / wall,
        "mean_batch": statistics.mean(size for _, size in results),
    }


def device_line(args: argparse.Namespace) -> str:
    if args.use_gpu and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def table(rows: list[dict]) -> str:
    base = rows[0]["per_s"]
    lines = [
        "| concurrency | p50 latency | p95 latency | throughput | vs concurrency 1 | mean batch |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['concurrency']} | {row['p50_ms']:.0f} ms | {row['p95_ms']:.0f} ms | {row['per_s']:.2f} requests/s "
            f"| {row['per_s'] / base:.2f}x | {row['mean_batch']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = arguments()
    scratch = tempfile.mkdtemp(prefix="skp-serving-bench-")
    artifact_uri = args.artifact or random_artifact(os.path.join(scratch, "artifact"), args.image_size)
    artifact = load_artifact(artifact_uri)
    config = ServeConfig(
        artifact=artifact_uri, model=args.model, replicas=args.replicas, use_gpu=args.use_gpu,
        cpus_per_replica=args.cpus_per_replica, max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        max_augmentation_iterations=max(32, args.augmentation_iterations),
    )  # fmt: skip
    app = build_app(config)
    started_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if started_ray:
        ray.init(address="local", num_cpus=4)  # a Ray of its own, never a stray one found on this machine
    elif not ray.is_initialized():
        ray.init()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="skp-bench", route_prefix="/")
    images = uploads(args.requests, args.upload_side)
    try:
        options = dict(timeout=600, limits=httpx.Limits(max_connections=64), trust_env=False)  # no HTTP(S)_PROXY
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", **options) as client:
            measure(client, images[:4], 1, args.augmentation_iterations)  # warm-up
            rows = [measure(client, images, c, args.augmentation_iterations) for c in args.concurrency]
    finally:
        if started_ray:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete("skp-bench")
    size = artifact.settings.get("image_size", "the model's")
    header = (
        f"device: {device_line(args)}; model: {args.model or artifact.model} at {size} px, "
        f"{len(artifact.token_indices)} keypoint tokens of {len(artifact.context)}, "
        f"{args.augmentation_iterations} augmentations per request, "
        f"{args.upload_side} x {args.upload_side} JPEG uploads; "
        f"replicas {args.replicas} x {'1 GPU' if args.use_gpu else f'{args.cpus_per_replica:g} CPU'}, "
        f"max_batch_size {args.max_batch_size}, batch_wait_timeout_s {args.batch_wait_timeout_s:g}; "
        f"{args.requests} requests per concurrency, after 4 warm-up requests"
    )
    text = f"{header}\n\n{table(rows)}\n"
    print(text)
    if not args.no_write:
        with RESULTS.open("a") as results:
            results.write(f"\n## {date.today().isoformat()}: `benchmarks/serving.py`\n\n{text}")
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
