"""How sure a labelling run is of its keypoints: a per-image score and a tally for the run's summary.

An image's score is the median of its keypoints' ``keypoint_spread_px`` (how far
its test-time augmentations' own keypoints lie from the keypoint, in pixels of
the frame; see ``skp_ray.detection.Detection``): the median, so that one
keypoint whose part is hidden does not mark a whole image. The higher the
score, the less the image's labels can be trusted; an image scoring above
``max_spread_px`` is counted as unreliable.

``ConfidenceTally`` reads a run's rows batch by batch in bounded memory:
quantiles from a seeded reservoir sample (exact while the run has no more
ok images than the reservoir holds), the least confident images from a heap.
"""

from __future__ import annotations

import heapq
import math

import numpy as np
import pyarrow as pa

__all__ = ["DEFAULT_MAX_SPREAD_PX", "ConfidenceTally", "image_score"]

# SPEC 1.6's DeepFashion PCK counts a keypoint as found within 6 px of a 256 px image: about 2.3 % of
# the side, 12 px of a 512 px frame (Stable Diffusion's input side). An image whose augmentations
# disagree by more than that on most of its keypoints would miss such a radius however good the
# model: flag it. For frames far from 512 px, scale the threshold with them.
DEFAULT_MAX_SPREAD_PX = 12.0
DEFAULT_LEAST_CONFIDENT = 10
RESERVOIR_SIZE = 10_000
QUANTILES = (0.5, 0.9, 0.99)
_COLUMNS = ("uri", "status", "keypoint_spread_px", "peak_share")


def image_score(spreads: list[float] | None) -> float:
    """An image's score: the median of its keypoints' spreads (NaNs left out); NaN when it has none."""
    return _finite_median(spreads)


def _finite_median(values: list[float] | None) -> float:
    values = np.asarray([] if values is None else values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else math.nan


class ConfidenceTally:
    """The confidence part of a labelling run's summary, from its rows added batch by batch.

    ``max_spread_px``: the score above which an image is unreliable; ``least_confident``: how many of
    the lowest-scored images to name; ``reservoir_size`` and ``seed``: the quantiles' sample.
    """

    def __init__(
        self,
        *,
        max_spread_px: float = DEFAULT_MAX_SPREAD_PX,
        least_confident: int = DEFAULT_LEAST_CONFIDENT,
        reservoir_size: int = RESERVOIR_SIZE,
        seed: int = 0,
    ):
        if not max_spread_px > 0:
            raise ValueError(f"max_spread_px must be a positive number of pixels; got {max_spread_px}")
        if least_confident < 0 or reservoir_size < 1:
            raise ValueError(
                f"least_confident must be >= 0 and reservoir_size >= 1; got {least_confident} and {reservoir_size}"
            )
        self.max_spread_px, self.least_confident = float(max_spread_px), least_confident
        self.ok_images = self.scored = self.unreliable = 0
        self._sample = np.empty((reservoir_size, 2))  # (score, median peak share) of sampled images
        self._rng = np.random.default_rng(seed)
        self._heap: list[tuple[float, str]] = []  # the least confident so far, lowest score on top

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Tally the ok rows of ``batch`` (columns uri, status, keypoint_spread_px, peak_share; rows
        written before confidence existed lack the last two and count as ok images without a score)."""
        missing = [name for name in ("uri", "status") if name not in batch.schema.names]
        if missing:
            raise ValueError(f"the rows given to ConfidenceTally.add lack the column(s) {missing}; pass {_COLUMNS}")
        columns = {name: batch.column(name).to_pylist() if name in batch.schema.names else None for name in _COLUMNS}
        for i, status in enumerate(columns["status"]):
            if status != "ok":
                continue
            self.ok_images += 1
            score = image_score(columns["keypoint_spread_px"][i] if columns["keypoint_spread_px"] else None)
            if math.isnan(score):
                continue
            share = _finite_median(columns["peak_share"][i] if columns["peak_share"] else None)
            self._keep(score, share, columns["uri"][i])

    def _keep(self, score: float, share: float, uri: str) -> None:
        self.scored += 1
        self.unreliable += score > self.max_spread_px
        capacity = len(self._sample)
        if self.scored <= capacity:  # reservoir sampling (Algorithm R)
            self._sample[self.scored - 1] = score, share
        else:
            slot = self._rng.integers(self.scored)
            if slot < capacity:
                self._sample[slot] = score, share
        if self.least_confident:
            entry = (score, uri)
            if len(self._heap) < self.least_confident:
                heapq.heappush(self._heap, entry)
            elif entry > self._heap[0]:
                heapq.heapreplace(self._heap, entry)

    def result(self) -> dict:
        """The tally as JSON-able values (quantiles are None when no image was scored)."""
        sample = self._sample[: min(self.scored, len(self._sample))]
        return {
            "ok_images": self.ok_images,
            "scored_images": self.scored,
            "max_spread_px": self.max_spread_px,
            "unreliable_images": self.unreliable,
            "median_spread_px_quantiles": _quantiles(sample[:, 0]),
            "median_peak_share_quantiles": _quantiles(sample[:, 1]),
            "quantiles_exact": self.scored <= len(self._sample),
            "least_confident": [
                {"uri": uri, "median_spread_px": score} for score, uri in sorted(self._heap, reverse=True)
            ],
        }

    def describe(self) -> list[str]:
        """Log lines for the run's summary, tagged ``[label]``."""
        result = self.result()
        if not self.scored:
            return [f"[label] confidence: none of the {self.ok_images} ok images has keypoint confidence"]
        spread = ", ".join(f"p{q} {v:.1f} px" for q, v in _percent(result["median_spread_px_quantiles"]))
        share = ", ".join(f"p{q} {v:.3g}" for q, v in _percent(result["median_peak_share_quantiles"]))
        lines = [
            f"[label] confidence of {self.scored} images: median keypoint spread {spread}; median peak share {share}",
            f"[label] {self.unreliable} images unreliable (median keypoint spread above {self.max_spread_px:g} px)",
        ]
        if result["least_confident"] and result["least_confident"][0]["median_spread_px"] > 0:
            lines.append("[label] least confident:")
            lines += [f"[label]   {e['median_spread_px']:.1f} px  {e['uri']}" for e in result["least_confident"]]
        return lines


def _quantiles(values: np.ndarray) -> dict[str, float] | None:
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    return {str(q): float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))}


def _percent(quantiles: dict[str, float] | None) -> list[tuple[str, float]]:
    return [(f"{float(q) * 100:g}", value) for q, value in (quantiles or {}).items()]
