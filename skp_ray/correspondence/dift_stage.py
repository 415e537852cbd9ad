"""DIFT on Ray Data: images to cached feature maps (model-holding actors), then pairs to matched points.

Pairs meet only in matching: each image of a run is extracted once, by
``DiftExtractor`` actors that write its feature map into the ``FeatureCache``,
however many pairs use it; ``PairMatcher`` actors then read a pair's two maps
from the cache and match its points (both in ``dift_actors``, which only the
actors import: the driver needs neither torch nor diffusers). Each image's
noise is drawn from a generator keyed by (seed, the hash of its decoded
pixels), so its features depend neither on batching, actor count and reruns,
nor on its name.

Rows travel through Ray Data as plain columns only: points and boxes as
JSON text, no crop "has_crop False", so no column is ever pickled.
"""

from __future__ import annotations

import json
import re

import pyarrow as pa
import ray
import ray.data

from skp_ray.correspondence.feature_cache import FeatureCache, image_key
from skp_ray.correspondence.pair_rows import write_pair_rows
from skp_ray.images import ImageSource, absolute_uri, decode_batch, source_item
from skp_ray.progress import ProgressCounter, ProgressLog
from skp_ray.ray_cluster import imported_in_actor, quiet_cpu_alarm

__all__ = ["extract_features", "feature_settings", "match_pairs", "pair_items", "pool_options", "prompt_for"]

DIFT_EXTRACTOR = imported_in_actor("skp_ray.correspondence.dift_actors.DiftExtractor")
PAIR_MATCHER = imported_in_actor("skp_ray.correspondence.dift_actors.PairMatcher")

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
            DIFT_EXTRACTOR,
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


def match_pairs(config, cache: FeatureCache, items: list[dict], failures: dict, output: str, run_id: str, compute) -> None:
    """Match every pair of ``items`` from the cached features and write one row per pair to ``output``."""
    for item in items:
        for side in ("source", "target"):
            failed = failures.get(item[f"{side}_key"], {"cause": "", "error": ""})
            item[f"{side}_cause"], item[f"{side}_error"] = failed["cause"], failed["error"]
    counter = ProgressCounter.remote()
    dataset = ray.data.from_items(items, override_num_blocks=-(-len(items) // config.pairs_batch_size)).map_batches(
        PAIR_MATCHER,
        fn_constructor_kwargs={"config": config, "cache": cache, "counter": counter, "run_id": run_id},
        batch_size=config.pairs_batch_size,
        **pool_options(config, compute),
    )
    write_pair_rows(config, dataset, counter, len(items), output, run_id)
