"""Joining Ray the way `ray job submit` expects: Ray's own environment decides where the jobs run."""

from __future__ import annotations

import time

import ray

# How often the GPU wait checks the cluster and says what it is waiting for.
GPU_POLL_SECONDS = 5.0
GPU_REPORT_SECONDS = 30.0


def connect() -> None:
    """Join the cluster that ``RAY_ADDRESS`` names (set under ``ray job submit``), or start a local Ray."""
    if not ray.is_initialized():
        ray.init()


def use_gpus(requested: bool | None) -> bool:
    """``--use-gpu`` / ``--no-use-gpu`` as given; unset, whether the cluster has GPUs right now.

    A cluster whose GPU nodes autoscale from zero shows none until a job asks for
    one, so jobs for such clusters pass ``--use-gpu``.
    """
    if requested is not None:
        return requested
    return ray.cluster_resources().get("GPU", 0) > 0


def wait_for_gpus(count: int, *, timeout_s: float, what: str) -> None:
    """Return once the cluster has ``count`` GPUs, asking the autoscaler (if any) for them; a
    TimeoutError after ``timeout_s`` says what the job was waiting for."""
    from ray.autoscaler.sdk import request_resources

    if _gpus() >= count:
        return
    request_resources(bundles=[{"GPU": 1}] * count)  # without an autoscaler, nothing listens
    started = last_report = time.monotonic()
    try:
        while _gpus() < count:
            waited = time.monotonic() - started
            if waited >= timeout_s:
                raise TimeoutError(
                    f"{what} needs {count} GPU(s), and after {waited:.0f} s the cluster has {_gpus():g} "
                    f"(its resources: {_resource_summary()}). Start GPU nodes or an autoscaler that can add "
                    "them, raise --gpu_wait_s, or run on CPUs with --no-use-gpu."
                )
            if time.monotonic() - last_report >= GPU_REPORT_SECONDS:
                print(f"[ray] waiting for {count} GPU(s) for {what}: {waited:.0f} s of {timeout_s:.0f} s")
                last_report = time.monotonic()
            time.sleep(min(GPU_POLL_SECONDS, max(0.0, timeout_s - waited)))
    finally:
        request_resources(bundles=[])  # the job's own requests keep what it uses


def _gpus() -> float:
    return ray.cluster_resources().get("GPU", 0)


def _resource_summary() -> str:
    resources = ray.cluster_resources()
    return ", ".join(f"{name} {value:g}" for name, value in sorted(resources.items()) if "node:" not in name)
