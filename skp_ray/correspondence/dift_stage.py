"""DIFT on Ray Data: images to cached feature maps (model-holding actors), then pairs to matched points.

Pairs meet only in matching: each image of a run is extracted once, by
``DiftExtractor`` actors that write its feature map into the ``FeatureCache``,
however many pairs use it; ``PairMatcher`` actors then read a pair's two maps
from the cache and match its points. Each image's noise is drawn from a
generator keyed by (seed, the hash of its decoded pixels), so its features
depend neither on batching, actor count and reruns, nor on its name.

Rows travel through Ray Data as plain columns only: points and boxes as
JSON text, no crop "has_crop False", so no column is ever pickled.
"""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch

from skp_ray.correspondence.feature_cache import FeatureCache, image_key
from skp_ray.correspondence.features import dift_features, draw_dift_noise, encode_prompt
from skp_ray.correspondence.matching import match_points
from skp_ray.correspondence.pair_rows import PairError, PairRows, check_failed, check_size, query_pixels, write_pair_rows
from skp_ray.diffusion import DTYPES, Diffusion, load_diffusion, load_unet_weights
from skp_ray.images import ImageSource, absolute_uri, decode_batch, source_item
from skp_ray.model_source import model_location
from skp_ray.progress import ProgressCounter, ProgressLog
from skp_ray.randomness import keyed_generator
from skp_ray.ray_cluster import quiet_cpu_alarm

__all__ = [
    "DiftExtractor",
    "PairError",  # PairError and query_pixels live in pair_rows, shared with the LDM stage
    "PairMatcher",
    "extract_features",
    "feature_settings",
    "load_model",
    "match_pairs",
    "pair_items",
    "pool_options",
    "prompt_for",
    "query_pixels",
]

# Everything that changes a feature map; the cache keeps one folder per distinct set.
_FEATURE_SETTINGS = ("method", "model", "revision", "unet_weights", "timestep", "up_block", "ensemble_size", "image_size", "no_noise", "seed", "dtype")


def feature_settings(config) -> dict:
    return {name: getattr(config, name) for name in _FEATURE_SETTINGS}


def prompt_for(template: str, category: str) -> str:
    """SPEC 2: "a photo of a {category}", empty when the category is unknown. Dataset category labels
    are read as words: CUB's "001.Black_footed_Albatross" as "Black footed Albatross", PF-Willow's
    "car(G)" as "car"."""
    name = re.sub(r"^\d+\.", "", category)  # CUB's class number
    name = re.sub(r"\(.*?\)", "", name).replace("_", " ").strip()  # PF-Willow's "(G)"; CUB's underscores
    return template.replace("{category}", name) if name else ""


def pair_items(pairs: pa.Table, template: str) -> tuple[list[dict], list[dict]]:
    """The pairs as matching rows, and the distinct (image, prompt) rows their features need."""
    items, images = [], {}
    for row in pairs.to_pylist():
        prompt = prompt_for(template, row["category"])
        keys = {}
        for side in ("source", "target"):
            uri = absolute_uri(row[f"{side}_uri"])
            keys[side] = image_key(uri, prompt)
            images.setdefault(keys[side], {**source_item(ImageSource(uri)), "image_key": keys[side], "prompt": prompt})
        items.append(
            {
                "pair_id": row["pair_id"],
                "source_uri": row["source_uri"],
                "target_uri": row["target_uri"],
                "category": row["category"],
                "split": row["split"],
                "source_key": keys["source"],
                "target_key": keys["target"],
                "source_points_json": json.dumps(row["source_points_xy"]),
                "target_points_json": json.dumps(row["target_points_xy"]),
                "box_json": json.dumps(row["target_box_xyxy"]),
                "sizes_json": json.dumps([row[f"{side}_{d}"] for side in ("source", "target") for d in ("height", "width")]),
            }
        )
    return items, list(images.values())


def pool_options(config, compute) -> dict:
    """Ray Data's resources for a model-holding actor pool: one GPU per actor, or --cpus_per_actor."""
    return dict(
        compute=compute,
        num_gpus=1 if config.use_gpu else 0,
        num_cpus=0 if config.use_gpu else config.cpus_per_actor,
    )


def extract_features(config, cache: FeatureCache, images: list[dict], compute) -> dict[str, dict]:
    """Extract and cache the features of ``images``; returns image key -> {cause, error} of those that failed."""
    counter = ProgressCounter.remote()
    dataset = (
        ray.data.from_items(images, override_num_blocks=-(-len(images) // config.batch_size))
        .map_batches(
            decode_batch,
            fn_kwargs={"size": config.image_size, "max_pixels": config.max_pixels, "alpha": config.alpha},
            batch_size=config.batch_size,
            num_cpus=0.5,
        )
        .map_batches(
            DiftExtractor,
            fn_constructor_kwargs={"config": config, "cache": cache, "counter": counter},
            batch_size=config.batch_size,
            **pool_options(config, compute),
        )
    )
    with ProgressLog(counter, len(images), interval_s=config.log_every_s, prefix="[correspond] features:") as log:
        with quiet_cpu_alarm():
            rows = dataset.take_all()
        print(log.line(ray.get(counter.snapshot.remote())))
    ray.kill(counter)
    return {row["image_key"]: {"cause": row["error_cause"], "error": row["error"]} for row in rows if row["error_cause"]}


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


def match_pairs(config, cache: FeatureCache, items: list[dict], failures: dict, output: str, run_id: str, compute) -> None:
    """Match every pair of ``items`` from the cached features and write one row per pair to ``output``."""
    for item in items:
        for side in ("source", "target"):
            failed = failures.get(item[f"{side}_key"], {"cause": "", "error": ""})
            item[f"{side}_cause"], item[f"{side}_error"] = failed["cause"], failed["error"]
    counter = ProgressCounter.remote()
    dataset = ray.data.from_items(items, override_num_blocks=-(-len(items) // config.pairs_batch_size)).map_batches(
        PairMatcher,
        fn_constructor_kwargs={"config": config, "cache": cache, "counter": counter, "run_id": run_id},
        batch_size=config.pairs_batch_size,
        **pool_options(config, compute),
    )
    write_pair_rows(config, dataset, counter, len(items), output, run_id)


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
