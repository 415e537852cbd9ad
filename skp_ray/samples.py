"""Bundled sample images: cartoon faces rendered deterministically by code.

Each sample is a cartoon face (head ellipse with ears, two eyes with pupils, a
round nose, a smiling mouth) on a striped, noisy background, placed by a random
similarity transform (rotation within +/-20 degrees, scale, translation; the
whole face stays inside the frame) with random colours.

Landmarks, in the order of ``LANDMARK_NAMES``, are (y, x) = (row, col)
normalised to [0, 1] by the image side, a pixel's centre being at index + 0.5.
"left"/"right" mean image-left/image-right before rotation.

Drawing happens at ``SUPERSAMPLE`` times the output side and is averaged down in
exact ``SUPERSAMPLE x SUPERSAMPLE`` blocks, so a continuous position ``p`` on the
large canvas is ``p / SUPERSAMPLE`` on the output. Every landmark is snapped to
a large-canvas pixel centre and its feature (pupil, nose ball, mouth-corner dot)
is a disc drawn symmetrically around that pixel, so the landmark is exactly the
centre of the drawn feature.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
from PIL import Image, ImageDraw

from skp_ray.images import join_uri

__all__ = ["LANDMARK_NAMES", "PUPIL_MAX", "render_samples", "write_sample_images"]

LANDMARK_NAMES: tuple[str, ...] = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
SUPERSAMPLE = 4
PUPIL_MAX = 40  # pupils are near-black: every channel <= PUPIL_MAX
MAX_ROTATION_DEG = 20.0

# Canonical face geometry, (y, x) in units of the face scale s (pixels), origin
# at the head centre, y down. Everything lies within distance 0.5 of the origin,
# so a face of scale s fits in a disc of radius s / 2.
_HEAD_RADII = (0.5, 0.4)
_EAR_CENTRES = ((0.0, -0.4), (0.0, 0.4))
_EAR_RADIUS = 0.1
_EYE_CENTRES = ((-0.1, -0.16), (-0.1, 0.16))
_EYE_RADII = (0.07, 0.09)
_PUPIL_RADIUS = 0.035
_NOSE_CENTRE = (0.08, 0.0)
_NOSE_RADIUS = 0.05
_MOUTH_CORNERS = ((0.24, -0.17), (0.24, 0.17))
_MOUTH_UPPER_DIP = 0.03
_MOUTH_LOWER_DIP = 0.10
_DIMPLE_RADIUS = 0.025


@dataclass
class _Face:
    """One rendered face: image uint8 [S, S, 3], landmarks float64 [L, 2] normalised (y, x)."""

    image: np.ndarray
    landmarks: np.ndarray
    colours: dict[str, tuple[int, int, int]]
    scale: float  # face scale s in output pixels
    angle_deg: float


def render_samples(n: int, *, size: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``n`` cartoon faces with their landmarks.

    Returns ``(images, landmarks)``: images float32 [n, 3, size, size] in [0, 1]
    (exactly ``uint8 / 255``, so a PNG round trip is lossless); landmarks float32
    [n, 5, 2] normalised (y, x) in the order of ``LANDMARK_NAMES``. The result
    depends only on ``(n, size, seed)``; the first k faces of a larger ``n`` are
    the same as for ``n = k``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels for the faces to be recognisable, got {size}")
    rng = np.random.default_rng(seed)
    faces = [_render_face(rng, size) for _ in range(n)]
    images = np.stack([f.image for f in faces]) if faces else np.zeros((0, size, size, 3), np.uint8)
    marks = np.stack([f.landmarks for f in faces]) if faces else np.zeros((0, len(LANDMARK_NAMES), 2))
    images_t = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).contiguous()
    return images_t, torch.from_numpy(marks).float()


def write_sample_images(folder: str | os.PathLike, *, n: int = 8, size: int = 256, seed: int = 0) -> list[str]:
    """Write ``sample_000.png`` ... and ``landmarks.json`` into ``folder``.

    ``folder`` is a local path or any fsspec URL (created if missing).
    ``landmarks.json`` maps each file name to its landmarks ``[[y, x], ...]``
    (normalised, order of ``LANDMARK_NAMES``). Returns the image paths in order.
    """
    images, landmarks = render_samples(n, size=size, seed=seed)
    folder = os.fspath(folder)
    fs, root = fsspec.core.url_to_fs(folder)
    fs.makedirs(root, exist_ok=True)
    pixels = images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    paths, table = [], {}
    for i in range(n):
        name = f"sample_{i:03d}.png"
        with fs.open(f"{root.rstrip('/')}/{name}", "wb") as f:
            Image.fromarray(pixels[i], "RGB").save(f, format="PNG")
        paths.append(join_uri(folder, name))
        table[name] = [[float(y), float(x)] for y, x in landmarks[i].tolist()]
    with fs.open(f"{root.rstrip('/')}/landmarks.json", "w") as f:
        json.dump(table, f, indent=1)
    return paths


def _render_face(rng: np.random.Generator, size: int) -> _Face:
    big = size * SUPERSAMPLE
    colours = _draw_colours(rng)
    angle = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
    scale = rng.uniform(0.5, 0.8) * size  # face scale in output pixels
    margin = 0.02 * size
    lo, hi = scale / 2 + margin, size - scale / 2 - margin
    centre = rng.uniform(lo, hi, size=2)  # (y, x), continuous output pixels

    theta = math.radians(angle)
    rot = np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
    s_big = scale * SUPERSAMPLE
    c_big = centre * SUPERSAMPLE

    def place(p: tuple[float, float]) -> np.ndarray:
        """Canonical (y, x) -> continuous large-canvas (y, x)."""
        # with y pointing down, a positive angle turns the face clockwise on screen
        return c_big + s_big * (rot @ np.asarray(p, dtype=np.float64))

    def snap(p: np.ndarray) -> np.ndarray:
        """Large-canvas integer pixel index (y, x) that contains p."""
        return np.floor(p).astype(np.int64)

    canvas = Image.fromarray(_background(rng, big, colours), "RGB")
    draw = ImageDraw.Draw(canvas)

    def ellipse(centre_yx: np.ndarray, radii: tuple[float, float], fill, outline=None, width=0) -> None:
        pts = _ellipse_points(centre_yx, radii, s_big, rot)
        draw.polygon(pts, fill=fill, outline=outline, width=width)

    def disc(index_yx: np.ndarray, radius: float, fill) -> None:
        r = max(1, int(round(radius)))
        y, x = int(index_yx[0]), int(index_yx[1])
        # PIL's integer coordinates are pixel indices; this box is symmetric around pixel (y, x)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)

    outline_w = max(2, int(round(0.012 * s_big)))
    for ear in _EAR_CENTRES:
        ellipse(place(ear), (_EAR_RADIUS, _EAR_RADIUS), colours["head"], colours["outline"], outline_w)
    ellipse(place((0.0, 0.0)), _HEAD_RADII, colours["head"], colours["outline"], outline_w)

    marks = []
    for eye in _EYE_CENTRES:
        idx = snap(place(eye))
        ellipse(idx + 0.5, _EYE_RADII, (255, 255, 255), colours["outline"], max(1, outline_w // 2))
        disc(idx, _PUPIL_RADIUS * s_big, colours["pupil"])
        marks.append(idx)

    corners = [snap(place(c)) for c in _MOUTH_CORNERS]
    draw.polygon(_mouth_points(corners, s_big, rot), fill=colours["lips"])
    for idx in corners:
        disc(idx, _DIMPLE_RADIUS * s_big, colours["lips"])

    nose = snap(place(_NOSE_CENTRE))
    disc(nose, _NOSE_RADIUS * s_big, colours["nose"])
    marks.insert(2, nose)
    marks.extend(corners)

    image = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.uint8).copy()
    landmarks = (np.stack(marks).astype(np.float64) + 0.5) / big
    return _Face(image, landmarks, colours, scale, angle)


def _ellipse_points(centre_yx: np.ndarray, radii: tuple[float, float], s_big: float, rot: np.ndarray, n: int = 96):
    """Polygon vertices (PIL (x, y) pixel-index coordinates) of a rotated ellipse."""
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    local = np.stack([radii[0] * np.sin(t), radii[1] * np.cos(t)]) * s_big  # [2, n] (y, x)
    yx = centre_yx[:, None] + rot @ local
    return [(float(x) - 0.5, float(y) - 0.5) for y, x in yx.T]


def _mouth_points(corners: list[np.ndarray], s_big: float, rot: np.ndarray, n: int = 24):
    """Crescent between the two snapped mouth corners, sagging downwards in the face frame."""
    a, b = (c.astype(np.float64) + 0.5 for c in corners)
    t = np.linspace(0.0, 1.0, n)
    down = rot @ np.array([1.0, 0.0])  # face "down" direction on the canvas
    bump = 4.0 * t * (1.0 - t)
    chord = a[None, :] + t[:, None] * (b - a)[None, :]
    upper = chord + (_MOUTH_UPPER_DIP * s_big) * bump[:, None] * down[None, :]
    lower = chord + (_MOUTH_LOWER_DIP * s_big) * bump[:, None] * down[None, :]
    ring = np.concatenate([upper, lower[::-1]])
    return [(float(x) - 0.5, float(y) - 0.5) for y, x in ring]


def _draw_colours(rng: np.random.Generator) -> dict[str, tuple[int, int, int]]:
    def colour(low: int, high: int) -> tuple[int, int, int]:
        return tuple(int(v) for v in rng.integers(low, high + 1, size=3))

    def far_from(ref: tuple[int, int, int], low: int, high: int, min_dist: float = 90.0):
        # a bounded loop keeps the rng stream short and deterministic
        for _ in range(32):
            c = colour(low, high)
            if np.linalg.norm(np.subtract(c, ref)) >= min_dist:
                return c
        return tuple(255 - v for v in ref)

    head = colour(120, 240)
    return {
        "background_a": colour(0, 255),
        "background_b": colour(0, 255),
        "head": head,
        "outline": colour(0, 60),
        "pupil": colour(0, PUPIL_MAX),
        "nose": far_from(head, 0, 255),
        "lips": far_from(head, 0, 200),
    }


def _background(rng: np.random.Generator, big: int, colours: dict) -> np.ndarray:
    """Soft stripes at a random angle between two colours plus mild noise, uint8 [big, big, 3]."""
    phi = rng.uniform(0.0, math.pi)
    period = rng.uniform(0.08, 0.3) * big
    cells = -(-big // 8)
    noise = rng.normal(0.0, 12.0, size=(cells, cells, 1))
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32)
    wave = 0.5 + 0.5 * np.sin((xx * math.cos(phi) + yy * math.sin(phi)) * (2.0 * math.pi / period))
    a = np.asarray(colours["background_a"], np.float32)
    b = np.asarray(colours["background_b"], np.float32)
    img = a + wave[..., None] * (b - a)
    img += np.repeat(np.repeat(noise, 8, axis=0), 8, axis=1)[:big, :big].astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)
