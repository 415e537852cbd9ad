"""Reading images from any fsspec filesystem, with clear per-image errors.

Every decoded image is a numpy uint8 array [H, W, 3] (RGB, row-major, EXIF
orientation applied); ``to_tensor`` turns it into float32 [3, H, W] in [0, 1].
URIs are local paths or fsspec URLs (``file://``, ``s3://``, ``gs://``,
``memory://`` ...).

torch is imported where pixels become tensors, not with the module: jobs'
drivers and Ray Data's listing tasks use this module without ever needing it
(importing it takes about 2 s of a process's start on 2 cores).
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

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
    "load_source",
    "LoadedImage",
    "absolute_source",
    "crop_image",
    "content_hash",
    "ALPHA_MODES",
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
    "permission_denied": "check the credentials (AWS_*, GOOGLE_APPLICATION_CREDENTIALS) and the object's permissions",
    "storage_error": "the store failed after its own retries; rerun later (only images without a row are read again)",
    "unsupported_scheme": "use a local path, file://, s3:// or gs:// (install s3fs or gcsfs for the object stores)",
    "bad_crop": "fix the manifest's crop_box: (left, top, right, bottom) with right > left and bottom > top",
    "bad_mask": "the mask must have the image's aspect ratio (same size, or a scaled copy)",
    "decoder_crash": "the decoder failed on these bytes; re-encode the image with another tool or remove it",
}

# What decode_image does with transparency: "white" composites onto white (what a viewer shows),
# "drop" discards the alpha channel as the published loaders do (PIL's convert("RGB")).
ALPHA_MODES = ("white", "drop")
_PILLOW_LIMIT = threading.Lock()  # decode_image swaps Pillow's own pixel limit for max_pixels

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
    "empty", "truncated", "not_an_image", "too_large", "unsupported_mode",
    "permission_denied", "storage_error", "unsupported_scheme", "bad_crop",
    "bad_mask", "decoder_crash".
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


def decode_image(
    data: bytes, *, uri: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS, alpha: str = "white"
) -> np.ndarray:
    """Decode image bytes to uint8 [H, W, 3] RGB.

    The image is fully loaded (a truncated file fails here, not later), EXIF
    orientation is applied, and every mode is converted to RGB: transparency is
    composited onto white (``alpha="white"``) or dropped (``alpha="drop"``, as
    the published loaders do); 16-bit / 32-bit integer gray ("I;16*", "I") is
    scaled from 0..65535 to 0..255; float gray ("F") is taken as 0..1 when it
    lies in [0, 1], as 0..255 when it lies there, else min-max scaled.
    Images with more than ``max_pixels`` pixels are refused before decoding;
    ``max_pixels`` is the only limit (Pillow's own is lifted to it).
    Raises ImageReadError (with ``cause``) on any failure.
    """
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha={alpha!r} is not one of {ALPHA_MODES}")
    if not data:
        raise ImageReadError(uri, "empty")
    with warnings.catch_warnings(record=True) as caught, _PILLOW_LIMIT:
        warnings.simplefilter("always")
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # max_pixels is checked before loading
        try:
            rgb = _decode(data, uri, max_pixels, alpha)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    # Pillow's warnings (e.g. corrupt EXIF) come back naming the image; on failure the error says enough
    for w in caught:
        if not issubclass(w.category, Image.DecompressionBombWarning):  # max_pixels is enforced instead
            warnings.warn(f"{uri}: {w.message}", w.category, stacklevel=2)
    return rgb


def _decode(data: bytes, uri: str, max_pixels: int, alpha: str) -> np.ndarray:
    try:
        im = Image.open(io.BytesIO(data))
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
        try:
            return _to_rgb_array(_exif_transpose(im), uri, alpha)
        except ImageReadError:
            raise
        except Exception as e:  # a decoder bug on odd bytes must cost this image only
            raise ImageReadError(uri, "decoder_crash", f"{type(e).__name__}: {e}") from e


def read_image(uri: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, alpha: str = "white") -> np.ndarray:
    """Read and decode one image from a local path or fsspec URL to uint8 [H, W, 3] RGB."""
    uri = os.fspath(uri)
    return decode_image(read_bytes(uri), uri=uri, max_pixels=max_pixels, alpha=alpha)


def read_bytes(uri: str) -> bytes:
    """The bytes at a local path or fsspec URL; every failure is an ImageReadError naming the URI."""
    try:
        with fsspec.open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise ImageReadError(uri, "not_found") from e
    except IsADirectoryError as e:
        raise ImageReadError(uri, "not_found", "it is a directory, not a file") from e
    except PermissionError as e:
        raise ImageReadError(uri, "permission_denied", _first_line(e)) from e
    except ImportError as e:  # fsspec knows the protocol, but its package (s3fs, gcsfs, ...) is missing
        raise ImageReadError(uri, "unsupported_scheme", _first_line(e)) from e
    except ValueError as e:
        if "protocol" in str(e).lower():  # fsspec: "Protocol not known: ..."
            raise ImageReadError(uri, "unsupported_scheme", _first_line(e)) from e
        raise ImageReadError(uri, "storage_error", _first_line(e)) from e
    except Exception as e:  # credentials, throttling after the store's retries, network ...
        if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
            raise ImageReadError(uri, "permission_denied", _first_line(e)) from e
        raise ImageReadError(uri, "storage_error", _first_line(e)) from e


def _first_line(error: Exception) -> str:
    """An error's type and first line: store errors can carry long request dumps."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


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
    import torch

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 array [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    array = np.ascontiguousarray(image)
    if not array.flags.writeable:
        array = array.copy()  # torch.from_numpy warns on read-only memory
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def resize_batch(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize float [B, C, H, W] in [0, 1] to [B, C, size, size] (or ``size`` = (height, width)):
    bilinear, antialiased, aspect not kept, clamped back to [0, 1].

    Pixel centres map to pixel centres (align_corners=False), so normalised
    (y, x) keypoints are unchanged by the resize. The antialiasing filter can
    overshoot [0, 1] by a rounding error on saturated pixels, hence the clamp;
    every path into the model resizes here. Returns the input itself when it
    already has that size.
    """
    if images.ndim != 4:
        raise ValueError(f"expected a batch [B, C, H, W], got shape {tuple(images.shape)}")
    height, width = (size, size) if isinstance(size, int) else size
    if tuple(images.shape[-2:]) == (height, width):
        return images
    import torch.nn.functional as F

    resized = F.interpolate(images, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return resized.clamp_(0.0, 1.0)


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
    local = is_local_filesystem(fs)
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


@dataclass(frozen=True)
class LoadedImage:
    """One source as the model sees it, and what the rows record about it."""

    pixels: torch.Tensor  # float [3, h, w] in [0, 1]: the crop (or the image), resized if asked, masked
    height: int  # the whole image's size in pixels
    width: int
    frame: tuple[int, int, int, int]  # (left, top, right, bottom) of what the model sees, in image pixels
    content_hash: str  # of the decoded image: byte-identical files share it

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) of what the model sees, before any resize."""
        left, top, right, bottom = self.frame
        return bottom - top, right - left


def load_source(
    source: ImageSource,
    *,
    size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    alpha: str = "white",
) -> LoadedImage:
    """Read one source: decode, crop, resize to ``size`` x ``size`` (when given), then multiply by the mask.

    The mask is resized to the picture's final size and multiplied there, as
    the published Human3.6M loader does at 512. Every failure, the crop box's
    and the mask's included, is an ImageReadError naming the image.
    """
    image = read_image(source.uri, max_pixels=max_pixels, alpha=alpha)
    height, width = image.shape[:2]
    view = image
    if source.crop_box is not None:
        view = crop_image(image, source.crop_box, uri=source.uri)
    pixels = to_tensor(view)
    if size is not None:
        pixels = resize_batch(pixels[None], size)[0]
    if source.mask_uri is not None:
        mask = _read_mask(source, (height, width), max_pixels)
        pixels = pixels * resize_batch(mask[None, None], tuple(pixels.shape[-2:]))[0]
    frame = tuple(int(v) for v in source.crop_box) if source.crop_box is not None else (0, 0, width, height)
    return LoadedImage(pixels, height, width, frame, content_hash(image))


def content_hash(image: np.ndarray) -> str:
    """sha256 of a decoded image's shape and pixels (uint8 [H, W, 3]), as hex."""
    digest = hashlib.sha256(repr(tuple(image.shape)).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def crop_image(image: np.ndarray, box: tuple[int, int, int, int], *, uri: str = "<image>") -> np.ndarray:
    """``image[top:bottom, left:right]`` of uint8 [H, W, C], black where the box leaves the image."""
    left, top, right, bottom = (int(v) for v in box)
    if right <= left or bottom <= top:
        detail = f"crop box {tuple(box)} is {'empty' if (right, bottom) == (left, top) else 'empty or inverted'}"
        raise ImageReadError(uri, "bad_crop", detail)
    height, width = image.shape[:2]
    out = np.zeros((bottom - top, right - left) + image.shape[2:], dtype=image.dtype)
    y0, y1, x0, x1 = max(top, 0), min(bottom, height), max(left, 0), min(right, width)
    if y1 > y0 and x1 > x0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
    return out


def _read_mask(source: ImageSource, image_size: tuple[int, int], max_pixels: int) -> torch.Tensor:
    """The source's foreground mask as float [h, w] in [0, 1] over the model's view (the crop, if any).

    The first channel is used; 0..1 and 0..255 masks are both accepted. A mask
    of another size must be a scaled copy (same aspect ratio within 1 %); it
    is resized to the image before cropping.
    """
    try:
        mask = read_image(source.mask_uri, max_pixels=max_pixels)[..., 0]
    except ImageReadError as error:
        raise ImageReadError(source.uri, "bad_mask", f"its mask cannot be read: {error}") from error
    height, width = image_size
    mask_height, mask_width = mask.shape
    if abs(mask_width * height - width * mask_height) > 0.01 * width * mask_height:
        detail = f"mask {source.mask_uri!r} is {mask_width}x{mask_height}, the image {width}x{height}"
        raise ImageReadError(source.uri, "bad_mask", detail)
    import torch

    weights = torch.from_numpy(mask.astype(np.float32))
    if weights.max() > 1:
        weights /= 255.0
    if source.crop_box is None:
        return weights
    if (mask_height, mask_width) != (height, width):
        weights = resize_batch(weights[None, None], (height, width))[0, 0]
    box = source.crop_box
    return torch.from_numpy(crop_image(weights.numpy()[..., None], box, uri=source.uri)[..., 0])


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF should not lose an otherwise good image
        return im


def _to_rgb_array(im: Image.Image, uri: str, alpha: str) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        return _gray_to_rgb(_scale_gray(np.asarray(im), mode))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    try:
        if has_alpha and alpha == "white":
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


def is_local_filesystem(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether an fsspec filesystem is the local disk."""
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


# --- batches of sources, as Ray Data's map_batches hands them over ------------------------------------


def source_item(source: ImageSource) -> dict:
    """One source as a row of plain columns for Ray Data (``decode_batch`` reads them back).

    Plain columns only (no nulls, no ragged lists), so Ray Data never falls back to pickling:
    no crop is has_crop False, no mask "".
    """
    return {
        "uri": source.uri,
        "crop_box": np.asarray(source.crop_box or (0, 0, 0, 0), dtype=np.int64),
        "has_crop": source.crop_box is not None,
        "mask_uri": source.mask_uri or "",
    }


def decode_batch(
    batch: dict[str, np.ndarray], size: int, max_pixels: int, alpha: str, *, uint8: bool = False
) -> dict[str, np.ndarray]:
    """Load each row's source (``source_item`` columns) to float [3, size, size]; any failure becomes an
    error row (``error_cause``, ``error``). Other columns pass through. ``frame`` is the (left, top, right,
    bottom) of what the model sees, in image pixels; ``width`` and ``height`` are the whole image's.

    ``uint8=True``: the pixels as uint8 [3, size, size] instead (``pixels_to_uint8``), a quarter of the
    bytes to move; ``pixels_from_uint8`` turns them back into float within 0.5 / 255."""
    count = len(batch["uri"])
    pixels = np.zeros((count, 3, size, size), dtype=np.uint8 if uint8 else np.float32)
    width, height = np.zeros(count, dtype=np.int32), np.zeros(count, dtype=np.int32)
    frame = np.zeros((count, 4), dtype=np.float32)
    digest, cause, message = [""] * count, [""] * count, [""] * count
    for i, uri in enumerate(batch["uri"]):
        box = tuple(int(v) for v in batch["crop_box"][i]) if batch["has_crop"][i] else None
        source = ImageSource(uri, box, batch["mask_uri"][i] or None)
        try:
            loaded = load_source(source, size=size, max_pixels=max_pixels, alpha=alpha)
        except ImageReadError as error:
            cause[i], message[i] = error.cause, str(error)
            continue
        except Exception as error:  # one image's surprise must not stop the run
            cause[i], message[i] = "read_failed", f"cannot read image {uri!r}: {type(error).__name__}: {error}"
            continue
        width[i], height[i], digest[i] = loaded.width, loaded.height, loaded.content_hash
        frame[i] = loaded.frame
        pixels[i] = pixels_to_uint8(loaded.pixels) if uint8 else loaded.pixels.numpy()
    return {
        **batch,
        "pixels": pixels,
        "width": width,
        "height": height,
        "frame": frame,
        "content_hash": np.array(digest, dtype=object),
        "error_cause": np.array(cause, dtype=object),
        "error": np.array(message, dtype=object),
    }


class ImageDecoder:
    """``decode_batch`` (pixels as uint8) as a Ray Data actor, for the stages that decode ahead of model-holding
    actors, in processes that live for the run. Decoding tasks would not: on a small node Ray ends a task
    worker that idles a second, and the next batch waited ~2 s for a new one to import torch (measured on 2
    cores: a new decoding process every ~6 batches, the model's actor stalled each time)."""

    def __init__(self, size: int, max_pixels: int, alpha: str):
        self.options = {"size": size, "max_pixels": max_pixels, "alpha": alpha, "uint8": True}

    def __call__(self, batch: dict) -> dict:
        return decode_batch(batch, **self.options)


def pixels_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Float pixels in [0, 1] -> uint8, rounded to the nearest k / 255 (at most 0.5 / 255 off). Pixels that
    are already k / 255 (an image neither resized nor masked) come back exactly from ``pixels_from_uint8``."""
    return pixels.mul(255.0).round_().clamp_(0, 255).byte().numpy()


def pixels_from_uint8(pixels: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1] on ``device`` (moved as uint8, divided there), as ``to_tensor`` does."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels (decode_batch(..., uint8=True)), got {pixels.dtype}")
    import torch

    return torch.from_numpy(np.array(pixels)).to(device).float().div_(255.0)  # a copy: Ray's are read-only
