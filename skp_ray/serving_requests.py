"""What a keypoint request may hold, and why one is refused: reading, limits, parameters, decoding.

Everything here runs before a request joins a batch, so a bad request is
answered on its own (a 4xx JSON error naming the problem) and never reaches
detection. The image is decoded by ``skp_ray.images.decode_image``, the reader
labelling uses, with the same ``max_pixels`` and ``alpha`` rules.

Errors are ``{"error": {"code": ..., "message": ...}}``:

====== ===================================================================
status codes
====== ===================================================================
400    ``no_image`` (no body, no ``image`` part), ``bad_multipart``, and the
       decoder's causes: ``empty``, ``not_an_image``, ``truncated``,
       ``unsupported_mode``, ``decoder_crash``
401    ``unauthorized``: the bearer token is missing or wrong
413    ``upload_too_large`` (more bytes than ``max_upload_bytes``) and
       ``too_large`` (more pixels than ``max_pixels``): every size limit
422    ``unknown_parameter``, ``invalid_parameter`` (a value out of range, or
       a parameter given twice)
====== ===================================================================
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request

from skp_ray.images import ImageReadError, content_hash, decode_image, pixels_to_uint8, resize_batch, to_tensor

# The multipart field that carries the image.
IMAGE_FIELD = "image"
FORMATS = ("json", "png")
MAX_SEED = 2**63 - 1


class RequestRefused(Exception):
    """A request answered with ``status`` and the JSON error ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and the defaults of what it does not ask for."""

    max_upload_bytes: int
    max_pixels: int
    max_augmentation_iterations: int
    augmentation_iterations: int
    seed: int
    alpha: str
    image_size: int  # the model's input side


@dataclass(frozen=True)
class Parameters:
    augmentation_iterations: int
    seed: int
    format: str  # "json" or "png"


@dataclass(frozen=True)
class DecodedImage:
    """An upload as detection and the response need it."""

    rgb: np.ndarray  # uint8 [H, W, 3], EXIF orientation applied
    pixels: np.ndarray  # uint8 [3, S, S], resized to the model's side and rounded as labelling's transport does
    content_hash: str  # of the decoded pixels: keys the augmentations, as in labelling

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


def token_digest(token: str) -> str:
    """What replicas keep of the bearer token: its sha256 (the token itself never leaves the driver)."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_bearer(authorization: str | None, digest: str | None) -> None:
    """Refuse (401) unless ``Authorization: Bearer <token>`` matches ``digest``; no digest: no token needed."""
    if digest is None:
        return
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        message = "this API needs a token: send the header 'Authorization: Bearer <token>'"
        raise RequestRefused(401, "unauthorized", message)
    if not hmac.compare_digest(token_digest(presented.strip()), digest):
        raise RequestRefused(401, "unauthorized", "the bearer token is wrong")


async def read_request(request: Request, limits: Limits) -> tuple[bytes, str, list[tuple[str, str]]]:
    """The image bytes, a name for them, and every (parameter, value) of the query string and the form.

    The image is the raw body, or the ``image`` part of a multipart form. The
    body is read at most ``max_upload_bytes`` far (a larger Content-Length is
    refused before reading).
    """
    body = await _read_body(request, limits.max_upload_bytes)
    fields = list(request.query_params.multi_items())
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        if not body:
            raise RequestRefused(400, "no_image", _NO_IMAGE)
        return body, "the request body", fields
    data, name, form_fields = await _read_form(request, body)
    return data, name, fields + form_fields


_NO_IMAGE = (
    f"the request has no image: send it as the body (curl --data-binary @photo.jpg) "
    f"or as the multipart field '{IMAGE_FIELD}' (curl -F {IMAGE_FIELD}=@photo.jpg)"
)


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if re.fullmatch(r"[0-9]{1,30}", declared) and int(declared) > max_bytes:
        raise _too_many_bytes(f"{int(declared)} bytes", max_bytes)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise _too_many_bytes(f"more than {max_bytes} bytes", max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_many_bytes(size: str, max_bytes: int) -> RequestRefused:
    message = f"the upload has {size}; this server takes at most {max_bytes} bytes (max_upload_bytes)"
    return RequestRefused(413, "upload_too_large", message)


async def _read_form(request: Request, body: bytes) -> tuple[bytes, str, list[tuple[str, str]]]:
    """The image part and the other fields of a multipart body that has been read already."""

    async def replay():  # the body was consumed under the byte limit; the form parser reads it again
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
    except Exception as error:  # Starlette raises its HTTPException or the parser's own errors
        detail = getattr(error, "detail", None) or str(error)
        raise RequestRefused(400, "bad_multipart", f"the multipart form cannot be read: {detail}") from None
    images, fields = [], []
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != IMAGE_FIELD:
                message = f"unknown file field {key!r}; send the image as {IMAGE_FIELD!r}"
                raise RequestRefused(422, "unknown_parameter", message)
            images.append(value)
        else:
            fields.append((key, value))
    if not images:
        raise RequestRefused(400, "no_image", _NO_IMAGE)
    if len(images) > 1:
        message = f"one image per request; this one has {len(images)} {IMAGE_FIELD!r} parts"
        raise RequestRefused(422, "invalid_parameter", message)
    name = f"the upload {images[0].filename!r}" if images[0].filename else "the uploaded image"
    return await images[0].read(), name, fields


def parse_parameters(fields: list[tuple[str, str]], limits: Limits) -> Parameters:
    """The request's parameters, each checked; the server's defaults for those not given."""
    known = ("augmentation_iterations", "seed", "format")
    given: dict[str, str] = {}
    for key, value in fields:
        if key not in known:
            raise RequestRefused(422, "unknown_parameter", f"unknown parameter {key!r}; known: {', '.join(known)}")
        if key in given:
            raise RequestRefused(422, "invalid_parameter", f"parameter {key!r} is given twice")
        given[key] = value
    iterations = _whole_number(
        given, "augmentation_iterations", limits.augmentation_iterations, 1, limits.max_augmentation_iterations
    )
    seed = _whole_number(given, "seed", limits.seed, 0, MAX_SEED)
    answer = given.get("format", "json").strip().lower()
    if answer not in FORMATS:
        message = f"format must be one of {', '.join(FORMATS)}; got {given['format']!r}"
        raise RequestRefused(422, "invalid_parameter", message)
    return Parameters(iterations, seed, answer)


def _whole_number(given: dict[str, str], key: str, default: int, low: int, high: int) -> int:
    if key not in given:
        return default
    text = given[key].strip()
    if not (re.fullmatch(r"[0-9]{1,20}", text) and low <= int(text) <= high):
        message = f"{key} must be a whole number from {low} to {high}; got {given[key]!r}"
        raise RequestRefused(422, "invalid_parameter", message)
    return int(text)


# What the sender of an image that cannot be decoded can do about it, by ImageReadError cause.
_UPLOAD_ADVICE = {
    "empty": "the image has 0 bytes; send the whole file",
    "not_an_image": "send a JPEG, PNG or WebP image (GIF, BMP and TIFF are read too)",
    "truncated": "the image is cut short or corrupt; send the whole file",
    "too_large": "downscale it first",
}


def decode_upload(data: bytes, name: str, limits: Limits) -> DecodedImage:
    """Decode an upload as labelling decodes a file: ``decode_image``, the resize to the model's side, and
    the rounding to uint8 that labelling's transport makes."""
    try:
        rgb = decode_image(data, uri=name, max_pixels=limits.max_pixels, alpha=limits.alpha)
    except ImageReadError as error:
        advice = _UPLOAD_ADVICE.get(error.cause, "convert it to an RGB JPEG or PNG with another tool first")
        message = f"{name} cannot be decoded ({error.cause}{': ' + error.detail if error.detail else ''}); {advice}"
        raise RequestRefused(413 if error.cause == "too_large" else 400, error.cause, message) from None
    pixels = pixels_to_uint8(resize_batch(to_tensor(rgb)[None], limits.image_size)[0])
    return DecodedImage(rgb, pixels, content_hash(rgb))
