"""Latents of a worker's untransformed images, encoded once and kept for later steps.

An image's latent is the VAE posterior mean (SPEC 1.1): deterministic, so the
untransformed image needs encoding only the first time a step draws it. Its
warped copies change every step and are encoded afresh.
"""

from __future__ import annotations

import torch

from skp_ray.diffusion import Diffusion, encode_images


class LatentCache:
    """At most ``capacity`` latents, keyed by image index; the first ones seen stay (no eviction churn)."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"capacity must be 0 or more (got {capacity})")
        self.capacity = capacity
        self._latents: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._latents)

    def latents(self, diffusion: Diffusion, images: torch.Tensor, keys: list[int]) -> torch.Tensor:
        """Latents [n, C, h, w] of ``images`` [n, 3, S, S] (already at the model's input size), those
        not cached encoded in one VAE call."""
        missing = [i for i, key in enumerate(keys) if key not in self._latents]
        fresh = dict(zip(missing, encode_images(diffusion, images[missing]))) if missing else {}
        for i in missing:
            if len(self._latents) < self.capacity:
                self._latents[keys[i]] = fresh[i]
        return torch.stack([fresh[i] if i in fresh else self._latents[key] for i, key in enumerate(keys)])
