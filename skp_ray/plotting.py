"""Pictures a person can check, drawn with PIL only.

Images come in as float [3, H, W] in [0, 1] (torch tensor or numpy array) or as
PIL images; keypoints as [K, 2] in one of ``ORDERS``, named by an ``order``
argument: normalised (y, x) = (row, col) (the default), normalised (x, y) as
the labelling job's ``keypoints_xy_normalized``, or (x, y) in pixels of the
picture drawn on. A pixel's centre is at index + 0.5 (so pixel column j spans
x in [j, j + 1) pixels, [j/W, (j+1)/W) normalised).
"""

from __future__ import annotations

import colorsys
import io
import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:  # pictures of numpy arrays need no torch; the jobs' drivers draw without it
    import torch

__all__ = [
    "ORDERS",
    "axis_ticks",
    "captioned",
    "correspondence_pair",
    "draw_keypoints",
    "heatmap_overlay",
    "image_grid",
    "keypoint_colours",
    "keypoint_sheet",
    "label_rows",
    "landmark_comparison",
    "line_plot",
    "text_panel",
]

# How a keypoint array [K, 2] is read: its coordinate order and unit.
ORDERS = ("yx_normalized", "xy_normalized", "xy_pixels")

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
_INK = (40, 40, 40)
_WHITE = (255, 255, 255)


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


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
    order: str = "yx_normalized",
    numbered: bool = True,
    radius: float | None = None,
    only: int | None = None,
) -> Image.Image:
    """Draw keypoints [K, 2] (read as ``order``, one of ``ORDERS``) on a copy of ``image``.

    Keypoint i is a filled circle in ``keypoint_colours(K)[i]`` with a dark
    outline, labelled with i when ``numbered``; the label sits above and to
    the right of the point, moved left or below where it would leave the
    picture, so it is always whole. ``only`` draws keypoint ``only`` alone
    (still in its colour and with its number). Non-finite keypoints are
    skipped. ``radius`` is in pixels (default: about 1/64 of the shorter side,
    at least 3).
    """
    picture = to_pil(image).copy()
    centres = _pil_xy(keypoints, order, picture.size)
    radius = _radius(picture) if radius is None else radius
    draw = ImageDraw.Draw(picture)
    font = _font(max(10, int(round(radius * 2.5))))
    outline = max(1, int(radius // 3))
    colours = keypoint_colours(len(centres))
    for i, (cx, cy) in enumerate(centres):
        if (only is not None and i != only) or not (math.isfinite(cx) and math.isfinite(cy)):
            continue
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        draw.ellipse(box, fill=colours[i], outline=_OUTLINE, width=outline)
        if numbered:
            _point_label(draw, picture.size, (cx, cy), radius, str(i), font, colours[i], outline)
    return picture


def _pil_xy(keypoints, order: str, size: tuple[int, int]) -> np.ndarray:
    """Keypoints [K, 2] in ``order`` -> (x, y) [K, 2] in PIL coordinates (pixel indices, so centre - 0.5)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    points = _as_numpy(keypoints).reshape(-1, 2).astype(np.float64)
    if order == "yx_normalized":
        points = points[:, ::-1]
    if order != "xy_pixels":
        points = points * np.asarray(size, dtype=np.float64)
    return points - 0.5


def _radius(picture: Image.Image) -> float:
    return max(3.0, min(picture.size) / 64.0)


def _point_label(draw: ImageDraw.ImageDraw, size, centre, radius: float, text: str, font, colour, stroke: int) -> None:
    """``text`` beside the point at ``centre``, flipped and clamped so that all of it lies in the picture."""
    width, height = size
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    text_w, text_h = right - left, bottom - top
    cx, cy = centre
    x = cx + radius + 1 if cx + radius + 1 + text_w <= width else cx - radius - 1 - text_w
    y = cy - radius - 1 - text_h if cy - radius - 1 - text_h >= 0 else cy + radius + 1
    x = min(max(x, 0), width - text_w)
    y = min(max(y, 0), height - text_h)
    position = (int(round(x - left)), int(round(y - top)))
    draw.text(position, text, font=font, fill=colour, stroke_width=stroke, stroke_fill=_OUTLINE)


def landmark_comparison(
    image: torch.Tensor | np.ndarray | Image.Image,
    truth: np.ndarray,
    prediction: np.ndarray,
    visible: np.ndarray | None = None,
    *,
    order: str = "yx_normalized",
) -> Image.Image:
    """Ground-truth landmarks [M, 2] as rings, predictions [M, 2] as numbered dots, a line joining each pair;
    landmark j has colour j in both. Both are read as ``order`` (one of ``ORDERS``). Invisible ground
    truth (``visible`` False) is left out, its prediction still drawn."""
    picture = draw_keypoints(image, prediction, order=order)
    truth_xy = _pil_xy(truth, order, picture.size)
    if visible is not None:
        truth_xy = np.where(np.asarray(visible, dtype=bool)[:, None], truth_xy, np.nan)
    predicted_xy = _pil_xy(prediction, order, picture.size)
    radius = _radius(picture)
    colours = keypoint_colours(len(truth_xy))
    draw = ImageDraw.Draw(picture)
    for colour, (tx, ty), (px, py) in zip(colours, truth_xy, predicted_xy):
        if not (math.isfinite(tx) and math.isfinite(ty)):
            continue
        draw.line([(tx, ty), (px, py)], fill=colour, width=1)
        draw.ellipse([tx - radius, ty - radius, tx + radius, ty + radius], outline=colour, width=2)
    return picture


def correspondence_pair(
    source: np.ndarray | Image.Image,
    target: np.ndarray | Image.Image,
    source_xy: np.ndarray,
    predicted_xy: np.ndarray,
    true_xy: np.ndarray | None = None,
    *,
    height: int = 192,
    gap: int = 8,
) -> Image.Image:
    """Source (left) and target (right) at ``height`` pixels, aspect kept: point i in colour i as a dot at
    its source pixel and at its predicted target pixel, a line joining the two; the true target point, when
    given, as a ring in the same colour. Points are (x, y) in pixels of the original images (uint8 [H, W, 3]
    arrays or PIL images)."""
    left, right = (_at_height(Image.fromarray(image) if isinstance(image, np.ndarray) else image, height) for image in (source, target))
    canvas = Image.new("RGB", (left.width + gap + right.width, height), _WHITE)
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    offset = np.array([left.width + gap, 0.0])
    src = _scaled_xy(source_xy, left.size, source)
    pred = _scaled_xy(predicted_xy, right.size, target) + offset
    radius = max(3.0, height / 64.0)
    colours = keypoint_colours(len(src))
    draw = ImageDraw.Draw(canvas)
    for colour, a, b in zip(colours, src, pred):
        draw.line([tuple(a), tuple(b)], fill=colour, width=1)
    if true_xy is not None:
        for colour, (tx, ty) in zip(colours, _scaled_xy(true_xy, right.size, target) + offset):
            draw.ellipse([tx - radius - 1, ty - radius - 1, tx + radius + 1, ty + radius + 1], outline=colour, width=2)
    for colour, point in [*zip(colours, src), *zip(colours, pred)]:
        x, y = point
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=_OUTLINE, width=1)
    return canvas


def _at_height(picture: Image.Image, height: int) -> Image.Image:
    width = max(1, round(picture.width * height / picture.height))
    return picture.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)


def _scaled_xy(points_xy, shown_size: tuple[int, int], original) -> np.ndarray:
    """Pixel indices (x, y) of the original image -> PIL coordinates of the picture shown at ``shown_size``."""
    width, height = original.size if isinstance(original, Image.Image) else (original.shape[1], original.shape[0])
    points = _as_numpy(points_xy).reshape(-1, 2).astype(np.float64) + 0.5  # pixel centres
    return points * np.array([shown_size[0] / width, shown_size[1] / height]) - 0.5


def image_grid(
    pictures: Sequence[Image.Image],
    *,
    columns: int = 4,
    pad: int = 4,
    background: tuple[int, int, int] = _WHITE,
    tight: bool = False,
) -> Image.Image:
    """Tile pictures row by row into one RGB image.

    Each cell is as large as the largest picture; pictures sit at their
    cell's top-left. With n pictures the grid has min(columns, n) columns and
    ceil(n / columns) rows, ``pad`` pixels around and between cells. With
    ``tight`` each picture takes only its own width and each row only its
    tallest picture's height (for pictures of different sizes), and the
    image is as wide as the widest row.
    """
    if not pictures:
        raise ValueError("image_grid needs at least one picture")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    cell_w = max(p.width for p in pictures)
    cell_h = max(p.height for p in pictures)
    positions, width, y = [], 0, pad
    for start in range(0, len(pictures), columns):
        row = pictures[start : start + columns]
        x = pad
        for picture in row:
            positions.append((x, y))
            x += (picture.width if tight else cell_w) + pad
        width = max(width, x)
        y += (max(p.height for p in row) if tight else cell_h) + pad
    canvas = Image.new("RGB", (width, y), background)
    for picture, position in zip(pictures, positions):
        canvas.paste(picture.convert("RGB"), position)
    return canvas


def text_panel(
    width: int,
    height: int,
    lines: str | Sequence[str],
    *,
    font_size: int | None = None,
    background: tuple[int, int, int] = _WHITE,
    colour: tuple[int, int, int] = _INK,
) -> Image.Image:
    """A ``width`` x ``height`` panel with ``lines`` centred on it, wrapped at spaces to fit its width (a
    word too long for it is shortened in the middle with "..."); lines beyond its height are left out."""
    font = _font(font_size or _caption_size(width, height))
    wrapped = _wrap(lines, font, width - 4)
    line_h = _line_height(font)
    fitting = wrapped[: max(1, (height - 4) // line_h)]
    panel = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(panel)
    y = (height - len(fitting) * line_h) / 2
    for line in fitting:
        _text(draw, (width / 2, y), line, font, "ma", fill=colour)
        y += line_h
    return panel


def captioned(picture: Image.Image, lines: str | Sequence[str], *, font_size: int | None = None) -> Image.Image:
    """``picture`` above a white strip holding ``lines``, wrapped to the picture's width (see ``text_panel``).

    The font size defaults to 1/16 of the picture's shorter side, between 11 and 22 pixels."""
    font_size = font_size or _caption_size(*picture.size)
    font = _font(font_size)
    count = len(_wrap(lines, font, picture.width - 4))
    strip = text_panel(picture.width, count * _line_height(font) + 4, lines, font_size=font_size)
    return _stack([picture, strip])


def label_rows(
    rows: Sequence[Image.Image],
    labels: Sequence[str],
    *,
    colours: Sequence[tuple[int, int, int]] | None = None,
    pad: int = 2,
    font_size: int | None = None,
) -> Image.Image:
    """Stack ``rows`` (pictures) with ``labels[i]`` written left of row i, in ``colours[i]`` with a dark
    outline (default: dark ink), all labels in one column as wide as the widest."""
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
    font = _font(font_size or _caption_size(*rows[0].size))
    measure = ImageDraw.Draw(rows[0].copy())
    column = max(int(measure.textlength(label, font=font)) for label in labels) + 8
    labelled = []
    for i, (row, label) in enumerate(zip(rows, labels)):
        panel = Image.new("RGB", (column + row.width, row.height), _WHITE)
        panel.paste(row.convert("RGB"), (column, 0))
        draw = ImageDraw.Draw(panel)
        if colours is None:
            _text(draw, (4, row.height / 2), label, font, "lm", fill=_INK)
        else:
            _text(draw, (4, row.height / 2), label, font, "lm", fill=colours[i], stroke_width=1, stroke_fill=_OUTLINE)
        labelled.append(panel)
    return image_grid(labelled, columns=1, pad=pad)


def keypoint_sheet(
    images: torch.Tensor,
    keypoints: torch.Tensor,
    maps: torch.Tensor,
    *,
    sizes: Sequence[tuple[int, int]] | None = None,
    captions: Sequence[str] | None = None,
) -> Image.Image:
    """Each image [B, 3, H, W] with its numbered keypoints [B, K, 2] (normalised (y, x)), then the first
    image under each keypoint token's map [K, h, w] with only that keypoint drawn.

    Panels are captioned (``captions[i]`` or "image i", and "keypoint k map") and flow row by row: the
    images fill the first row, the maps follow, so the sheet has no empty cells but in its last row.
    ``sizes`` gives each image's original (height, width): its panels are then shown at that aspect, at
    the images' height.
    """
    views = [_at_aspect(image, sizes[i] if sizes is not None else None) for i, image in enumerate(images)]
    names = list(captions) if captions is not None else [f"image {i}" for i in range(len(views))]
    height = views[0].height  # every panel's: one dot and font size for all, whatever their widths
    radius, font_size = max(3.0, height / 64.0), _caption_size(height, height)

    def panel(picture: Image.Image, points, caption: str, only: int | None = None) -> Image.Image:
        return captioned(draw_keypoints(picture, points, radius=radius, only=only), caption, font_size=font_size)

    marked = [panel(view, points, name) for view, points, name in zip(views, keypoints, names)]
    overlays = [
        panel(heatmap_overlay(views[0], token_map), keypoints[0], f"keypoint {k} map", only=k)
        for k, token_map in enumerate(maps)
    ]
    columns = max(len(marked), math.ceil(math.sqrt(len(marked) + len(overlays))))
    return image_grid(marked + overlays, columns=columns, tight=True)


def _at_aspect(image, size: tuple[int, int] | None) -> Image.Image:
    """``image`` as a PIL image, resized to the aspect of ``size`` (height, width) at its own height."""
    picture = to_pil(image)
    if size is None:
        return picture
    height, width = size
    shown_width = max(1, int(round(picture.height * width / height)))
    return picture.resize((shown_width, picture.height), Image.Resampling.BICUBIC)


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
    import torch
    import torch.nn.functional as F

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


def line_plot(
    values: Sequence[float],
    *,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "loss",
    width: int = 480,
    height: int = 320,
) -> Image.Image:
    """A line chart of ``values`` against their step, the first value being step 1 (e.g. a loss curve).

    The x axis is ticked at step 1, the last step and a few round steps between; the y axis at the min,
    the max and a few round values between, with light grid lines. ``xlabel`` sits under the x axis,
    ``ylabel`` (turned) left of the y axis; room for them is kept even when they are empty. Non-finite
    values break the line. Returns an RGB image [width x height].
    """
    values = [float(v) for v in values]
    picture = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(picture)
    font = _font(11)
    line_h = _line_height(font)
    finite = [v for v in values if math.isfinite(v)]
    y_ticks = axis_ticks(min(finite), max(finite)) if finite else []
    tick_w = max([draw.textlength(_fmt(v), font=font) for v in y_ticks], default=0)
    left, right = int(line_h + 10 + tick_w), width - 16
    top, bottom = (line_h + 8 if title else 10), height - 2 * line_h - 10
    ink, line = _INK, (31, 119, 180)
    if title:
        _text(draw, (width / 2, 4), title, font, "ma", fill=ink)
    if xlabel:
        _text(draw, ((left + right) / 2, height - line_h - 2), xlabel, font, "ma", fill=ink)
    if ylabel:
        _paste_turned_text(picture, ylabel, font, (2, (top + bottom) / 2))
    if not finite:
        draw.line([(left, top), (left, bottom), (right, bottom)], fill=ink, width=1)
        _text(draw, ((left + right) / 2, (top + bottom) / 2), "no data", font, "mm", fill=ink)
        return picture
    lo, hi = min(finite), max(finite)
    span = hi - lo if hi > lo else (abs(hi) or 1.0)
    base = lo if hi > lo else lo - span / 2  # a flat series sits mid-height
    last = len(values)

    def x_of(step: float) -> float:
        return left + (step - 1) / (last - 1) * (right - left) if last > 1 else (left + right) / 2

    def y_of(v: float) -> float:  # a few pixels off the x axis and the top, so the line never hides them
        return bottom - 6 - (v - base) / span * (bottom - top - 12)

    for v in y_ticks:
        draw.line([(left, y_of(v)), (right, y_of(v))], fill=(228, 228, 228), width=1)
        draw.line([(left - 4, y_of(v)), (left, y_of(v))], fill=ink, width=1)
        _text(draw, (left - 6, y_of(v)), _fmt(v), font, "rm", fill=ink)
    for step in axis_ticks(1, last, integer=True):
        draw.line([(x_of(step), bottom), (x_of(step), bottom + 4)], fill=ink, width=1)
        _text(draw, (x_of(step), bottom + 6), str(int(step)), font, "ma", fill=ink)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=ink, width=1)

    segment: list[tuple[float, float]] = []
    for step, v in enumerate(values + [math.nan], start=1):  # trailing nan flushes the last segment
        if math.isfinite(v):
            segment.append((x_of(step), y_of(v)))
            continue
        if len(segment) > 1:
            draw.line(segment, fill=line, width=2)
        elif segment:
            x, y = segment[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=line)
        segment = []
    return picture


def axis_ticks(first: float, last: float, *, count: int = 5, integer: bool = False) -> list[float]:
    """Tick values for an axis from ``first`` to ``last``: both ends and the multiples of a round step
    (1, 2 or 5 times a power of ten, about (last - first) / (count - 1); whole with ``integer``) between
    them, leaving out those within half a step of an end so that labels do not overlap."""
    if not last > first:
        return [first]
    raw = (last - first) / max(count - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 5, 10)), key=lambda s: abs(math.log(s / raw)))
    if integer:
        step = max(1.0, round(step))
    inner = [round(m * step, 12) for m in range(math.ceil(first / step), math.floor(last / step) + 1)]
    return [first] + [v for v in inner if first + step / 2 < v < last - step / 2] + [last]


def _paste_turned_text(picture: Image.Image, text: str, font, left_middle: tuple[float, float]) -> None:
    """``text`` turned a quarter left (reading upwards), its left edge at x, centred on y."""
    scratch = ImageDraw.Draw(picture)
    box = scratch.textbbox((0, 0), text, font=font)
    label = Image.new("RGB", (box[2] - box[0] + 2, box[3] - box[1] + 2), _WHITE)
    ImageDraw.Draw(label).text((1 - box[0], 1 - box[1]), text, font=font, fill=_INK)
    turned = label.rotate(90, expand=True)
    x, y = left_middle
    picture.paste(turned, (int(x), int(round(y - turned.height / 2))))


def _stack(pictures: Sequence[Image.Image]) -> Image.Image:
    """Pictures one above the other, no gap, on white; as wide as the widest."""
    return image_grid(pictures, columns=1, pad=0, tight=True)


def _caption_size(width: int, height: int) -> int:
    return max(11, min(22, round(min(width, height) / 16)))


def _line_height(font) -> int:
    return font.getbbox("Ag")[3] + max(2, getattr(font, "size", 11) // 4)


def _wrap(lines: str | Sequence[str], font, width: float) -> list[str]:
    """Each line word-wrapped to ``width`` pixels; a word wider than that is shortened in its middle."""
    wrapped = []
    for line in [lines] if isinstance(lines, str) else lines:
        current = ""
        for word in line.split(" "):
            candidate = f"{current} {word}" if current else word
            if current and font.getlength(candidate) > width:
                wrapped.append(current)
                candidate = word
            current = _shorten(candidate, font, width)
        wrapped.append(current)
    return wrapped


def _shorten(text: str, font, width: float) -> str:
    """``text``, or its start and end joined by "..." if it is wider than ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    keep = len(text)
    while keep > 0 and font.getlength(text[: (keep + 1) // 2] + "..." + text[len(text) - keep // 2 :]) > width:
        keep -= 1
    return text[: (keep + 1) // 2] + "..." + text[len(text) - keep // 2 :]


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
    if hasattr(x, "detach"):  # a torch tensor (torch itself may not be imported)
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
