"""DIFT's Ray Data actors, imported in the actors' own processes (torch, diffusers): ``DiftExtractor`` holds
the model and writes each decoded image's feature map to the ``FeatureCache``; ``PairMatcher`` reads a pair's
two maps from the cache and matches its points. ``dift_stage`` builds the pipelines that run them."""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from skp_ray.correspondence.feature_cache import FeatureCache
from skp_ray.correspondence.features import dift_features, draw_dift_noise, encode_prompt
from skp_ray.correspondence.matching import match_points
from skp_ray.correspondence.pair_rows import PairRows, check_failed, check_size, query_pixels
from skp_ray.diffusion import DTYPES, Diffusion, load_diffusion, load_unet_weights
from skp_ray.model_source import model_location
from skp_ray.randomness import keyed_generator


def load_model(config, device: str, *, text_encoder: bool = True) -> Diffusion:
    """The job's model on ``device``, with --unet_weights in place of its UNet's weights when given."""
    diffusion = load_diffusion(
        model_location(config.model), dtype=DTYPES[config.dtype], device=device, revision=config.revision, text_encoder=text_encoder
    )
    if config.unet_weights:
        load_unet_weights(diffusion, config.unet_weights)
    return diffusion


class DiftExtractor:
    """A Ray Data actor: holds the model; turns batches of decoded images into cached feature maps."""

    def __init__(self, config, cache: FeatureCache, counter):
        self.device = "cuda" if config.use_gpu else "cpu"
        self.diffusion = load_model(config, self.device)
        self.config, self.cache, self.counter = config, cache, counter
        self.prompts: dict[str, torch.Tensor] = {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.time()
        causes, errors = list(batch["error_cause"]), list(batch["error"])
        ready = [i for i, cause in enumerate(causes) if not cause]
        for prompt in dict.fromkeys(batch["prompt"][i] for i in ready):
            same_prompt = [i for i in ready if batch["prompt"][i] == prompt]
            try:
                self._extract(batch, same_prompt, prompt)
            except Exception as error:  # the model failed on these images: error rows, not a dead run
                for i in same_prompt:
                    causes[i], errors[i] = "extraction_failed", f"{type(error).__name__}: {error}"
        failed = sum(bool(cause) for cause in causes)
        self.counter.add.remote(len(causes), failed, started, time.time())
        return {"image_key": batch["image_key"], "error_cause": np.array(causes, dtype=object), "error": np.array(errors, dtype=object)}

    def _extract(self, batch, rows: list[int], prompt: str) -> None:
        config = self.config
        images = torch.from_numpy(np.stack([batch["pixels"][i] for i in rows])).to(self.device)
        latent_noise, noise = self._noise([batch["content_hash"][i] for i in rows])
        features = dift_features(
            self.diffusion,
            images,
            prompt_embeds=self._prompt(prompt),
            timestep=config.timestep,
            up_block=config.up_block,
            ensemble_size=config.ensemble_size,
            image_size=config.image_size,
            latent_noise=latent_noise,
            noise=noise,
            max_batch=config.max_batch,
        )
        for feature, i in zip(features, rows):
            self.cache.save(
                batch["image_key"][i],
                feature,
                uri=batch["uri"][i],
                prompt=prompt,
                height=int(batch["height"][i]),
                width=int(batch["width"][i]),
                content_hash=batch["content_hash"][i],
            )

    def _noise(self, content_hashes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's (latent_noise, noise), keyed by the seed and its content; zeros with --no_noise."""
        config, draws = self.config, []
        for digest in content_hashes:
            generator = keyed_generator(config.seed, "dift", digest)
            draws.append(
                draw_dift_noise(
                    self.diffusion, 1, ensemble_size=config.ensemble_size, image_size=config.image_size, generator=generator
                )
            )
        latent_noise, noise = (torch.cat(parts) for parts in zip(*draws))
        if config.no_noise:
            latent_noise, noise = torch.zeros_like(latent_noise), torch.zeros_like(noise)
        return latent_noise, noise

    def _prompt(self, prompt: str) -> torch.Tensor:
        if prompt not in self.prompts:
            self.prompts[prompt] = encode_prompt(self.diffusion, prompt)
        return self.prompts[prompt]


class PairMatcher(PairRows):
    """A Ray Data actor: matches batches of pairs from their cached feature maps into output rows."""

    def __init__(self, config, cache: FeatureCache, counter, run_id: str):
        super().__init__(config, cache.hash, counter, run_id)
        self.device = "cuda" if config.use_gpu else "cpu"
        self.cache = cache

    def _match(self, item: dict) -> dict:
        for side in ("source", "target"):
            check_failed(side, item[f"{side}_cause"], item[f"{side}_error"])
        source, target = self.cache.load(item["source_key"]), self.cache.load(item["target_key"])
        sizes = json.loads(item["sizes_json"])
        for side, cached, expected in (("source", source, sizes[:2]), ("target", target, sizes[2:])):
            check_size(side, cached.uri, (cached.height, cached.width), expected)
        points = query_pixels(json.loads(item["source_points_json"]), source.height, source.width)
        predicted, scores = match_points(
            source.features.to(self.device),
            target.features.to(self.device),
            points,
            source_size=(source.height, source.width),
            target_size=(target.height, target.width),
        )
        return {
            "source_points_xy": points.tolist(),
            "predicted_xy": predicted.cpu().tolist(),
            "scores": scores.cpu().tolist(),
            "source_width": source.width,
            "source_height": source.height,
            "target_width": target.width,
            "target_height": target.height,
        }
