"""Discovery's training state and its Ray Train checkpoints: what a worker reports, restores after a
restart, and what the driver reads from the final one to write the artifact.

A checkpoint folder holds the context, Adam's moments, ``state.json`` (step,
loss history, and in the final one the voted tokens and image counts) and,
in the final one, rank 0's ``keypoints.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch
from safetensors.torch import load_file, save_file

CONTEXT_FILE = "context.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
PREVIEW_FILE = "keypoints.png"


@dataclass
class TrainingState:
    context: torch.Tensor  # the learned leaf tensor, on the model's device
    optimizer: torch.optim.Adam
    step: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    token_indices: list[int] | None = None
    resumed_from_step: int = 0


def report(state: TrainingState, rank: int, extra: dict, preview: bytes | None = None) -> None:
    """Every worker reports (Ray Train synchronises on it); rank 0 attaches the checkpoint."""
    metrics = {"step": state.step, **(state.history[-1] if state.history else {})}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_file({"context": state.context.detach().cpu().contiguous()}, os.path.join(folder, CONTEXT_FILE))
        adam = state.optimizer.state[state.context]
        save_file({key: value.cpu().contiguous() for key, value in adam.items()}, os.path.join(folder, OPTIMIZER_FILE))
        record = {"step": state.step, "history": state.history, "token_indices": state.token_indices, **extra}
        Path(folder, STATE_FILE).write_text(json.dumps(record))
        if preview is not None:
            Path(folder, PREVIEW_FILE).write_bytes(preview)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def restore(lr: float, device: torch.device) -> TrainingState | None:
    """The state in Ray Train's latest checkpoint (after a restart or a rerun), Adam at ``lr``; None if none."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        record = json.loads(Path(folder, STATE_FILE).read_text())
        context = load_file(os.path.join(folder, CONTEXT_FILE))["context"].to(device)
        adam = load_file(os.path.join(folder, OPTIMIZER_FILE), device=str(device))
    context.requires_grad_(True)
    optimizer = torch.optim.Adam([context], lr=lr)
    if adam:
        adam["step"] = adam["step"].cpu()  # Adam keeps its step count on the CPU
        optimizer.load_state_dict({"state": {0: adam}, "param_groups": optimizer.state_dict()["param_groups"]})
    return TrainingState(context, optimizer, record["step"], record["history"], record["token_indices"], record["step"])


def read_final(folder: Path) -> tuple[dict, torch.Tensor, bytes | None]:
    """The final checkpoint's record, its context [T, D] and rank 0's preview PNG (None if it drew none)."""
    record = json.loads((folder / STATE_FILE).read_text())
    context = load_file(folder / CONTEXT_FILE)["context"]
    preview = (folder / PREVIEW_FILE).read_bytes() if (folder / PREVIEW_FILE).exists() else None
    return record, context, preview
