"""Reading images from any fsspec filesystem, with clear per-image errors.

Every decoded image is a numpy uint8 array [H, W, 3] (RGB, row-major, EXIF
orientation applied); ``to_tensor`` turns it into float32 [3, H, W] in [0, 1].
URIs are local paths or fsspec URLs (``file://``, ``s3://``, ``gs://``,
``memory://`` ...).
"""

from __future__ import annotations

import io
import os
import posixpath
import warnings
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "decode_image",
    "read_image",
    "to_tensor",
    "resize_batch",
    "list_images",
    "ImageSource",
    "list_sources",
    "read_source",
    "absolute_source",
    "crop_image",
    "apply_mask",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
MANIFEST_EXTENSIONS: frozenset[str] = frozenset({".txt", ".csv", ".parquet"})
DEFAULT_MAX_PIXELS = 100_000_000

_ADVICE = {
    "not_found": "check the path or URL (and credentials for remote storage)",
    "empty": "the file has 0 bytes; re-upload or remove it",
    "truncated": "the file is cut short or corrupt; re-download or remove it",
    "not_an_image": "the bytes are not an image format Pillow can read; remove it or fix its contents",
    "too_large": "raise max_pixels if the image is trusted, or downscale it first",
    "unsupported_mode": "convert the image to RGB with another tool first",
}

# Leading bytes of formats we read; used to tell a truncated header from a non-image.
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")


def _looks_like_image(data: bytes) -> bool:
    if data.startswith(_MAGIC):
        return True
    if data.startswith(b"BM"):  # BMP: reserved header bytes 6..10 are zero
        return len(data) < 10 or data[6:10] == b"\x00" * 4
    if data.startswith(b"RIFF"):  # WebP, not WAV/AVI
        return len(data) < 12 or data[8:12] == b"WEBP"
    return False


class ImageReadError(ValueError):
    """An image could not be read.

    Attributes: ``uri`` (where it came from) and ``cause``, one of "not_found",
    "empty", "truncated", "not_an_image", "too_large", "unsupported_mode".
    """

    def __init__(self, uri: str, cause: str, detail: str = "") -> None:
        self.uri = uri
        self.cause = cause
        self.detail = detail
        text = f"cannot read image {uri!r} ({cause})"
        if detail:
            text += f": {detail}"
        advice = _ADVICE.get(cause)
        if advice:
            text += f"; {advice}"
        super().__init__(text)

    def __reduce__(self):  # keeps the attributes when pickled across processes (Ray workers)
        return (type(self), (self.uri, self.cause, self.detail))


def decode_image(data: bytes, *, uri: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to uint8 [H, W, 3] RGB.

    The image is fully loaded (a truncated file fails here, not later), EXIF
    orientation is applied, and every mode is converted to RGB: transparency is
    composited onto white; 16-bit / 32-bit integer gray ("I;16*", "I") is
    scaled from 0..65535 to 0..255; float gray ("F") is taken as 0..1 when it
    lies in [0, 1], as 0..255 when it lies there, else min-max scaled.
    Images with more than ``max_pixels`` pixels are refused before decoding.
    Raises ImageReadError (with ``cause``) on any failure.
    """
    if not data:
        raise ImageReadError(uri, "empty")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rgb = _decode(data, uri, max_pixels)
    # Pillow's warnings (e.g. corrupt EXIF) come back naming the image; on failure the error says enough
    for w in caught:
        if not issubclass(w.category, Image.DecompressionBombWarning):  # max_pixels is enforced instead
            warnings.warn(f"{uri}: {w.message}", w.category, stacklevel=2)
    return rgb


def _decode(data: bytes, uri: str, max_pixels: int) -> np.ndarray:
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        detail = f"{e} (Pillow's own limit, PIL.Image.MAX_IMAGE_PIXELS, applies too)"
        raise ImageReadError(uri, "too_large", detail) from e
    except UnidentifiedImageError as e:
        if _looks_like_image(data):
            raise ImageReadError(uri, "truncated", "the header is incomplete") from e
        raise ImageReadError(uri, "not_an_image", f"{len(data)} bytes starting {data[:8]!r}") from e
    except Exception as e:  # Pillow raises assorted errors for damaged headers
        raise ImageReadError(uri, "truncated", f"{type(e).__name__}: {e}") from e

    with im:
        width, height = im.size
        if width * height > max_pixels:
            detail = f"{width}x{height} = {width * height} pixels > max_pixels={max_pixels}"
            raise ImageReadError(uri, "too_large", detail)
        try:
            im.load()
        except Exception as e:  # OSError("image file is truncated"), SyntaxError, zlib/struct errors ...
            raise ImageReadError(uri, "truncated", f"{type(e).__name__}: {e}") from e
        return _to_rgb_array(_exif_transpose(im), uri)


def read_image(uri: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode one image from a local path or fsspec URL to uint8 [H, W, 3] RGB."""
    uri = os.fspath(uri)
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise ImageReadError(uri, "not_found") from e
    except IsADirectoryError as e:
        raise ImageReadError(uri, "not_found", "it is a directory, not a file") from e
    return decode_image(data, uri=uri, max_pixels=max_pixels)


def join_uri(base: str, name: str) -> str:
    """``base/name`` for a local folder or an fsspec URL (``s3://bucket/prefix``)."""
    return f"{base.rstrip('/')}/{name}" if "://" in base else os.path.join(base, name)


def absolute_uri(location: str) -> str:
    """A local path made absolute (Ray workers run in folders of their own); URLs unchanged."""
    return location if "://" in location else os.path.abspath(location)


def absolute_source(source: ImageSource) -> ImageSource:
    """The source with its local paths made absolute (see ``absolute_uri``)."""
    mask = absolute_uri(source.mask_uri) if source.mask_uri else None
    return ImageSource(absolute_uri(source.uri), source.crop_box, mask)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 tensor [3, H, W] in [0, 1]."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 array [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    array = np.ascontiguousarray(image)
    if not array.flags.writeable:
        array = array.copy()  # torch.from_numpy warns on read-only memory
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float [B, 3, H, W] to [B, 3, size, size] (bilinear, antialiased, aspect not kept).

    Pixel centres map to pixel centres (align_corners=False), so normalised
    (y, x) keypoints are unchanged by the resize. Returns the input itself when
    it already has that size.
    """
    if images.ndim != 4:
        raise ValueError(f"expected a batch [B, C, H, W], got shape {tuple(images.shape)}")
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@dataclass(frozen=True)
class ImageSource:
    """Where one model input comes from: an image, optionally multiplied by a foreground mask, then cropped.

    ``crop_box`` is (left, top, right, bottom) in the image's pixels, right and
    bottom exclusive; it may reach outside the image, which is filled black.
    """

    uri: str
    crop_box: tuple[int, int, int, int] | None = None
    mask_uri: str | None = None


def list_images(location: str | os.PathLike) -> list[str]:
    """URIs of the images at ``location``; see ``list_sources`` for what a location may be."""
    return [source.uri for source in list_sources(location)]


def list_sources(location: str | os.PathLike, *, split: str | None = None) -> list[ImageSource]:
    """The images at ``location``, with any crop box and mask a manifest gives them.

    ``location`` is one of:
    - a folder (local or fsspec URL prefix): every file with an image extension
      (png, jpg, jpeg, bmp, gif, tif, tiff, webp; any case) below it,
      recursively, sorted; hidden files (name starting with ".", e.g. macOS
      "._x.png" resource forks) are skipped;
    - a glob pattern (contains ``*``, ``?`` or ``[``): matching image files, sorted;
    - a manifest: ``.txt`` (one URI per line; blank lines and ``#`` comments
      skipped) or ``.csv`` / ``.parquet`` with a ``uri`` column; entries are
      returned in manifest order, relative ones resolved against the
      manifest's folder. Optional columns: ``mask_uri`` and (Parquet)
      ``crop_box`` (see ``ImageSource``), ``split`` (``split=`` keeps only
      the rows of that split; the dataset manifests of ``skp_ray.datasets``
      have all of them);
    - a single image file: returned as a one-element list.
    Remote URIs keep their protocol. Raises ValueError when the location does
    not exist or yields no images.
    """
    location = os.fspath(location)
    fs, path = fsspec.core.url_to_fs(location)
    local = _is_local(fs)
    extension = posixpath.splitext(path)[1].lower()

    if any(ch in path for ch in "*?["):
        found = sorted(p for p in fs.glob(path) if _is_image_name(p) and fs.isfile(p))
        sources = [ImageSource(_uri(fs, p, local)) for p in found]
    elif extension in MANIFEST_EXTENSIONS and fs.isfile(path):
        sources = _read_manifest(fs, path, local, location, split)
    elif fs.isdir(path):
        found = sorted(p for p in fs.find(path) if _is_image_name(p))
        sources = [ImageSource(_uri(fs, p, local)) for p in found]
    elif fs.isfile(path) and _is_image_name(path):
        sources = [ImageSource(location)]
    elif fs.exists(path):
        raise ValueError(
            f"{location!r} is neither a folder, an image ({_extensions()}) nor a manifest (.txt, .csv, .parquet)"
        )
    else:
        raise ValueError(
            f"{location!r} does not exist; expected a folder of images, a glob pattern, "
            "or a manifest file (.txt, .csv, .parquet)"
        )
    if not sources:
        wanted = f" in split {split!r}" if split else ""
        raise ValueError(
            f"no images found at {location!r}{wanted}; expected files ending in {_extensions()} or manifest entries"
        )
    return sources


def read_source(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """The model's view of one source (masked, then cropped), uint8 [h, w, 3], and the image's (height, width)."""
    image = read_image(source.uri, max_pixels=max_pixels)
    size = image.shape[:2]
    if source.mask_uri is not None:
        image = apply_mask(image, read_image(source.mask_uri, max_pixels=max_pixels))
    if source.crop_box is not None:
        image = crop_image(image, source.crop_box)
    return image, size


def crop_image(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """``image[top:bottom, left:right]`` of uint8 [H, W, C], black where the box leaves the image."""
    left, top, right, bottom = (int(v) for v in box)
    if right <= left or bottom <= top:
        raise ValueError(f"crop box {box} is empty; expected (left, top, right, bottom) with right > left, bottom > top")
    height, width = image.shape[:2]
    out = np.zeros((bottom - top, right - left) + image.shape[2:], dtype=image.dtype)
    y0, y1, x0, x1 = max(top, 0), min(bottom, height), max(left, 0), min(right, width)
    if y1 > y0 and x1 > x0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
    return out


def apply_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image times a foreground mask (its first channel; 0..1 or 0..255), resized to the image if needed."""
    weights = mask[..., 0] if mask.ndim == 3 else mask
    if weights.shape != image.shape[:2]:
        resized = Image.fromarray(weights).resize((image.shape[1], image.shape[0]), Image.BILINEAR)
        weights = np.asarray(resized)
    weights = weights.astype(np.float32)
    if weights.max() > 1:
        weights /= 255.0
    return np.clip(np.rint(image * weights[..., None]), 0, 255).astype(np.uint8)


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF should not lose an otherwise good image
        return im


def _to_rgb_array(im: Image.Image, uri: str) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        return _gray_to_rgb(_scale_gray(np.asarray(im), mode))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    try:
        if has_alpha:
            return _composite_on_white(np.asarray(im.convert("RGBA")))
        return np.array(im.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as e:
        raise ImageReadError(uri, "unsupported_mode", f"mode {mode!r}: {e}") from e


def _scale_gray(values: np.ndarray, mode: str) -> np.ndarray:
    """Integer gray 0..65535 or float gray -> uint8 [H, W]."""
    v = values.astype(np.float64)
    if mode == "F":
        v = np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            v = v * 255.0
        elif lo < 0.0 or hi > 255.0:
            v = (v - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(v)
    else:
        v = v * (255.0 / 65535.0)
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    out = rgb * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _is_image_name(path: str) -> bool:
    name = posixpath.basename(path)
    return not name.startswith(".") and posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _uri(fs: fsspec.AbstractFileSystem, path: str, local: bool) -> str:
    return path if local else fs.unstrip_protocol(path)


def _extensions() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))


def _read_manifest(
    fs: fsspec.AbstractFileSystem, path: str, local: bool, location: str, split: str | None
) -> list[ImageSource]:
    extension = posixpath.splitext(path)[1].lower()
    folder = posixpath.dirname(path)
    if extension == ".txt":
        if split is not None:
            raise ValueError(f"manifest {location!r} is a list of URIs without splits; drop split={split!r}")
        with fs.open(path, "r", encoding="utf-8") as f:
            entries = [line.strip() for line in f]
        return [ImageSource(_resolve(fs, folder, e, local)) for e in entries if e and not e.startswith("#")]
    table = _read_table(fs, path, extension)
    if "uri" not in table.column_names:
        raise ValueError(f"manifest {location!r} has no 'uri' column (columns: {table.column_names})")
    rows = table.to_pylist()
    if split is not None:
        if "split" not in table.column_names:
            raise ValueError(f"manifest {location!r} has no 'split' column to pick split {split!r} from")
        rows = [row for row in rows if row["split"] == split]
    sources = []
    for row in rows:
        uri = str(row["uri"] or "").strip()
        if not uri:
            continue
        mask = row.get("mask_uri")
        box = row.get("crop_box")
        sources.append(
            ImageSource(
                _resolve(fs, folder, uri, local),
                crop_box=tuple(int(v) for v in box) if box is not None else None,
                mask_uri=_resolve(fs, folder, mask, local) if mask else None,
            )
        )
    return sources


def _read_table(fs: fsspec.AbstractFileSystem, path: str, extension: str):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        if extension == ".csv":
            # uri stays a string column even if every entry looks like a number
            options = pacsv.ConvertOptions(column_types={"uri": "string", "mask_uri": "string"})
            return pacsv.read_csv(f, convert_options=options)
        return pq.read_table(f)


def _resolve(fs: fsspec.AbstractFileSystem, folder: str, entry: str, local: bool) -> str:
    """A manifest entry as a URI: URLs as they are, relative paths against the manifest's folder."""
    if "://" in entry:
        return entry
    if local:
        return os.path.normpath(os.path.join(folder, os.path.expanduser(entry)))
    joined = entry if entry.startswith("/") else posixpath.normpath(posixpath.join(folder, entry))
    return fs.unstrip_protocol(joined)
