"""LDM correspondence (SPEC 3) on Ray Data: source points to optimised contexts, then pairs to located points.

Contexts: each source image of a run is decoded once onto the 512 canvas and
``ContextOptimizer`` actors optimise the contexts of all its query pixels not
yet in the ``ContextStore`` in one ``optimize_point_contexts`` call (points x
restarts batched), saving one file per point; a point is optimised once
however many pairs and targets use it. Localisation: ``PointLocator`` actors
take each pair with its target decoded, read the source points' contexts from
the store and locate all of them in the target in one ``locate_point`` call.
A point's random draws come from generators keyed by (seed, what they are
for, the image's content hash, the query pixel), so contexts and predictions
depend neither on which points share a batch, nor on actors and reruns.

Points travel as pixels of the original images; the model sees the image
resized to the canvas (aspect not kept), pixel centres mapping to pixel
centres as in ``images.resize_batch``.
"""

from __future__ import annotations

import json
import time

import numpy as np
import ray
import ray.data
import torch

from skp_ray.correspondence.context_store import ContextStore, context_key
from skp_ray.correspondence.dift_stage import load_model, pool_options
from skp_ray.correspondence.ldm_contexts import optimize_point_contexts
from skp_ray.correspondence.ldm_locate import locate_point
from skp_ray.correspondence.ldm_maps import CANVAS, LDM_LAYERS, LDM_TOKEN, canvas_position, image_pixels
from skp_ray.correspondence.pair_rows import (
    PairRows,
    check_failed,
    check_size,
    clamped_pixels,
    nearest_pixels,
    outside_image,
    query_pixels,
    write_pair_rows,
)
from skp_ray.images import ImageSource, absolute_uri, decode_batch, source_item
from skp_ray.progress import ProgressCounter, ProgressLog
from skp_ray.randomness import keyed_generator
from skp_ray.ray_cluster import quiet_cpu_alarm

# Everything that changes a context; the store keeps one folder per distinct set.
_CONTEXT_SETTINGS = (
    "method", "model", "revision", "unet_weights", "num_steps", "lr", "restarts", "num_tokens", "sigma",
    "crop_fraction", "crop_margin", "noise_level", "image_size", "seed", "dtype", "published_quirks",
)  # fmt: skip
# What else changes a prediction: the rows' settings hash covers both.
_LOCATE_SETTINGS = ("passes",)


def context_settings(config) -> dict:
    return {**{name: getattr(config, name) for name in _CONTEXT_SETTINGS}, "layers": list(LDM_LAYERS), "token": LDM_TOKEN}


def locate_settings(config) -> dict:
    return {**context_settings(config), **{name: getattr(config, name) for name in _LOCATE_SETTINGS}}


# ---------------------------------------------------------------- canvas coordinates


def canvas_points(pixels_xy, height: int, width: int) -> torch.Tensor:
    """Pixels (x, y) [P, 2] of a width x height image as (row, col) pixel indices [P, 2] of its decoded
    canvas-sized copy, centre to centre as ``ldm_maps`` maps them (fractional, within the canvas)."""
    pixels_yx = torch.as_tensor(np.asarray(pixels_xy), dtype=torch.float64).reshape(-1, 2).flip(-1)
    return canvas_position(pixels_yx, height, width) - 0.5


def target_pixels(canvas_yx: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Canvas pixels (row, col) [P, 2] as the nearest pixels (x, y) [P, 2] of the width x height target."""
    return clamped_pixels(image_pixels(canvas_yx, height, width).flip(-1).numpy(), height, width)


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
            ContextOptimizer,
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
    counts = {name: int(row[name]) for name in ContextOptimizer.COUNTS}
    losses = json.loads(row["losses_json"])
    return {**counts, "losses": losses, "error_cause": str(row["error_cause"]), "error": str(row["error"])}


def mean_loss_curve(sources: dict[str, dict]) -> list[float]:
    """The loss at each step averaged over every context this run optimised (images weighted by their points)."""
    curves = [(source["losses"], source["optimised"]) for source in sources.values() if source["losses"]]
    if not curves:
        return []
    total = sum(count for _, count in curves)
    return (sum(np.asarray(curve) * count for curve, count in curves) / total).tolist()


class ContextOptimizer:
    """A Ray Data actor: holds the model; optimises the missing contexts of decoded source images."""

    RESULTS = ("height", "width", "optimised", "reused", "losses_json", "error_cause", "error")
    COUNTS = ("height", "width", "optimised", "reused")

    def __init__(self, config, store: ContextStore, counter):
        self.diffusion = load_model(config, "cuda" if config.use_gpu else "cpu", text_encoder=False)
        self.config, self.store, self.counter = config, store, counter

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [self._image({name: values[i] for name, values in batch.items()}) for i in range(len(batch["image_key"]))]
        columns = {name: [result[name] for result in results] for name in self.RESULTS}
        columns = {name: np.array(values, dtype=np.int64 if name in self.COUNTS else object) for name, values in columns.items()}
        return {"image_key": batch["image_key"], **columns}

    def _image(self, row: dict) -> dict:
        started, points = time.time(), json.loads(row["points_json"])
        result = {"height": int(row["height"]), "width": int(row["width"]), "optimised": 0, "reused": 0, "losses_json": "[]"}
        result.update(error_cause=row["error_cause"], error=row["error"])
        if not row["error_cause"]:
            try:
                result["optimised"], result["reused"], losses = self._optimise(row, points)
                result["losses_json"] = json.dumps(losses)
            except Exception as error:  # the model failed on this image: its pairs become error rows
                result.update(error_cause="optimisation_failed", error=f"{type(error).__name__}: {error}")
        failed = len(points) if result["error_cause"] else 0
        self.counter.add.remote(len(points), failed, started, time.time())
        return result

    def _optimise(self, row: dict, points: list) -> tuple[int, int, list[float]]:
        """Optimise and save the contexts of the distinct in-image pixels of ``points`` that are not stored
        (a point outside is left for its pair's points_outside row); returns (optimised, found stored, the
        mean loss of the optimised contexts at each step)."""
        config, uri, height, width = self.config, row["uri"], int(row["height"]), int(row["width"])
        inside = [point for point, out in zip(points, outside_image(points, height, width)) if not out]
        pixels = list(dict.fromkeys(map(tuple, clamped_pixels(inside, height, width).tolist())))
        missing = [pixel for pixel in pixels if not self.store.exists(context_key(uri, *pixel))]
        if not missing:
            return 0, len(pixels), []
        optimised = optimize_point_contexts(
            self.diffusion,
            torch.tensor(row["pixels"]),  # a copy: Ray Data hands out read-only arrays
            canvas_points(missing, height, width),
            num_steps=config.num_steps,
            lr=config.lr,
            restarts=config.restarts,
            num_tokens=config.num_tokens,
            token=LDM_TOKEN,
            sigma=config.sigma,
            crop_fraction=config.crop_fraction,
            crop_margin=config.crop_margin,
            noise_level=config.noise_level,
            layers=LDM_LAYERS,
            image_size=config.image_size,
            generator=[keyed_generator(config.seed, "ldm-contexts", row["content_hash"], x, y) for x, y in missing],
            published_quirks=config.published_quirks,
            max_batch=config.max_batch,
        )
        for pixel, contexts in zip(missing, optimised.contexts):
            metadata = {"uri": uri, "point_xy": pixel, "height": height, "width": width, "content_hash": row["content_hash"]}
            self.store.save(context_key(uri, *pixel), contexts, **metadata)
        return len(missing), len(pixels) - len(missing), optimised.losses.mean(dim=(1, 2)).tolist()


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
            PointLocator,
            fn_constructor_kwargs=dict(config=config, store=store, settings_hash=settings_hash, counter=counter, run_id=run_id),
            batch_size=config.pairs_batch_size,
            **pool_options(config, compute),
        )
    )
    write_pair_rows(config, dataset, counter, len(items), output, run_id)


class PointLocator(PairRows):
    """A Ray Data actor: holds the model; locates batches of pairs' source points in their decoded targets."""

    failure_cause = "locate_failed"

    def __init__(self, config, store: ContextStore, settings_hash: str, counter, run_id: str):
        super().__init__(config, settings_hash, counter, run_id)
        self.diffusion = load_model(config, "cuda" if config.use_gpu else "cpu", text_encoder=False)
        self.store = store

    def _match(self, item: dict) -> dict:
        check_failed("source", item["source_cause"], item["source_error"])
        check_failed("target", item["error_cause"], item["error"])  # the target's decoding, in this stage
        config, sizes = self.config, json.loads(item["sizes_json"])
        source_uri, raw = absolute_uri(item["source_uri"]), json.loads(item["source_points_json"])
        source_size = json.loads(item["source_size_json"]) or self._stored_size(source_uri, raw)
        target_size = (int(item["height"]), int(item["width"]))
        check_size("source", source_uri, source_size, sizes[:2])
        check_size("target", item["uri"], target_size, sizes[2:])
        points = query_pixels(raw, *source_size)
        contexts = torch.stack([self.store.load(context_key(source_uri, x, y)).contexts for x, y in points.tolist()])
        located = locate_point(
            self.diffusion,
            torch.tensor(item["pixels"]),  # a copy: Ray Data hands out read-only arrays
            contexts,
            passes=config.passes,
            crop_fraction=config.crop_fraction,
            crop_margin=config.crop_margin,
            noise_level=config.noise_level,
            layers=LDM_LAYERS,
            token=LDM_TOKEN,
            image_size=config.image_size,
            generator=[
                keyed_generator(config.seed, "ldm-locate", item["content_hash"], context_key(source_uri, x, y))
                for x, y in points.tolist()
            ],
            published_quirks=config.published_quirks,
            max_batch=config.max_batch,
        )
        return {
            "source_points_xy": points.tolist(),
            "predicted_xy": target_pixels(located.canvas_yx, *target_size).tolist(),
            "scores": located.scores.detach().cpu().float().tolist(),
            "source_width": source_size[1],
            "source_height": source_size[0],
            "target_width": target_size[1],
            "target_height": target_size[0],
        }

    def _stored_size(self, uri: str, points: list) -> tuple[int, int]:
        """(height, width) of a source not decoded in this run: every point's contexts were stored, and
        the original size with them."""
        x, y = nearest_pixels(points)[0].tolist()
        metadata = self.store.metadata(context_key(uri, x, y))
        return int(metadata["height"]), int(metadata["width"])
