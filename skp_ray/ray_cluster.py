"""Joining Ray the way `ray job submit` expects: Ray's own environment decides where the jobs run."""

from __future__ import annotations

import ray


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
