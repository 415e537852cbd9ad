"""Pictures a person can check, drawn with PIL only.

Images come in as float [3, H, W] in [0, 1] (torch tensor or numpy array) or as
PIL images; keypoints as [K, 2] normalised (y, x) = (row, col), a pixel's
centre being at index + 0.5 (so pixel column j spans x in [j/W, (j+1)/W)).
"""

from __future__ import annotations

import colorsys
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

__all__ = ["keypoint_colours", "draw_keypoints", "image_grid", "heatmap_overlay", "keypoint_sheet", "line_plot"]

# Kelly's colours of maximum contrast (without white, black and the near-greys), in order.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
)

# Perceptual ramp (viridis anchors), dark blue-purple (0) to yellow (1).
_RAMP = np.array(
    [
        (68, 1, 84),
        (72, 40, 120),
        (62, 74, 137),
        (49, 104, 142),
        (38, 130, 142),
        (31, 158, 137),
        (53, 183, 121),
        (109, 205, 89),
        (180, 222, 44),
        (253, 231, 37),
    ],
    dtype=np.float64,
)

_OUTLINE = (20, 20, 20)


def keypoint_colours(k: int) -> list[tuple[int, int, int]]:
    """``k`` distinct RGB colours; keypoint i gets colour i whatever ``k`` is.

    The first 19 are a fixed high-contrast palette; later ones step the hue by
    the golden ratio, cycling through three brightness levels.
    """
    colours = list(_PALETTE[:k])
    seen = set(colours)
    i = len(_PALETTE)
    while len(colours) < k:
        hue = (i * 0.618033988749895) % 1.0
        value = (1.0, 0.75, 0.55)[(i // 7) % 3]
        rgb = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.85, value))
        i += 1
        if rgb not in seen:  # rounding could repeat a colour for very large k
            seen.add(rgb)
            colours.append(rgb)
    return colours


def draw_keypoints(
    image: torch.Tensor | np.ndarray | Image.Image,
    keypoints: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
    *,
    numbered: bool = True,
    radius: float | None = None,
) -> Image.Image:
    """Draw keypoints [K, 2] (normalised (y, x)) on a copy of ``image``.

    Keypoint i is a filled circle in ``keypoint_colours(K)[i]`` with a dark
    outline, labelled with i when ``numbered``. Non-finite keypoints are
    skipped. ``radius`` is in pixels (default: about 1/64 of the shorter side,
    at least 3).
    """
    picture = to_pil(image).copy()
    points = _as_numpy(keypoints).reshape(-1, 2).astype(np.float64)
    width, height = picture.size
    if radius is None:
        radius = max(3.0, min(width, height) / 64.0)
    draw = ImageDraw.Draw(picture)
    font = _font(max(10, int(round(radius * 2.5))))
    colours = keypoint_colours(len(points))
    for i, (y, x) in enumerate(points):
        if not (math.isfinite(y) and math.isfinite(x)):
            continue
        # PIL coordinates are pixel indices, so the continuous position minus a half pixel
        cx, cy = x * width - 0.5, y * height - 0.5
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        draw.ellipse(box, fill=colours[i], outline=_OUTLINE, width=max(1, int(radius // 3)))
        if numbered:
            _text(
                draw,
                (cx + radius + 1, cy - radius - 1),
                str(i),
                font,
                "lb",
                fill=colours[i],
                stroke_width=max(1, int(radius // 3)),
                stroke_fill=_OUTLINE,
            )
    return picture


def landmark_comparison(
    image: torch.Tensor | np.ndarray | Image.Image,
    truth: np.ndarray,
    prediction: np.ndarray,
    visible: np.ndarray | None = None,
) -> Image.Image:
    """Ground-truth landmarks [M, 2] (normalised (y, x)) as rings, predictions as numbered dots, a line
    joining each pair; landmark j has colour j in both. Invisible ground truth (``visible`` False) is left
    out, its prediction still drawn."""
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 2)
    if visible is not None:
        truth = np.where(np.asarray(visible, dtype=bool)[:, None], truth, np.nan)
    picture = draw_keypoints(image, prediction)
    width, height = picture.size
    radius = max(3.0, min(width, height) / 64.0)
    draw = ImageDraw.Draw(picture)
    for j, ((ty, tx), (py, px)) in enumerate(zip(truth, np.asarray(prediction).reshape(-1, 2))):
        if not (math.isfinite(ty) and math.isfinite(tx)):
            continue
        colour = keypoint_colours(len(truth))[j]
        cx, cy = tx * width - 0.5, ty * height - 0.5
        draw.line([(cx, cy), (px * width - 0.5, py * height - 0.5)], fill=colour, width=1)
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=colour, width=2)
    return picture


def image_grid(
    pictures: Sequence[Image.Image],
    *,
    columns: int = 4,
    pad: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Tile pictures row by row into one RGB image.

    Each cell is as large as the largest picture; pictures sit at their
    cell's top-left. With n pictures the grid has min(columns, n) columns and
    ceil(n / columns) rows, ``pad`` pixels around and between cells.
    """
    if not pictures:
        raise ValueError("image_grid needs at least one picture")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    cols = min(columns, len(pictures))
    rows = math.ceil(len(pictures) / cols)
    cell_w = max(p.width for p in pictures)
    cell_h = max(p.height for p in pictures)
    canvas = Image.new("RGB", (cols * cell_w + (cols + 1) * pad, rows * cell_h + (rows + 1) * pad), background)
    for i, picture in enumerate(pictures):
        r, c = divmod(i, cols)
        canvas.paste(picture.convert("RGB"), (pad + c * (cell_w + pad), pad + r * (cell_h + pad)))
    return canvas


def keypoint_sheet(images: torch.Tensor, keypoints: torch.Tensor, maps: torch.Tensor) -> Image.Image:
    """Top row: each image [B, 3, H, W] with its numbered keypoints [B, K, 2].

    Bottom row: the first image under each keypoint token's map [K, h, w],
    with its keypoints drawn again so a map can be matched to its number.
    """
    marked = [draw_keypoints(image, points) for image, points in zip(images, keypoints)]
    overlays = [draw_keypoints(heatmap_overlay(images[0], token_map), keypoints[0]) for token_map in maps]
    columns = max(len(marked), len(overlays), 1)
    return image_grid([image_grid(marked, columns=columns), image_grid(overlays, columns=columns)], columns=1)


def heatmap_overlay(
    image: torch.Tensor | np.ndarray | Image.Image,
    heatmap: torch.Tensor | np.ndarray,
    *,
    alpha: float = 0.5,
) -> Image.Image:
    """Blend a coloured heatmap [h, w] over ``image``.

    The heatmap is shifted to start at 0 if it has negative values, divided by
    its own max (an all-zero map stays zero), resized bilinearly to the image
    (pixel centres aligned), coloured with a viridis-like ramp and blended as
    ``(1 - alpha) * image + alpha * colour``.
    """
    picture = to_pil(image)
    width, height = picture.size
    heat = torch.as_tensor(_as_numpy(heatmap), dtype=torch.float64)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be [h, w], got shape {tuple(heat.shape)}")
    heat = torch.nan_to_num(heat, nan=0.0, posinf=0.0, neginf=0.0)
    if heat.numel() and heat.min() < 0:
        heat = heat - heat.min()
    top = heat.max() if heat.numel() else torch.tensor(0.0)
    heat = heat / top if top > 0 else torch.zeros_like(heat)
    heat = F.interpolate(heat[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    colour = colour_ramp(heat.clamp(0.0, 1.0).numpy())
    base = np.asarray(picture.convert("RGB"), dtype=np.float64)
    out = (1.0 - alpha) * base + alpha * colour
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def colour_ramp(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1], any shape [...] -> float RGB [..., 3] in 0..255 (viridis-like)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    anchors = np.linspace(0.0, 1.0, len(_RAMP))
    return np.stack([np.interp(v, anchors, _RAMP[:, c]) for c in range(3)], axis=-1)


def line_plot(values: Sequence[float], *, title: str = "", width: int = 480, height: int = 320) -> Image.Image:
    """A minimal line chart of ``values`` against their index (e.g. a loss curve).

    Axes with the min/max value on the y axis and the first/last index on the
    x axis; non-finite values break the line. Returns an RGB image
    [width x height].
    """
    values = [float(v) for v in values]
    picture = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    font = _font(11)
    left, right, top, bottom = 64, width - 12, 24, height - 28
    ink, line = (40, 40, 40), (31, 119, 180)
    if title:
        _text(draw, (width / 2, 4), title, font, "ma", fill=ink)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=ink, width=1)

    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        _text(draw, ((left + right) / 2, (top + bottom) / 2), "no data", font, "mm", fill=ink)
        return picture
    lo, hi = min(finite), max(finite)
    span = hi - lo if hi > lo else (abs(hi) or 1.0)
    base = lo if hi > lo else lo - span / 2  # a flat series sits mid-height

    def point(i: int, v: float) -> tuple[float, float]:
        fx = i / (len(values) - 1) if len(values) > 1 else 0.5
        return left + fx * (right - left), bottom - (v - base) / span * (bottom - top)

    segment: list[tuple[float, float]] = []
    for i, v in enumerate(values + [math.nan]):  # trailing nan flushes the last segment
        if math.isfinite(v):
            segment.append(point(i, v))
            continue
        if len(segment) > 1:
            draw.line(segment, fill=line, width=2)
        elif segment:
            x, y = segment[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=line)
        segment = []

    _, y_hi = point(0, hi)
    _, y_lo = point(0, lo)
    _text(draw, (left - 4, y_hi), _fmt(hi), font, "rm", fill=ink)
    if hi > lo:
        _text(draw, (left - 4, y_lo), _fmt(lo), font, "rm", fill=ink)
    _text(draw, (left, bottom + 4), "0", font, "ma", fill=ink)
    _text(draw, (right, bottom + 4), str(max(len(values) - 1, 0)), font, "ma", fill=ink)
    return picture


def to_pil(image: torch.Tensor | np.ndarray | Image.Image) -> Image.Image:
    """Float [3, H, W] in [0, 1] (tensor or array) or a PIL image -> PIL RGB image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = _as_numpy(image).astype(np.float64)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"expected an image [3, H, W], got shape {array.shape}")
    pixels = np.clip(np.rint(array.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, xy, text: str, font, anchor: str, **kwargs) -> None:
    try:
        draw.text(xy, text, font=font, anchor=anchor, **kwargs)
    except ValueError:  # anchors need a FreeType font; the bitmap fallback draws from the top-left
        draw.text(xy, text, font=font, **kwargs)


def _fmt(v: float) -> str:
    return f"{v:.4g}"
