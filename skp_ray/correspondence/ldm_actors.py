"""LDM correspondence's Ray Data actors, imported in the actors' own processes (torch, diffusers):
``ContextOptimizer`` optimises and stores the contexts of a decoded source image's points, ``PointLocator``
locates a pair's source points in its decoded target. ``ldm_stage`` builds the pipelines that run them."""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from skp_ray.correspondence.context_store import ContextStore, context_key
from skp_ray.correspondence.dift_actors import load_model
from skp_ray.correspondence.ldm_contexts import optimize_point_contexts
from skp_ray.correspondence.ldm_locate import locate_point
from skp_ray.correspondence.ldm_maps import canvas_position, image_pixels
from skp_ray.correspondence.ldm_settings import LDM_LAYERS, LDM_TOKEN
from skp_ray.correspondence.ldm_stage import CONTEXT_COUNTS, CONTEXT_RESULTS
from skp_ray.correspondence.pair_rows import (
    PairRows,
    check_failed,
    check_size,
    clamped_pixels,
    nearest_pixels,
    outside_image,
    query_pixels,
)
from skp_ray.images import absolute_uri
from skp_ray.randomness import keyed_generator


def canvas_points(pixels_xy, height: int, width: int) -> torch.Tensor:
    """Pixels (x, y) [P, 2] of a width x height image as (row, col) pixel indices [P, 2] of its decoded
    canvas-sized copy, centre to centre as ``ldm_maps`` maps them (fractional, within the canvas)."""
    pixels_yx = torch.as_tensor(np.asarray(pixels_xy), dtype=torch.float64).reshape(-1, 2).flip(-1)
    return canvas_position(pixels_yx, height, width) - 0.5


def target_pixels(canvas_yx: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Canvas pixels (row, col) [P, 2] as the nearest pixels (x, y) [P, 2] of the width x height target."""
    return clamped_pixels(image_pixels(canvas_yx, height, width).flip(-1).numpy(), height, width)


class ContextOptimizer:
    """A Ray Data actor: holds the model; optimises the missing contexts of decoded source images."""

    def __init__(self, config, store: ContextStore, counter):
        self.diffusion = load_model(config, "cuda" if config.use_gpu else "cpu", text_encoder=False)
        self.config, self.store, self.counter = config, store, counter

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [self._image({name: values[i] for name, values in batch.items()}) for i in range(len(batch["image_key"]))]
        columns = {name: [result[name] for result in results] for name in CONTEXT_RESULTS}
        columns = {name: np.array(values, dtype=np.int64 if name in CONTEXT_COUNTS else object) for name, values in columns.items()}
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
