"""Small helpers on heat maps ``[..., H, W]``.

Points are ``(y, x)`` = ``(row, col)`` in pixels of the map; a pixel's centre
is at ``index + 0.5`` (SPEC 1.3-1.4).
"""

from __future__ import annotations

import torch

__all__ = ["PEAK_DISCS", "argmax_centres", "check_peak_disc", "gaussian_maps", "find_peaks", "peak_targets"]

#: Radius of the area cleared around a found peak, as a fraction of the map's side (H).
PEAK_RADIUS_FRACTION = 0.05
#: Where find_peaks measures a pixel's distance to a found peak from: its centre, or its index (published code).
PEAK_DISCS = ("centred", "published")


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _check_maps(maps: torch.Tensor, name: str = "maps") -> None:
    if maps.ndim < 2 or maps.shape[-1] == 0 or maps.shape[-2] == 0:
        raise ValueError(
            f"{name} must have shape [..., H, W] with H, W >= 1, got {list(maps.shape)}"
        )


@torch.no_grad()
def argmax_centres(maps: torch.Tensor) -> torch.Tensor:
    """Pixel centre ``(y, x)`` of each map's maximum: ``[..., H, W] -> [..., 2]``.

    The first maximum in row-major order wins. Returned in float32 (float64 for
    float64 maps), without gradient.
    """
    _check_maps(maps)
    width = maps.shape[-1]
    flat = maps.detach().flatten(-2).argmax(dim=-1)
    rows = torch.div(flat, width, rounding_mode="floor")
    cols = flat - rows * width
    return torch.stack([rows, cols], dim=-1).to(_float_dtype(maps.dtype)) + 0.5


def gaussian_maps(
    centres: torch.Tensor, size: int | tuple[int, int], sigma: float
) -> torch.Tensor:
    """Gaussians with peak 1 at ``centres`` ``[..., 2]`` (``(y, x)`` pixels).

    Returns ``[..., H, W]`` with ``H = W = size`` (or ``(H, W) = size``):
    ``exp(-((i + 0.5 - y)^2 + (j + 0.5 - x)^2) / (2 sigma^2))``.
    """
    if centres.ndim < 1 or centres.shape[-1] != 2:
        raise ValueError(f"centres must have shape [..., 2], got {list(centres.shape)}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    height, width = (size, size) if isinstance(size, int) else size
    dtype = _float_dtype(centres.dtype)
    centres = centres.to(dtype)
    ys = torch.arange(height, dtype=dtype, device=centres.device) + 0.5
    xs = torch.arange(width, dtype=dtype, device=centres.device) + 0.5
    dy2 = (ys - centres[..., 0:1]) ** 2  # [..., H]
    dx2 = (xs - centres[..., 1:2]) ** 2  # [..., W]
    return torch.exp(-(dy2[..., :, None] + dx2[..., None, :]) / (2.0 * sigma**2))


def check_peak_disc(peak_disc: str) -> None:
    """Raise ValueError unless ``peak_disc`` is one of :data:`PEAK_DISCS`."""
    if peak_disc not in PEAK_DISCS:
        raise ValueError(f"peak_disc must be one of {', '.join(map(repr, PEAK_DISCS))}; got {peak_disc!r}")


@torch.no_grad()
def find_peaks(maps: torch.Tensor, num: int, *, peak_disc: str = "centred") -> torch.Tensor:
    """``num`` peaks per map: ``[T, H, W] -> [T, num, 2]`` ``(y, x)`` pixel centres.

    The first peak is the argmax. Each further peak is the argmax of a detached
    copy in which every pixel within (``<=``) ``0.05 * H`` pixels of an already
    found peak has been set to zero. ``peak_disc`` says where a pixel is
    measured from: ``"centred"`` (default) its centre ``index + 0.5``, a disc
    symmetric about the peak pixel; ``"published"`` its integer index, as the
    published code does, which shifts the disc by half a pixel towards higher
    rows and columns. Leading dimensions other than T are also accepted
    (``[..., H, W]``).
    """
    _check_maps(maps)
    check_peak_disc(peak_disc)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    height, width = maps.shape[-2:]
    work = maps.detach().clone()
    radius2 = (PEAK_RADIUS_FRACTION * height) ** 2
    dtype = _float_dtype(maps.dtype)
    offset = 0.5 if peak_disc == "centred" else 0.0
    ys = torch.arange(height, dtype=dtype, device=maps.device) + offset
    xs = torch.arange(width, dtype=dtype, device=maps.device) + offset
    peaks = []
    for n in range(num):
        peak = argmax_centres(work)
        peaks.append(peak)
        if n + 1 < num:
            dy2 = (ys - peak[..., 0:1]) ** 2  # [..., H]
            dx2 = (xs - peak[..., 1:2]) ** 2  # [..., W]
            dist2 = dy2[..., :, None] + dx2[..., None, :]
            work = work.masked_fill(dist2 <= radius2, 0.0)
    return torch.stack(peaks, dim=-2)


@torch.no_grad()
def peak_targets(
    maps: torch.Tensor, *, sigma: float, num_subjects: int = 1, peak_disc: str = "centred"
) -> torch.Tensor:
    """Sharpening targets ``[T, H, W]``: mean of Gaussians at each map's peaks.

    With ``num_subjects = 1`` this is the Gaussian (peak 1) at the argmax; with
    more, the mean of the Gaussians at :func:`find_peaks`' peaks (``peak_disc``
    as there). No gradient; returned in ``maps``' dtype.
    """
    _check_maps(maps)
    peaks = find_peaks(maps, num_subjects, peak_disc=peak_disc)  # [..., n, 2]
    targets = gaussian_maps(peaks, (maps.shape[-2], maps.shape[-1]), sigma).mean(dim=-3)
    return targets.to(maps.dtype)
