"""PCK@alpha for semantic correspondence (SPEC 2), as SPair-71k reports it.

A predicted point is correct when its Euclidean distance (in pixels of the target image) to the
true point is at most ``alpha * max(h, w)`` of a reference box, inclusive. The box is
``(x1, y1, x2, y2)`` with ``h = y2 - y1`` and ``w = x2 - x1`` (no +1). The reference is either
the target's object box (SPair-71k) or the whole image (``image_size_box``); outputs should
name which one was used. Points are ``(x, y)``; any consistent order gives the same distance.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["correspondence_pck", "image_size_box", "summarise_pck"]


def correspondence_pck(predicted_xy, true_xy, *, box_xyxy, alpha: float = 0.1) -> tuple[np.ndarray, float]:
    """``(hits, fraction)``: per point ``distance <= alpha * max(h, w)`` of ``box_xyxy``, and their mean.

    ``predicted_xy`` and ``true_xy`` are ``[N, 2]`` (torch, numpy or lists, any numeric dtype);
    everything is computed in float64. ``hits`` is a numpy bool array ``[N]``; ``fraction`` a
    python float.
    """
    predicted = _points(predicted_xy, "predicted_xy")
    truth = _points(true_xy, "true_xy")
    if predicted.shape[0] != truth.shape[0]:
        raise ValueError(
            f"predicted_xy has {predicted.shape[0]} points but true_xy has {truth.shape[0]}; "
            "pass one row per point to both"
        )
    threshold = _positive(alpha, "alpha") * max(_box_height_width(box_xyxy))
    hits = np.linalg.norm(predicted - truth, axis=1) <= threshold
    return hits, float(hits.mean())


def image_size_box(height: int, width: int) -> tuple[int, int, int, int]:
    """The whole image as a box ``(0, 0, width, height)``, for PCK relative to the image size."""
    return (0, 0, int(width), int(height))


def summarise_pck(pairs: Iterable[Mapping], *, alphas: Sequence[float] = (0.05, 0.1)) -> dict:
    """Aggregate per-pair hits into PCK per image and per point, overall and per category.

    Each pair is ``{"category": str, "hits": {alpha: bool array [points]}}`` (an empty category
    is kept as ``""``). ``per_image`` is the mean over pairs of each pair's fraction of hits (the
    published "per image" PCK); ``per_point`` pools all points. Returns::

        {"alphas": [0.05, 0.1],
         "overall": {"pairs": n, "points": m,
                     "pck@0.05": {"per_image": float, "per_point": float},
                     "pck@0.1": {...}},
         "per_category": {category: {same as "overall"}, ...}}   # categories sorted

    With no pairs the counts are 0 and the PCK values None.
    """
    alphas = [float(_positive(alpha, "each alpha")) for alpha in alphas]
    by_category: dict[str, list[dict[float, np.ndarray]]] = {}
    everything: list[dict[float, np.ndarray]] = []
    for n, pair in enumerate(pairs):
        category = str(pair.get("category") or "")
        hits = _pair_hits(pair, n, alphas)
        by_category.setdefault(category, []).append(hits)
        everything.append(hits)
    return {
        "alphas": alphas,
        "overall": _summary(everything, alphas),
        "per_category": {category: _summary(by_category[category], alphas) for category in sorted(by_category)},
    }


def _summary(pairs: list[dict[float, np.ndarray]], alphas: list[float]) -> dict:
    points = sum(len(pair[alphas[0]]) for pair in pairs) if alphas else 0
    summary: dict = {"pairs": len(pairs), "points": points}
    for alpha in alphas:
        per_pair = [pair[alpha] for pair in pairs]
        summary[f"pck@{alpha:g}"] = {
            "per_image": float(np.mean([hits.mean() for hits in per_pair])) if per_pair else None,
            "per_point": float(np.concatenate(per_pair).mean()) if per_pair else None,
        }
    return summary


def _pair_hits(pair: Mapping, n: int, alphas: list[float]) -> dict[float, np.ndarray]:
    if "hits" not in pair:
        raise ValueError(f"pair {n} has no 'hits'; give {{alpha: bool array per point}} for alphas {alphas}")
    given = {float(alpha): hits for alpha, hits in pair["hits"].items()}
    selected = {}
    for alpha in alphas:
        if alpha not in given:
            raise ValueError(f"pair {n} has no hits for alpha {alpha:g} (it has {sorted(given)}); compute them first")
        hits = np.asarray(given[alpha])
        if hits.dtype != bool or hits.ndim != 1 or hits.size == 0:
            raise ValueError(
                f"pair {n}: hits for alpha {alpha:g} must be a non-empty 1-D bool array, "
                f"got dtype {hits.dtype} and shape {hits.shape}"
            )
        selected[alpha] = hits
    if len({hits.size for hits in selected.values()}) > 1:
        raise ValueError(f"pair {n}: the hits of different alphas have different point counts; use the same points")
    return selected


def _points(points, name: str) -> np.ndarray:
    array = _float64(points)
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] < 1:
        raise ValueError(f"{name} must be [N, 2] points (x, y) with N >= 1, got shape {array.shape}")
    return array


def _box_height_width(box_xyxy) -> tuple[float, float]:
    box = _float64(box_xyxy).reshape(-1)
    if box.size != 4 or not np.isfinite(box).all():
        raise ValueError(f"box_xyxy must be 4 finite numbers (x1, y1, x2, y2), got {box_xyxy!r}")
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box_xyxy {tuple(box.tolist())} must have x2 > x1 and y2 > y1 (it is (x1, y1, x2, y2))")
    return y2 - y1, x2 - x1


def _positive(value: float, name: str) -> float:
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value}")
    return value


def _float64(values) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on an accelerator
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)
