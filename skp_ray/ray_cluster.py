"""Joining Ray the way `ray job submit` expects: Ray's own environment decides where the jobs run."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time

import ray
import ray.data

# How often the GPU wait checks the cluster and says what it is waiting for.
GPU_POLL_SECONDS = 5.0
GPU_REPORT_SECONDS = 30.0

# Set to 1, a job that starts its own Ray starts the dashboard with it.
DASHBOARD_ENV = "SKP_RAY_DASHBOARD"


def connect(*, dashboard: bool = False) -> None:
    """Join the cluster that ``RAY_ADDRESS`` names (set under ``ray job submit``), or start a local Ray.

    A local Ray starts without its dashboard unless ``dashboard`` or ``SKP_RAY_DASHBOARD=1``: on a small
    machine the dashboard's processes take the cores the job's first actors need (about 1 s of a 2-core
    start-up). Ray Train needs it (``dashboard=True``): its placement-group cleaner asks the dashboard's
    state API whether the run's controller is alive, and without it warns every few seconds.
    """
    if ray.is_initialized():
        return
    context = ray.init(include_dashboard=dashboard or dashboard_wanted(os.environ))
    if not context.dashboard_url:
        print(
            f"[ray] this Ray has no dashboard (a job's own Ray starts without one, for a faster start); "
            f"{DASHBOARD_ENV}=1 starts it, or run the job on a Ray started with `ray start --head`"
        )


def dashboard_wanted(environ) -> bool:
    """Whether a Ray the job starts itself gets a dashboard (``SKP_RAY_DASHBOARD`` = 1 / true / yes)."""
    return environ.get(DASHBOARD_ENV, "").strip().lower() in ("1", "true", "yes")


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


def parse_pool_sizes(text: str, option: str) -> tuple[int, int]:
    """``"4"`` -> (4, 4); ``"1,8"`` -> (1, 8): a fixed pool size or an autoscaling MIN,MAX."""
    try:
        sizes = [int(part) for part in str(text).split(",")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1 or sizes != sorted(sizes):
        raise ValueError(f"{option} {text!r}: give a size N or MIN,MAX with 1 <= MIN <= MAX")
    return sizes[0], sizes[-1]


def parse_actors(actors: str) -> ray.data.ActorPoolStrategy:
    """``"4"`` -> a pool of 4 actors; ``"1,8"`` -> an autoscaling pool of 1 to 8."""
    low, high = parse_pool_sizes(actors, "--actors")
    if low == high:
        return ray.data.ActorPoolStrategy(size=low)
    return ray.data.ActorPoolStrategy(min_size=low, max_size=high)


def imported_in_actor(path: str) -> type:
    """A Ray Data actor class that imports the class at ``path`` ("package.module.Class") in the actor's own
    process, builds it from the constructor's keyword arguments and hands it each batch. The driver that gives
    Ray Data this class never imports that module: the model-holding actors' modules import torch and
    diffusers, about 5 s of a driver's start-up on 2 cores."""
    module, name = path.rsplit(".", 1)

    class InActor:
        def __init__(self, **options):
            self.actor = getattr(importlib.import_module(module), name)(**options)

        def __call__(self, batch):
            return self.actor(batch)

    InActor.__name__ = InActor.__qualname__ = name  # Ray Data names the stage after it: MapBatches(<name>)
    return InActor


class _FalseCpuAlarm(logging.Filter):
    """Ray Data checks for a free CPU again after a write has run, while the finished actor pool still
    holds its CPUs, and warns that the job "will hang"; it will not (the driver checks before it starts)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "does not have any available CPUs" not in record.getMessage()


@contextlib.contextmanager
def quiet_cpu_alarm():
    """Drops Ray Data's false "no available CPUs, will hang" warning while the pipeline runs."""
    alarm, dataset_logger = _FalseCpuAlarm(), logging.getLogger("ray.data.dataset")
    dataset_logger.addFilter(alarm)
    try:
        yield
    finally:
        dataset_logger.removeFilter(alarm)
