"""A serving replica's model: the artifact and the model, loaded once, and a batch of decoded uploads detected
as labelling detects its images. Imported in the replica only (torch, diffusers): ``skp_ray.serving`` builds
and checks the application on the driver without them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from skp_ray.artifact import load_artifact
from skp_ray.detection import detect_with_confidence, draw_augmentations
from skp_ray.images import pixels_from_uint8
from skp_ray.label_detector import detection_generator, detection_options, load_artifact_model


@dataclass(frozen=True)
class Detection:
    keypoints_yx: np.ndarray  # float32 [K, 2], (y, x) in [0, 1] of the image
    peaks: np.ndarray  # float32 [K]
    spread_px: np.ndarray  # float32 [K], in the image's pixels (see skp_ray.detection.Detection)
    peak_share: np.ndarray  # float32 [K]
    batch_size: int  # requests detected in the same batch, this one included


class ServiceDetector:
    """The artifact's keypoints on a replica's device."""

    def __init__(self, config):
        self.artifact = load_artifact(config.artifact)
        self.device = "cuda" if config.use_gpu else "cpu"
        # a channels-last VAE on the CPU, as labelling's CPU actors have, so answers equal their rows
        self.diffusion = load_artifact_model(
            self.artifact, model=config.model, dtype=config.dtype, device=self.device, channels_last_vae=not config.use_gpu
        )
        self.context = self.artifact.context.to(self.device)
        self.options = detection_options(self.artifact.settings)

    def detect(self, jobs) -> list[Detection]:
        """``jobs``, each a decoded upload (``image``) and its request's ``parameters``: one detection call per
        augmentation count, each image with its own draws."""
        detections: list[Detection | None] = [None] * len(jobs)
        groups: dict[int, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.parameters.augmentation_iterations, []).append(index)
        for count, members in groups.items():
            draws = [self._draws(jobs[i], count) for i in members]
            detection = detect_with_confidence(
                self.diffusion,
                pixels_from_uint8(np.stack([jobs[i].image.pixels for i in members]), self.device),
                self.context,
                self.artifact.token_indices,
                thetas=torch.stack([thetas for thetas, _ in draws]),
                noise=torch.stack([noise for _, noise in draws]),
                **self.options,
            )
            heights = torch.tensor([float(jobs[i].image.height) for i in members])
            widths = torch.tensor([float(jobs[i].image.width) for i in members])
            spreads = detection.spread_px(heights, widths)
            for row, index in enumerate(members):
                detections[index] = Detection(
                    detection.keypoints[row].numpy(),
                    detection.peaks[row].numpy(),
                    spreads[row].numpy(),
                    detection.peak_share[row].numpy(),
                    len(jobs),
                )
        return detections

    def _draws(self, job, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = detection_generator(job.parameters.seed, job.image.content_hash)
        return draw_augmentations(self.diffusion, generator, augmentation_iterations=count, **self.options)
