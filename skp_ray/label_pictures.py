"""Pictures of the labelling job's rows, to check its keypoints by eye (``jobs/show.py``).

Each picked row becomes one picture: its image at its own aspect (longest side
``DISPLAY_SIZE``) with the numbered keypoints, keypoint i in colour i, above a
caption with the file name and the row's status. A row with keypoint
confidence also shows each keypoint's spread as a circle of that radius in its
colour, and its image's score (``skp_ray.confidence.image_score``) in the
caption. An error row shows its image if it can be read, else a grey panel
naming the cause; so does an ok row whose image can no longer be read.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from skp_ray.confidence import ConfidenceTally, image_score
from skp_ray.images import ImageReadError, absolute_uri, join_uri, read_image
from skp_ray.label_store import OUTPUT_SCHEMA, read_labels
from skp_ray.plotting import captioned, draw_keypoints, image_grid, keypoint_colours, text_panel

__all__ = ["DISPLAY_SIZE", "label_picture", "least_confident_rows", "pick_rows", "show_labels"]

DISPLAY_SIZE = 512  # longest side of a drawn image, in pixels
GRID_COLUMNS = 4
_ERROR_GREY = (110, 110, 110)
# what a picture needs
_COLUMNS = ["image_id", "uri", "status", "error_cause", "error", "keypoints_xy", "keypoint_spread_px", "peak_share"]


def show_labels(
    labels: str,
    output: str,
    *,
    uris: Sequence[str] | None = None,
    sample: int | None = None,
    seed: int = 0,
    least_confident: int | None = None,
    display_size: int = DISPLAY_SIZE,
) -> list[str]:
    """Draw rows of the labels at ``labels`` into ``output``: the ``least_confident`` ones
    (``least_confident_rows``), else those ``pick_rows`` picks. One grid PNG when ``output`` ends in
    ".png", else a folder (local or fsspec URL) of one PNG per image. Returns the files written."""
    rows = read_labels(labels, columns=_COLUMNS).to_pylist()
    if least_confident is not None:
        if uris or sample is not None:
            raise ValueError("give one of uris, sample and least_confident")
        rows = least_confident_rows(rows, least_confident)
        if not rows:
            raise ValueError(
                f"no ok row of {labels!r} has keypoint confidence (labelled before it existed?): relabel "
                "those images into a new output, or pick rows with --sample or --uri"
            )
    else:
        rows = pick_rows(rows, uris=uris, sample=sample, seed=seed)
    if not rows:
        raise ValueError(f"{labels!r} holds no label rows to draw")
    if output.lower().endswith(".png"):
        pictures = [label_picture(row, display_size=display_size) for row in rows]
        _write_png(output, image_grid(pictures, columns=GRID_COLUMNS, tight=True))
        return [output]
    fs, folder = fsspec.core.url_to_fs(output)
    fs.makedirs(folder, exist_ok=True)
    written = [join_uri(output, picture_name(row)) for row in rows]
    for row, uri in zip(rows, written):  # one at a time: a folder may get many
        _write_png(uri, label_picture(row, display_size=display_size))
    return written


def pick_rows(
    rows: Sequence[dict], *, uris: Sequence[str] | None = None, sample: int | None = None, seed: int = 0
) -> list[dict]:
    """The rows to draw, in URI order: those of ``uris`` (as written in the rows, or local paths that
    resolve to them; in the order given), or ``sample`` picked at random by
    ``numpy.random.default_rng(seed)``, or all of them. An unknown URI is a ValueError naming it."""
    if uris and sample is not None:
        raise ValueError("give either uris or sample, not both")
    rows = sorted(rows, key=lambda row: row["uri"])
    if uris:
        by_uri = {row["uri"]: row for row in rows}
        unknown = [uri for uri in uris if uri not in by_uri and absolute_uri(uri) not in by_uri]
        if unknown:
            raise ValueError(f"no label row for --uri {', '.join(map(repr, unknown))}")
        return [by_uri.get(uri) or by_uri[absolute_uri(uri)] for uri in uris]
    if sample is not None:
        if sample < 1:
            raise ValueError(f"--sample must be at least 1, got {sample}")
        picked = np.random.default_rng(seed).choice(len(rows), size=min(sample, len(rows)), replace=False)
        return [rows[i] for i in sorted(picked)]
    return rows


def least_confident_rows(rows: Sequence[dict], count: int) -> list[dict]:
    """The ``count`` ok rows with the highest score, least confident first: the ranking of the
    run summary's ``ConfidenceTally``. Rows without keypoint confidence are never picked."""
    if count < 1:
        raise ValueError(f"--least_confident must be at least 1, got {count}")
    tally = ConfidenceTally(least_confident=count)
    schema = pa.schema([OUTPUT_SCHEMA.field(name) for name in _TALLIED])
    tally.add(pa.Table.from_pylist([{name: row.get(name) for name in _TALLIED} for row in rows], schema=schema))
    by_uri = {row["uri"]: row for row in rows}
    return [by_uri[entry["uri"]] for entry in tally.result()["least_confident"]]


_TALLIED = ("uri", "status", "keypoint_spread_px", "peak_share")


def label_picture(row: dict, *, display_size: int = DISPLAY_SIZE) -> Image.Image:
    """One label row drawn (see the module's description); ``row`` needs ``OUTPUT_SCHEMA``'s image_id, uri,
    status, error_cause, error and keypoints_xy (keypoint_spread_px when it has one)."""
    font_size = max(11, display_size // 28)
    try:
        image = Image.fromarray(read_image(row["uri"]))
    except ImageReadError as error:
        cause = row["error_cause"] if row["status"] == "error" else f"image unreadable now: {error.cause}"
        message = row["error"] if row["status"] == "error" and row["error"] else str(error)
        return captioned(_error_panel(cause, message, display_size, font_size), _caption(row), font_size=font_size)
    picture = _fit(image, display_size)
    if row["status"] == "ok" and row["keypoints_xy"]:
        points_xy = np.asarray(row["keypoints_xy"], dtype=np.float64)
        if row.get("keypoint_spread_px"):
            picture = _spread_circles(picture, points_xy, row["keypoint_spread_px"], image.size)
        radius = max(3.0, display_size / 80)  # a little larger than draw_keypoints' default: numbers to read
        picture = draw_keypoints(picture, points_xy / image.size, order="xy_normalized", radius=radius)
    return captioned(picture, _caption(row), font_size=font_size)


def picture_name(row: dict) -> str:
    """``<file name stem>-<image id>.png``: readable, and unique even when two folders hold the same name."""
    stem = posixpath.splitext(posixpath.basename(row["uri"].rstrip("/")))[0]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)}-{row['image_id']}.png"


def _caption(row: dict) -> list[str]:
    name = posixpath.basename(row["uri"].rstrip("/")) or row["uri"]
    if row["status"] == "ok":
        status = f"ok, {len(row['keypoints_xy'] or [])} keypoints"
        score = image_score(row.get("keypoint_spread_px"))
        return [name, status if np.isnan(score) else f"{status}, median spread {score:.1f} px"]
    return [name, f"error: {row['error_cause']}"]


def _spread_circles(picture: Image.Image, points_xy: np.ndarray, spreads, original_size) -> Image.Image:
    """``picture`` with a circle (an ellipse where rounding made the scales differ) around each keypoint
    (x, y) in original pixels, of its spread's radius, in its colour."""
    picture = picture.copy()
    draw = ImageDraw.Draw(picture)
    scale = np.asarray(picture.size, dtype=np.float64) / np.asarray(original_size, dtype=np.float64)
    width = max(2, round(min(picture.size) / 200))
    for (x, y), spread, colour in zip(points_xy, spreads, keypoint_colours(len(points_xy))):
        if spread is None or not np.isfinite([x, y, spread]).all():
            continue
        (cx, cy), (rx, ry) = np.array([x, y]) * scale - 0.5, spread * scale  # PIL indexes pixels, centres at +0.5
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=colour, width=width)
    return picture


def _fit(image: Image.Image, longest: int) -> Image.Image:
    """``image`` scaled (up or down) so that its longest side is ``longest`` pixels, aspect kept."""
    scale = longest / max(image.size)
    size = tuple(max(1, int(round(side * scale))) for side in image.size)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def _error_panel(cause: str, message: str, display_size: int, font_size: int) -> Image.Image:
    """A grey 4:3 panel with the error's cause above its message."""
    lines = [f"error: {cause}", "", message]
    size = (display_size, display_size * 3 // 4)
    return text_panel(*size, lines, font_size=font_size, background=_ERROR_GREY, colour=(255, 255, 255))


def _write_png(uri: str, picture: Image.Image) -> None:
    with fsspec.open(uri, "wb", auto_mkdir=True) as f:
        picture.save(f, format="PNG")
