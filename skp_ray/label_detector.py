"""The labelling actor: detection settings taken from a discovery artifact, and the detector that turns
decoded image batches into output rows (one per image, error rows included)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from skp_ray.artifact import KeypointArtifact, load_artifact
from skp_ray.detection import detect_with_confidence, draw_augmentations
from skp_ray.diffusion import DTYPES, Diffusion, load_diffusion
from skp_ray.images import pixels_from_uint8
from skp_ray.label_store import OUTPUT_SCHEMA
from skp_ray.model_source import model_location
from skp_ray.randomness import keyed_generator

if TYPE_CHECKING:
    from skp_ray.labelling import LabelConfig


def detection_options(settings: dict) -> dict:
    """``detect_keypoints`` options matching the discovery run's maps and augmentations (SPEC 1.5)."""
    options = dict(
        layers=settings.get("layers"),
        noise_level=settings.get("noise_level"),
        feature_upsample_res=settings.get("feature_upsample_res"),
        image_size=settings.get("image_size"),
        degrees=settings.get("augment_degrees"),
        scale=settings.get("augment_scale"),
        translate=settings.get("augment_translate"),
    )
    return {
        key: tuple(value) if isinstance(value, list) else value for key, value in options.items() if value is not None
    }


def detection_generator(seed: int, content_hash: str) -> torch.Generator:
    """Where an image's augmentations come from: keyed by the run's seed and the image's content hash."""
    return keyed_generator(seed, "detect", content_hash)


def load_artifact_model(
    artifact: KeypointArtifact,
    *,
    model: str | None,
    dtype: str,
    device: str,
    compile_unet: bool = False,
    channels_last_vae: bool = False,
) -> Diffusion:
    """The model the artifact was learned with (at its revision), or ``model`` instead; no text encoder."""
    return load_diffusion(
        model_location(model or artifact.model),
        dtype=DTYPES[dtype],
        device=device,
        revision=artifact.revision if model is None else None,
        text_encoder=False,
        compile_unet=compile_unet,
        channels_last_vae=channels_last_vae,
    )


class KeypointDetector:
    """A Ray Data actor: loads the model and artifact once, then labels batches of decoded images."""

    def __init__(self, config: LabelConfig, run_id: str, counter, on_batch: Callable[[int], None] | None = None):
        if not config.use_gpu:
            # Ray sets OMP_NUM_THREADS=1 in actors with a fractional CPU; torch then uses one thread
            # however many CPUs the actor holds, so give it as many as it holds (at least one).
            torch.set_num_threads(max(1, int(config.cpus_per_actor)))
        artifact = load_artifact(config.artifact)
        self.model = config.model or artifact.model
        self.device = "cuda" if config.use_gpu else "cpu"
        self.diffusion = load_artifact_model(
            artifact,
            model=config.model,
            dtype=config.dtype,
            device=self.device,
            compile_unet=config.compile,
            channels_last_vae=_channels_last_vae(config),
        )
        self.context = artifact.context.to(self.device)
        self.indices = artifact.token_indices
        self.options = detection_options(artifact.settings)
        self.artifact_id = artifact.id
        self.config, self.run_id, self.counter, self.on_batch = config, run_id, counter, on_batch

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        started = time.time()
        count, k = len(batch["uri"]), len(self.indices)
        keypoints_yx = np.full((count, k, 2), np.nan, dtype=np.float32)
        per_keypoint = {name: np.full((count, k), np.nan, dtype=np.float32) for name in _PER_KEYPOINT}
        ok = [i for i in range(count) if not batch["error_cause"][i]]
        if ok:
            detection = self._detect(batch, ok)
            frames = batch["frame"][ok].astype(np.float64)  # (left, top, right, bottom) in original pixels
            heights, widths = torch.tensor(frames[:, 3] - frames[:, 1]), torch.tensor(frames[:, 2] - frames[:, 0])
            keypoints_yx[ok] = detection.keypoints.numpy()
            per_keypoint["peaks"][ok] = detection.peaks.numpy()
            per_keypoint["keypoint_spread_px"][ok] = detection.spread_px(heights, widths).numpy()
            per_keypoint["peak_share"][ok] = detection.peak_share.numpy()
        table = _output_table(batch, keypoints_yx, per_keypoint, self.artifact_id, self.model, self.run_id)
        self.counter.add.remote(count, count - len(ok), started, time.time())
        if self.on_batch is not None:
            self.on_batch(count)
        return table

    def _detect(self, batch: dict[str, np.ndarray], rows: list[int]):
        """One ``detect_with_confidence`` call for the batch's ``rows``, each image with the augmentations of
        its own generator, so that its answer does not depend on the batch it came in."""
        draws = [
            draw_augmentations(
                self.diffusion,
                detection_generator(self.config.seed, batch["content_hash"][i]),
                augmentation_iterations=self.config.augmentation_iterations,
                **self.options,
            )
            for i in rows
        ]
        return detect_with_confidence(
            self.diffusion,
            pixels_from_uint8(batch["pixels"][rows], self.device),
            self.context,
            self.indices,
            thetas=torch.stack([thetas for thetas, _ in draws]),
            noise=torch.stack([noise for _, noise in draws]),
            copies_per_call=self.config.copies_per_call,
            tta_latent=self.config.tta_latent,
            **self.options,
        )


def _channels_last_vae(config: LabelConfig) -> bool:
    """The setting, or by default on for CPU actors: measured 1.5x faster VAE encoding on the tiny model
    (8 images at 256 px, one thread); not measured on GPUs, so off there."""
    return (not config.use_gpu) if config.channels_last_vae is None else config.channels_last_vae


# Per-keypoint values [count, K] of a row besides its positions, named as their columns.
_PER_KEYPOINT = ("peaks", "keypoint_spread_px", "peak_share")


def _output_table(batch, keypoints_yx: np.ndarray, per_keypoint: dict, artifact_id: str, model: str, run_id: str):
    """The rows of ``batch``: ``keypoints_yx`` [count, K, 2] normalised (y, x) of each frame, ``per_keypoint``
    the ``_PER_KEYPOINT`` columns' values [count, K]; error rows get nulls."""
    ok = np.array([not cause for cause in batch["error_cause"]])
    frame = batch["frame"].astype(np.float32)
    normalized = keypoints_yx[:, :, ::-1]  # (y, x) -> (x, y)
    pixels = frame[:, None, :2] + normalized * (frame[:, None, 2:] - frame[:, None, :2])

    def lists(values: np.ndarray) -> list:
        return [row.tolist() if good else None for row, good in zip(values, ok)]

    def text(values) -> list:
        return [str(value) if value else None for value in values]

    count = len(ok)
    columns = {
        "image_id": list(batch["image_id"]),
        "uri": list(batch["uri"]),
        "content_hash": text(batch["content_hash"]),
        "width": [int(w) if good else None for w, good in zip(batch["width"], ok)],
        "height": [int(h) if good else None for h, good in zip(batch["height"], ok)],
        "crop_box": [[int(v) for v in box] if has else None for box, has in zip(batch["crop_box"], batch["has_crop"])],
        "keypoints_xy": lists(pixels),
        "keypoints_xy_normalized": lists(normalized),
        **{name: lists(per_keypoint[name]) for name in _PER_KEYPOINT},
        "artifact_id": [artifact_id] * count,
        "model": [model] * count,
        "status": ["ok" if good else "error" for good in ok],
        "error_cause": text(batch["error_cause"]),
        "error": text(batch["error"]),
        "labelled_at": [datetime.now(timezone.utc)] * count,
        "run_id": [run_id] * count,
    }
    return pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)
