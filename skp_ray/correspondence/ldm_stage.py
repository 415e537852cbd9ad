"""LDM correspondence (SPEC 3) on Ray Data: source points to optimised contexts, then pairs to located points.

Contexts: each source image of a run is decoded once onto the 512 canvas and
``ContextOptimizer`` actors optimise the contexts of all its query pixels not
yet in the ``ContextStore`` in one ``optimize_point_contexts`` call (points x
restarts batched), saving one file per point; a point is optimised once
however many pairs and targets use it. Localisation: ``PointLocator`` actors
take each pair with its target decoded, read the source points' contexts from
the store and locate all of them in the target in one ``locate_point`` call.
Both actors live in ``ldm_actors``, which only the actors import. A point's
random draws come from generators keyed by (seed, what they are for, the
image's content hash, the query pixel), so contexts and predictions depend
neither on which points share a batch, nor on actors and reruns.

Points travel as pixels of the original images; the model sees the image
resized to the canvas (aspect not kept), pixel centres mapping to pixel
centres as in ``images.resize_batch``.
"""

from __future__ import annotations

import json

import numpy as np
import ray
import ray.data

from skp_ray.correspondence.context_store import ContextStore, context_key
from skp_ray.correspondence.dift_stage import pool_options
from skp_ray.correspondence.ldm_settings import CANVAS
from skp_ray.correspondence.pair_rows import nearest_pixels, write_pair_rows
from skp_ray.images import ImageSource, absolute_uri, decode_batch, source_item
from skp_ray.progress import ProgressCounter, ProgressLog
from skp_ray.ray_cluster import imported_in_actor, quiet_cpu_alarm

CONTEXT_OPTIMIZER = imported_in_actor("skp_ray.correspondence.ldm_actors.ContextOptimizer")
POINT_LOCATOR = imported_in_actor("skp_ray.correspondence.ldm_actors.PointLocator")
# What a ContextOptimizer answers per source image: these counts, its losses and its error.
CONTEXT_COUNTS = ("height", "width", "optimised", "reused")
CONTEXT_RESULTS = (*CONTEXT_COUNTS, "losses_json", "error_cause", "error")

# ---------------------------------------------------------------- contexts


def missing_contexts(items: list[dict], images: list[dict], stored: set[str]) -> tuple[list[dict], int]:
    """The source images of ``items`` as decode rows, each with its distinct query points whose nearest
    pixel has no stored context (``points_json``); and how many distinct pixels were stored already.
    An image with nothing missing is left out."""
    by_key = {image["image_key"]: image for image in images}
    points: dict[str, dict] = {}
    for item in items:
        raw = map(tuple, json.loads(item["source_points_json"]))
        points.setdefault(item["source_key"], {}).update(dict.fromkeys(raw))
    work, reused = [], 0
    for key, raw in points.items():
        image = by_key[key]
        pixels = [tuple(pixel) for pixel in nearest_pixels(list(raw)).tolist()]
        have = {pixel for pixel in pixels if context_key(image["uri"], *pixel) in stored}
        reused += len(have)
        missing = [point for point, pixel in zip(raw, pixels) if pixel not in have]
        if missing:
            work.append({**image, "points_json": json.dumps(missing)})
    return work, reused


def optimise_contexts(config, store: ContextStore, images: list[dict], compute) -> dict[str, dict]:
    """Optimise and store the missing contexts of ``images`` (``missing_contexts`` rows); returns, per image
    key, its (height, width), the points optimised and found stored, and its error cause and message."""
    counter = ProgressCounter.remote()
    dataset = (
        ray.data.from_items(images, override_num_blocks=len(images))
        .map_batches(
            decode_batch,
            fn_kwargs={"size": CANVAS, "max_pixels": config.max_pixels, "alpha": config.alpha},
            batch_size=1,
            num_cpus=0.5,
        )
        .map_batches(
            CONTEXT_OPTIMIZER,
            fn_constructor_kwargs={"config": config, "store": store, "counter": counter},
            batch_size=1,  # one image per call: all its points share one optimisation already
            **pool_options(config, compute),
        )
    )
    total = sum(len(json.loads(image["points_json"])) for image in images)
    with ProgressLog(counter, total, interval_s=config.log_every_s, prefix="[correspond] contexts:", unit="points") as log:
        with quiet_cpu_alarm():
            rows = dataset.take_all()
        print(log.line(ray.get(counter.snapshot.remote())))
    ray.kill(counter)
    return {row["image_key"]: _image_result(row) for row in rows}


def _image_result(row: dict) -> dict:
    counts = {name: int(row[name]) for name in CONTEXT_COUNTS}
    losses = json.loads(row["losses_json"])
    return {**counts, "losses": losses, "error_cause": str(row["error_cause"]), "error": str(row["error"])}


def mean_loss_curve(sources: dict[str, dict]) -> list[float]:
    """The loss at each step averaged over every context this run optimised (images weighted by their points)."""
    curves = [(source["losses"], source["optimised"]) for source in sources.values() if source["losses"]]
    if not curves:
        return []
    total = sum(count for _, count in curves)
    return (sum(np.asarray(curve) * count for curve, count in curves) / total).tolist()


# ---------------------------------------------------------------- localisation


def locate_pairs(config, store: ContextStore, settings_hash: str, items: list[dict], sources: dict, output: str, run_id: str, compute):
    """Locate every pair's source points in its target and write one row per pair to ``output``; ``sources``
    is ``optimise_contexts``' answer for the source images it saw."""
    for item in items:
        source = sources.get(item["source_key"])
        item["source_cause"], item["source_error"] = (source["error_cause"], source["error"]) if source else ("", "")
        item["source_size_json"] = json.dumps([source["height"], source["width"]] if source else None)
        item.update(source_item(ImageSource(absolute_uri(item["target_uri"]))))
    counter = ProgressCounter.remote()
    dataset = (
        ray.data.from_items(items, override_num_blocks=-(-len(items) // config.pairs_batch_size))
        .map_batches(
            decode_batch,
            fn_kwargs={"size": CANVAS, "max_pixels": config.max_pixels, "alpha": config.alpha},
            batch_size=config.pairs_batch_size,
            num_cpus=0.5,
        )
        .map_batches(
            POINT_LOCATOR,
            fn_constructor_kwargs=dict(config=config, store=store, settings_hash=settings_hash, counter=counter, run_id=run_id),
            batch_size=config.pairs_batch_size,
            **pool_options(config, compute),
        )
    )
    write_pair_rows(config, dataset, counter, len(items), output, run_id)
