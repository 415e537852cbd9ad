"""What every correspondence method's last stage shares: query pixels, pair errors, one output row per
pair (``MATCHES_SCHEMA``) and writing the rows as Parquet with a progress line."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import ray

from skp_ray.correspondence.match_store import MATCHES, MATCHES_SCHEMA
from skp_ray.progress import ProgressLog
from skp_ray.ray_cluster import quiet_cpu_alarm
from skp_ray.row_store import RowFileNames, parquet_location


class PairError(Exception):
    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause


def nearest_pixels(points_xy) -> np.ndarray:
    """Points (x, y) [N, 2] rounded to the nearest pixel, halves up, as int64 (not clamped)."""
    return np.floor(np.asarray(points_xy, dtype=np.float64).reshape(-1, 2) + 0.5).astype(np.int64)


def outside_image(points_xy, height: int, width: int) -> np.ndarray:
    """Which points (x, y) [N, 2] lie outside a width x height image (pixel (c, r) covers [c, c + 1) x [r, r + 1))."""
    points = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    return (points[:, 0] < 0) | (points[:, 0] >= width) | (points[:, 1] < 0) | (points[:, 1] >= height)


def clamped_pixels(points_xy, height: int, width: int) -> np.ndarray:
    """The nearest pixels of points inside the image, clamped into it (x >= width - 0.5 rounds to width)."""
    pixels = nearest_pixels(points_xy)
    pixels[:, 0] = pixels[:, 0].clip(0, width - 1)
    pixels[:, 1] = pixels[:, 1].clip(0, height - 1)
    return pixels


def query_pixels(points_xy: list[list[float]], height: int, width: int) -> np.ndarray:
    """The source points as integer pixels [N, 2]: rounded to the nearest pixel (halves up), clamped into
    the image; a point outside the image is an error."""
    points = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    outside = outside_image(points, height, width)
    if outside.any():
        first = points[np.flatnonzero(outside)[0]]
        raise PairError(
            "points_outside",
            f"source point ({first[0]:g}, {first[1]:g}) lies outside the {width} x {height} source image",
        )
    return clamped_pixels(points, height, width)


def check_failed(side: str, cause: str, error: str) -> None:
    """A pair whose image failed in an earlier stage is an error row of that cause."""
    if cause:
        raise PairError(cause, f"{side} image: {error}")


def check_size(side: str, uri: str, size: tuple[int, int], expected) -> None:
    """The decoded image's (height, width) must be the manifest's, when the manifest gives one."""
    if None not in expected and tuple(expected) != tuple(size):
        raise PairError(
            "size_mismatch",
            f"{side} image {uri} is {size[1]} x {size[0]} pixels but the pairs manifest says "
            f"{expected[1]} x {expected[0]}: its points would not mean what the manifest means",
        )


class PairRows:
    """Base of the Ray Data actors that turn batches of pairs into output rows: a subclass's ``_match(item)``
    returns the row's prediction columns, or raises PairError (any other exception is ``failure_cause``)."""

    failure_cause = "match_failed"

    def __init__(self, config, settings_hash: str, counter, run_id: str):
        self.config, self.settings_hash, self.counter, self.run_id = config, settings_hash, counter, run_id

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
            "settings_hash": self.settings_hash,
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
            row.update(status="error", error_cause=self.failure_cause, error=f"{type(error).__name__}: {error}")
        return row

    def _match(self, item: dict) -> dict:
        raise NotImplementedError


def write_pair_rows(config, dataset, counter, total: int, output: str, run_id: str) -> None:
    """Write ``dataset`` (rows of ``MATCHES_SCHEMA``) to ``output`` as Parquet, logging the pairs done."""
    path, filesystem = parquet_location(output)
    with ProgressLog(counter, total, interval_s=config.log_every_s, prefix="[correspond] pairs:", unit="pairs") as log:
        with quiet_cpu_alarm():
            dataset.write_parquet(path, filesystem=filesystem, filename_provider=RowFileNames(MATCHES, run_id), schema=MATCHES_SCHEMA)
        print(log.line(ray.get(counter.snapshot.remote())))
    ray.kill(counter)
