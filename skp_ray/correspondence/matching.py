"""DIFT matching (SPEC 2): nearest neighbour by cosine between upsampled feature maps.

Conventions:

- Points are integer pixel indices ``(x, y)`` = (column, row), ``0 <= x < W``, ``0 <= y < H``.
- Sizes are ``(H, W)`` of the *original* images, not of the model input.
- Feature maps are ``[C, h, w]`` (or ``[1, C, h, w]``). Each is upsampled bilinearly with
  ``align_corners=False`` to its own image size, exactly as
  ``F.interpolate(mode="bilinear", align_corners=False, size=(H, W))`` would, but without
  ever building the full upsampled maps: the source is read only at the query pixels, and
  the target's cosines come band of rows by band of rows from low-resolution dot products.
- Ties go to the first target pixel in row-major order (index ``y * W + x``). Pixels past the
  outermost cell centres (about half a cell's worth of pixels on each border) repeat the edge
  cells' vectors exactly, so a match there lands on the first pixel of that flat block.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["bilinear_weights", "feature_vectors_at", "match_points"]

# As F.normalize: a zero vector is divided by eps instead of 0, so its cosine is 0, not NaN.
_NORM_EPS = 1e-12


def bilinear_weights(
    out_size: int,
    in_size: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``[out_size, in_size]`` matrix of 1-D linear interpolation, ``align_corners=False``.

    ``bilinear_weights(H, h) @ X @ bilinear_weights(W, w).T`` equals
    ``F.interpolate(X[None, None], size=(H, W), mode="bilinear", align_corners=False)``
    for a ``[h, w]`` map X (up to float rounding). Each row has at most two non-zero weights.
    """
    low, high, low_weight, high_weight = _linear_taps(out_size, in_size, dtype=dtype, device=device)
    weights = torch.zeros(out_size, in_size, dtype=dtype, device=device)
    rows = torch.arange(out_size, device=device)
    # accumulate: where both taps clamp onto the same input they add up (to exactly 1, see _linear_taps).
    weights.index_put_((rows, low), low_weight, accumulate=True)
    weights.index_put_((rows, high), high_weight, accumulate=True)
    return weights


def feature_vectors_at(
    features: torch.Tensor,
    points_xy: torch.Tensor | np.ndarray | Sequence[Sequence[int]],
    *,
    image_size: tuple[int, int],
) -> torch.Tensor:
    """The bilinearly upsampled feature map (to ``image_size`` = (H, W)) read at integer pixels.

    Returns ``[N, C]``: row n is ``F.interpolate(features, size=image_size)[..., y_n, x_n]``,
    computed from the four low-resolution neighbours only. ``points_xy`` is ``[N, 2]`` integer
    ``(x, y)``. The result keeps a float64 input's dtype, otherwise it is float32.
    """
    features = _as_feature_map(features, "features", _compute_dtype(features))
    height, width = _check_size(image_size, "image_size")
    points = _as_points(points_xy, "points_xy", (height, width), features.device)
    return _sample(features, points, (height, width))


def match_points(
    source_features: torch.Tensor,
    target_features: torch.Tensor,
    source_points_xy: torch.Tensor | np.ndarray | Sequence[Sequence[int]],
    *,
    source_size: tuple[int, int],
    target_size: tuple[int, int],
    max_elements: int = 2**26,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each source point, the target pixel whose feature has the highest cosine similarity.

    ``source_points_xy`` is ``[N, 2]`` integer ``(x, y)`` inside the source image
    (``source_size`` = (H, W)). Returns ``(predicted_xy, scores)``: ``[N, 2]`` torch.long
    ``(x, y)`` pixels of the target image (``target_size`` = (H, W)) and ``[N]`` float32 best
    cosines, both on the target features' device.

    The query vectors and their dot products with the low-resolution target cells (one matrix
    product for all points) are float32, or float64 when either map is float64; the per-pixel
    interpolation of those products and the pixel norms are float64. The target is processed
    in bands of whole rows of at most ``max_elements // (5 N + 16)`` pixels (a band is at least
    one row): per band about 5 arrays of N x pixels (the cosines) and 16 of pixels (the norms)
    are alive, so ``max_elements`` bounds the float64 elements held (8 bytes each); nothing of
    size C x target pixels is ever built. Each pixel's cosine is computed the same way whatever
    the bands, so the result (bitwise, scores included) does not depend on ``max_elements``;
    ties across bands go to the first pixel too.
    """
    dtype = _compute_dtype(source_features, target_features)
    target = _as_feature_map(target_features, "target_features", dtype)
    source = _as_feature_map(source_features, "source_features", dtype).to(target.device)
    if source.shape[0] != target.shape[0]:
        raise ValueError(
            f"source_features has {source.shape[0]} channels but target_features has {target.shape[0]}; "
            "extract both with the same model and layer"
        )
    source_size = _check_size(source_size, "source_size")
    target_size = _check_size(target_size, "target_size")
    if int(max_elements) < 1:
        raise ValueError(f"max_elements must be a positive integer, got {max_elements}")
    points = _as_points(source_points_xy, "source_points_xy", source_size, target.device)

    queries = _unit_rows(_sample(source, points, source_size))
    best_index, best_score = _best_target_pixels(queries, target, target_size, int(max_elements))
    target_width = target_size[1]
    predicted_xy = torch.stack([best_index % target_width, best_index // target_width], dim=1)
    return predicted_xy, best_score.to(torch.float32)


def _best_target_pixels(
    queries: torch.Tensor, target: torch.Tensor, target_size: tuple[int, int], max_elements: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major index and cosine of each unit query's best target pixel, band of rows by band.

    The upsampled target is never built. Upsampling is linear, so a pixel's dot product with a
    query is the bilinear interpolation of the low-res dot products, and its squared norm is a
    quadratic form in its four cells' pairwise dot products (precomputed once at low resolution).
    Each pixel's cosine is thus computed by the same elementwise operations whatever the bands,
    and pixels with identical taps (past the outermost cell centres) get bitwise equal cosines.
    """
    channels, low_height, low_width = target.shape
    height, width = target_size
    count = queries.shape[0]
    device = target.device
    dots = (queries @ target.reshape(channels, -1)).reshape(count, low_height, low_width).double()
    gram = _neighbour_gram(target.double())
    row_taps = [tap.unsqueeze(1) for tap in _linear_taps(height, low_height, torch.float64, device)]
    column_taps = _linear_taps(width, low_width, torch.float64, device)
    band_rows = max(1, max_elements // ((_ARRAYS_PER_QUERY * count + _ARRAYS_FOR_NORMS) * width))

    best_score = torch.full((count,), -torch.inf, dtype=torch.float64, device=device)
    best_index = torch.zeros(count, dtype=torch.long, device=device)
    for first_row in range(0, height, band_rows):
        taps = [tap[first_row : first_row + band_rows] for tap in row_taps] + list(column_taps)
        norms = _squared_norms(gram, *taps).clamp_min(0).sqrt().clamp_min(_NORM_EPS)
        scores, index = (_interpolate(dots, *taps) / norms).flatten(1).max(dim=1)
        # Strictly greater: on a tie the earlier band (earlier in row-major order) keeps the best.
        better = scores > best_score
        best_score = torch.where(better, scores, best_score)
        best_index = torch.where(better, index + first_row * width, best_index)
    return best_index, best_score


# Arrays of one band's pixels alive at once, at most: per query in _interpolate and the division
# that follows, and in _squared_norms (bounds, for sizing the bands).
_ARRAYS_PER_QUERY = 5
_ARRAYS_FOR_NORMS = 16


def _neighbour_gram(cells: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dot products between each cell (i, j) and its right, lower and diagonal neighbours, [h, w] each.

    Neighbour indices clamp at the last row and column (i1 = min(i + 1, h - 1)), as the taps do.
    """
    _, low_height, low_width = cells.shape
    below = (torch.arange(low_height, device=cells.device) + 1).clamp_max(low_height - 1)
    right = (torch.arange(low_width, device=cells.device) + 1).clamp_max(low_width - 1)
    cells_right, cells_below = cells[:, :, right], cells[:, below, :]
    return {
        "self": (cells * cells).sum(0),
        "right": (cells * cells_right).sum(0),
        "below": (cells * cells_below).sum(0),
        "below_right": (cells * cells_below[:, :, right]).sum(0),
        "right_below": (cells_right * cells_below).sum(0),  # (i, j + 1) . (i + 1, j)
    }


def _squared_norms(gram, y0, y1, wy0, wy1, x0, x1, wx0, wx1) -> torch.Tensor:
    """|sum of the four weighted cells|^2 per pixel, from the Gram terms; taps broadcast to [rows, W]."""
    w00, w01, w10, w11 = wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1
    squares = (
        w00 * w00 * gram["self"][y0, x0]
        + w01 * w01 * gram["self"][y0, x1]
        + w10 * w10 * gram["self"][y1, x0]
        + w11 * w11 * gram["self"][y1, x1]
    )
    cross = (
        w00 * w01 * gram["right"][y0, x0]
        + w10 * w11 * gram["right"][y1, x0]
        + w00 * w10 * gram["below"][y0, x0]
        + w01 * w11 * gram["below"][y0, x1]
        + w00 * w11 * gram["below_right"][y0, x0]
        + w01 * w10 * gram["right_below"][y0, x0]
    )
    return squares + 2 * cross


def _interpolate(values, y0, y1, wy0, wy1, x0, x1, wx0, wx1) -> torch.Tensor:
    """Bilinear interpolation of ``values[..., h, w]`` at the taps (index tensors broadcast together).

    Same grouping as PyTorch's kernel: along the columns first, within each of the two rows.
    """
    top = wx0 * values[..., y0, x0] + wx1 * values[..., y0, x1]
    bottom = wx0 * values[..., y1, x0] + wx1 * values[..., y1, x1]
    return wy0 * top + wy1 * bottom


def _sample(features: torch.Tensor, points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[N, C]`` values of ``features`` upsampled to ``size`` at integer ``(x, y)`` points."""
    _, low_height, low_width = features.shape
    row_taps = (tap[points[:, 1]] for tap in _linear_taps(size[0], low_height, features.dtype, features.device))
    column_taps = (tap[points[:, 0]] for tap in _linear_taps(size[1], low_width, features.dtype, features.device))
    return _interpolate(features, *row_taps, *column_taps).T


def _linear_taps(
    out_size: int, in_size: int, dtype: torch.dtype, device: torch.device | str | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every output index: the two input indices and their weights, as F.interpolate computes them.

    align_corners=False with an explicit size: scale = in / out, source = scale * (dst + 0.5) - 0.5,
    clamped at 0 below; the upper neighbour is clamped to the last input index.
    Where the upper neighbour is clamped onto the lower one, the lower gets weight exactly 1
    (F.interpolate's (1 - l) v + l v may be off by an ulp): every pixel past the last cell centre
    then holds exactly that cell's vector, so such pixels tie exactly and the first one wins.
    """
    scale = in_size / out_size
    destination = torch.arange(out_size, dtype=dtype, device=device)
    source = (scale * (destination + 0.5) - 0.5).clamp_min(0)
    low = source.floor().long().clamp_max(in_size - 1)
    high = (low + 1).clamp_max(in_size - 1)
    high_weight = torch.where(high > low, (source - low.to(dtype)).clamp(0, 1), 0)
    return low, high, 1 - high_weight, high_weight


def _unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"feature maps must be floating-point torch tensors, got {kind}")
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _as_feature_map(features: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    if features.dim() == 4 and features.shape[0] == 1:
        features = features[0]
    if features.dim() != 3 or min(features.shape) < 1:
        raise ValueError(
            f"{name} must be [C, h, w] or [1, C, h, w] with no empty dimension, got shape {tuple(features.shape)}; "
            "match one image pair at a time"
        )
    return features.to(dtype)


def _check_size(size: tuple[int, int], name: str) -> tuple[int, int]:
    values = tuple(_integer_or_none(value) for value in size) if np.iterable(size) else ()
    if len(values) != 2 or not all(value is not None and value > 0 for value in values):
        raise ValueError(f"{name} must be the original image's (H, W) as two positive integers, got {size!r}")
    return values


def _integer_or_none(value) -> int | None:
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _as_points(points_xy, name: str, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    points = torch.as_tensor(points_xy.cpu() if isinstance(points_xy, torch.Tensor) else np.asarray(points_xy))
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"{name} must be [N, 2] pixel indices (x, y), got shape {tuple(points.shape)}")
    if points.is_floating_point() or points.is_complex() or points.dtype == torch.bool:
        raise TypeError(
            f"{name} must hold integer pixel indices (x, y), got dtype {points.dtype}; round or floor them first"
        )
    points = points.long()
    height, width = size
    outside = (points[:, 0] < 0) | (points[:, 0] >= width) | (points[:, 1] < 0) | (points[:, 1] >= height)
    if outside.any():
        n = int(outside.nonzero()[0, 0])
        x, y = (int(v) for v in points[n])
        raise ValueError(
            f"{name}[{n}] = (x={x}, y={y}) lies outside its image of size (H={height}, W={width}); "
            f"points must satisfy 0 <= x < {width} and 0 <= y < {height}"
        )
    return points.to(device)
