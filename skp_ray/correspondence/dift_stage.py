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
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch

from skp_ray.correspondence.feature_cache import FeatureCache, image_key
from skp_ray.correspondence.features import dift_features, draw_dift_noise, encode_prompt
from skp_ray.correspondence.match_store import MATCHES, MATCHES_SCHEMA
from skp_ray.correspondence.matching import match_points
from skp_ray.diffusion import DTYPES, load_diffusion, load_unet_weights, model_location
from skp_ray.images import ImageSource, absolute_uri, decode_batch, source_item
from skp_ray.progress import ProgressCounter, ProgressLog
from skp_ray.randomness import keyed_generator
from skp_ray.ray_cluster import quiet_cpu_alarm
from skp_ray.row_store import RowFileNames, parquet_location

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


def _pool_options(config, compute) -> dict:
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
            **_pool_options(config, compute),
        )
    )
    with ProgressLog(counter, len(images), interval_s=config.log_every_s, prefix="[correspond] features:") as log:
        with quiet_cpu_alarm():
            rows = dataset.take_all()
        print(log.line(ray.get(counter.snapshot.remote())))
    ray.kill(counter)
    return {row["image_key"]: {"cause": row["error_cause"], "error": row["error"]} for row in rows if row["error_cause"]}


class DiftExtractor:
    """A Ray Data actor: holds the model; turns batches of decoded images into cached feature maps."""

    def __init__(self, config, cache: FeatureCache, counter):
        self.device = "cuda" if config.use_gpu else "cpu"
        self.diffusion = load_diffusion(
            model_location(config.model), dtype=DTYPES[config.dtype], device=self.device, revision=config.revision
        )
        if config.unet_weights:
            load_unet_weights(self.diffusion, config.unet_weights)
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
    path, filesystem = parquet_location(output)
    counter = ProgressCounter.remote()
    dataset = ray.data.from_items(items, override_num_blocks=-(-len(items) // config.pairs_batch_size)).map_batches(
        PairMatcher,
        fn_constructor_kwargs={"config": config, "cache": cache, "counter": counter, "run_id": run_id},
        batch_size=config.pairs_batch_size,
        **_pool_options(config, compute),
    )
    with ProgressLog(counter, len(items), interval_s=config.log_every_s, prefix="[correspond] pairs:", unit="pairs") as log:
        with quiet_cpu_alarm():
            dataset.write_parquet(path, filesystem=filesystem, filename_provider=RowFileNames(MATCHES, run_id), schema=MATCHES_SCHEMA)
        print(log.line(ray.get(counter.snapshot.remote())))
    ray.kill(counter)


class PairError(Exception):
    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause


class PairMatcher:
    """A Ray Data actor: matches batches of pairs from their cached feature maps into output rows."""

    def __init__(self, config, cache: FeatureCache, counter, run_id: str):
        self.device = "cuda" if config.use_gpu else "cpu"
        self.config, self.cache, self.counter, self.run_id = config, cache, counter, run_id

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        started = time.time()
        rows = [self._row({name: values[i] for name, values in batch.items()}) for i in range(len(batch["pair_id"]))]
        failed = sum(row["status"] == "error" for row in rows)
        self.counter.add.remote(len(rows), failed, started, time.time())
        return pa.Table.from_pylist(rows, schema=MATCHES_SCHEMA)

    def _row(self, item: dict) -> dict:
        source_h, source_w, target_h, target_w = json.loads(item["sizes_json"])
        row = {
            "pair_id": item["pair_id"],
            "source_uri": item["source_uri"],
            "target_uri": item["target_uri"],
            "category": item["category"],
            "split": item["split"],
            "method": self.config.method,
            "target_points_xy": json.loads(item["target_points_json"]),
            "target_box_xyxy": json.loads(item["box_json"]),
            "source_width": source_w,
            "source_height": source_h,
            "target_width": target_w,
            "target_height": target_h,
            "settings_hash": self.cache.hash,
            "model": self.config.model,
            "status": "ok",
            "matched_at": datetime.now(timezone.utc),
            "run_id": self.run_id,
        }
        try:
            row.update(self._match(item))
        except PairError as error:
            row.update(status="error", error_cause=error.cause, error=str(error))
        except Exception as error:  # one pair's surprise must not stop the run
            row.update(status="error", error_cause="match_failed", error=f"{type(error).__name__}: {error}")
        return row

    def _match(self, item: dict) -> dict:
        for side in ("source", "target"):
            if item[f"{side}_cause"]:
                raise PairError(item[f"{side}_cause"], f"{side} image: {item[f'{side}_error']}")
        source, target = self.cache.load(item["source_key"]), self.cache.load(item["target_key"])
        sizes = json.loads(item["sizes_json"])
        for side, cached, expected in (("source", source, sizes[:2]), ("target", target, sizes[2:])):
            if None not in expected and tuple(expected) != (cached.height, cached.width):
                raise PairError(
                    "size_mismatch",
                    f"{side} image {cached.uri} is {cached.width} x {cached.height} pixels but the pairs manifest says "
                    f"{expected[1]} x {expected[0]}: its points would not mean what the manifest means",
                )
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


def query_pixels(points_xy: list[list[float]], height: int, width: int) -> np.ndarray:
    """The source points as integer pixels [N, 2]: rounded to the nearest pixel (halves up), clamped into
    the image; a point outside the image is an error."""
    points = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    outside = (points[:, 0] < 0) | (points[:, 0] >= width) | (points[:, 1] < 0) | (points[:, 1] >= height)
    if outside.any():
        first = points[np.flatnonzero(outside)[0]]
        raise PairError(
            "points_outside",
            f"source point ({first[0]:g}, {first[1]:g}) lies outside the {width} x {height} source image",
        )
    pixels = np.floor(points + 0.5).astype(np.int64)
    pixels[:, 0] = pixels[:, 0].clip(0, width - 1)
    pixels[:, 1] = pixels[:, 1].clip(0, height - 1)
    return pixels
