"""Online keypoints: a Ray Serve application answering one image at a time, batched across clients.

Each replica loads the model and the artifact once (``skp_ray.serving_detector``, which only the replicas
import: the driver needs neither torch nor diffusers) and answers through FastAPI:

- ``POST /v1/keypoints`` (the image as the raw body or the multipart field
  ``image``; optional ``augmentation_iterations``, ``seed``, ``format=json|png``
  in the query string or the form): the keypoints as JSON, or the image with
  its numbered keypoints drawn (``format=png``);
- ``GET /v1/artifact``: the artifact's id, model, settings and tokens, and the
  server's defaults and limits;
- ``GET /v1/stats``: this replica's counts of requests, batches by size and
  refusals by code;
- ``GET /healthz``: no token needed.

Requests are read, checked and decoded one by one (``skp_ray.serving_requests``:
a bad request is refused on its own), then wait for a ``@serve.batch`` of up
to ``max_batch_size`` requests from any clients. A batch is detected with one
``detect_with_confidence`` call per augmentation count, every image with the
augmentations that ``detection_generator(seed, content_hash)`` draws for it,
so an answer equals labelling's row for the same image and seed whatever it
was batched with.
"""

# No `from __future__ import annotations` here: serve.ingress pickles the endpoints by value, and FastAPI
# must see their annotations (Request) as objects, not names to look up.
import asyncio
import dataclasses
import io
import logging
import os
import signal
import threading
import urllib.request
from collections import Counter
from dataclasses import dataclass

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from ray import serve
from starlette.exceptions import HTTPException

from skp_ray.artifact import check_artifact
from skp_ray.config import checked, option, typed_settings
from skp_ray.images import ALPHA_MODES, DEFAULT_MAX_PIXELS
from skp_ray.model_source import DTYPE_NAMES, check_artifact_model
from skp_ray.plotting import draw_keypoints
from skp_ray.ray_cluster import connect, parse_pool_sizes
from skp_ray.serving_requests import (
    DecodedImage,
    Limits,
    Parameters,
    RequestRefused,
    check_bearer,
    decode_upload,
    parse_parameters,
    read_request,
    token_digest,
)

__all__ = [
    "ServeConfig",
    "KeypointService",
    "build_app",
    "app_from_args",
    "check_settings",
    "deployment_options",
    "keypoint_positions",
    "run_server",
]

logger = logging.getLogger("ray.serve")  # a replica's own log, with Serve's request ids


@dataclass
class ServeConfig:
    artifact: str = option(help="the discovery job's artifact folder or URI")
    model: str | None = option(None, "hub id or folder of the model; default: the artifact's model and revision")
    replicas: str = option("1", "replicas: a fixed number N, or MIN,MAX to autoscale with the load")
    use_gpu: bool = option(False, "one GPU per replica")
    cpus_per_replica: float = option(1.0, "CPUs per replica (decoding and, without --use-gpu, detection)")
    dtype: str = option("float32", "model weights: float32, float16 or bfloat16")
    max_batch_size: int = option(8, "most requests detected together in one batch")
    batch_wait_timeout_s: float = option(0.01, "how long a batch waits for more requests after its first one")
    augmentation_iterations: int = option(10, "test-time augmentations of a request that does not ask (SPEC 1.5)")
    max_augmentation_iterations: int = option(32, "most augmentations a request may ask for")
    seed: int = option(0, "augmentation seed of a request that does not ask (keyed with the image's content)")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "images with more pixels are refused (413 too_large)")
    max_upload_bytes: int = option(20_000_000, "uploads of more bytes are refused (413 upload_too_large)")
    alpha: str = option("white", "transparency: 'white' composites onto white, 'drop' discards it (as labelling)")
    host: str = option("127.0.0.1", "address the HTTP port binds to; 0.0.0.0 opens it to the network")
    port: int = option(8000, "HTTP port")
    token_file: str | None = option(None, "file holding the API's bearer token; default: no token")
    token_env: str | None = option(None, "name of an environment variable holding the API's bearer token")
    name: str = option("skp-keypoints", "the Serve application's name")


@dataclass(frozen=True)
class ServicePlan:
    """What the driver's checks found: the replica counts and the token's digest (never the token)."""

    min_replicas: int
    max_replicas: int
    token_digest: str | None


def check_settings(config: ServeConfig) -> ServicePlan:
    """Refuse, in seconds and before Ray starts, what would make every replica or request fail."""
    problems = _setting_problems(config)
    if problems:
        raise ValueError("invalid serving settings: " + "; ".join(problems))
    low, high = parse_pool_sizes(config.replicas, "--replicas")
    digest = _read_token(config)
    check_artifact_model(check_artifact(config.artifact), config.model)
    return ServicePlan(low, high, token_digest(digest) if digest else None)


def _setting_problems(config: ServeConfig) -> list[str]:
    checks = [
        (config.dtype in DTYPE_NAMES, f"--dtype {config.dtype!r} is not one of {sorted(DTYPE_NAMES)}"),
        (config.alpha in ALPHA_MODES, f"--alpha {config.alpha!r} is not one of {list(ALPHA_MODES)}"),
        (config.max_batch_size >= 1, f"--max_batch_size must be at least 1 (got {config.max_batch_size})"),
        (config.batch_wait_timeout_s >= 0, f"--batch_wait_timeout_s must be >= 0 (got {config.batch_wait_timeout_s})"),
        (
            1 <= config.augmentation_iterations <= config.max_augmentation_iterations,
            "--augmentation_iterations must lie in 1..--max_augmentation_iterations "
            f"(got {config.augmentation_iterations} and {config.max_augmentation_iterations})",
        ),
        (config.seed >= 0, f"--seed must be >= 0 (got {config.seed})"),
        (config.max_pixels >= 1 and config.max_upload_bytes >= 1, "--max_pixels and --max_upload_bytes must be >= 1"),
        (config.cpus_per_replica > 0, f"--cpus_per_replica must be > 0 (got {config.cpus_per_replica})"),
        (1 <= config.port <= 65535, f"--port must lie in 1..65535 (got {config.port})"),
        (bool(config.host.strip()), "--host is empty; give an address such as 127.0.0.1"),
        (not (config.token_file and config.token_env), "give --token_file or --token_env, not both"),
    ]
    return [problem for ok, problem in checks if not ok]


def _read_token(config: ServeConfig) -> str | None:
    """The bearer token from --token_file or --token_env; errors name the source, never the value."""
    if config.token_file:
        try:
            with open(config.token_file, encoding="utf-8") as file:
                token = file.read().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"--token_file {config.token_file!r} cannot be read ({type(error).__name__})") from None
        if not token:
            raise ValueError(f"--token_file {config.token_file!r} is empty; write the token into it")
        return token
    if config.token_env:
        token = os.environ.get(config.token_env, "").strip()
        if not token:
            raise ValueError(f"--token_env {config.token_env}: that environment variable is not set or is empty")
        return token
    return None


# --- the deployment -----------------------------------------------------------------------------

api = FastAPI(title="skp_ray keypoints", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(RequestRefused)
async def _refused(request: Request, refused: RequestRefused) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if refused.status == 401 else None
    return JSONResponse(refused.body(), status_code=refused.status, headers=headers)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Unknown paths and methods answer in the same error shape as everything else."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return JSONResponse({"error": {"code": code, "message": str(error.detail)}}, status_code=error.status_code)


# Everything the deployment's methods use is defined above it: serve.ingress pickles the class as it is
# decorated, before the rest of this module exists.


@dataclass(frozen=True)
class _Job:
    image: DecodedImage
    parameters: Parameters


def keypoint_positions(keypoints_yx: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) [K, 2] in [0, 1] of the image, and in its pixels (pixel i spans [i, i + 1), its centre at
    i + 0.5): labelling's row conventions, computed as labelling does (float32) for a frame that is the
    whole image."""
    normalized = keypoints_yx[:, ::-1].astype(np.float32)
    return normalized, normalized * np.array([width, height], dtype=np.float32)


def _limits(config: ServeConfig, image_size: int) -> Limits:
    return Limits(
        max_upload_bytes=config.max_upload_bytes,
        max_pixels=config.max_pixels,
        max_augmentation_iterations=config.max_augmentation_iterations,
        augmentation_iterations=config.augmentation_iterations,
        seed=config.seed,
        alpha=config.alpha,
        image_size=int(image_size),
    )


@serve.deployment(name="KeypointService")
@serve.ingress(api)
class KeypointService:
    """One replica: the model and the artifact, loaded once, and the endpoints."""

    def __init__(self, config: ServeConfig, token_digest: str | None):
        from skp_ray.serving_detector import ServiceDetector  # torch and diffusers: here, never on the driver

        self.detector = ServiceDetector(config)
        self.artifact, self.model = self.detector.artifact, config.model or self.detector.artifact.model
        self.limits = _limits(config, self.artifact.image_size)
        self.token_digest, self.max_batch_size = token_digest, config.max_batch_size
        self.batch_sizes: Counter[int] = Counter()
        self.refusals: Counter[str] = Counter()
        self._detect_batch.set_max_batch_size(config.max_batch_size)
        self._detect_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    @api.get("/healthz")
    async def health(self) -> dict:
        return {"status": "ok", "artifact_id": self.artifact.id}

    @api.get("/v1/artifact")
    async def describe_artifact(self, request: Request) -> dict:
        self._authorize(request)
        limits = self.limits
        return {
            "artifact_id": self.artifact.id,
            "content_hash": self.artifact.content_hash,
            "model": self.model,
            "revision": self.artifact.revision,
            "token_count": len(self.artifact.token_indices),
            "token_indices": list(self.artifact.token_indices),
            "context_tokens": int(self.artifact.context.shape[0]),
            "image_size": limits.image_size,
            "settings": self.artifact.settings,
            "defaults": {
                "augmentation_iterations": limits.augmentation_iterations,
                "seed": limits.seed,
                "format": "json",
            },
            "limits": {
                "max_augmentation_iterations": limits.max_augmentation_iterations,
                "max_pixels": limits.max_pixels,
                "max_upload_bytes": limits.max_upload_bytes,
                "max_batch_size": self.max_batch_size,
            },
        }

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> dict:
        self._authorize(request)
        return {
            "requests": sum(size * count for size, count in self.batch_sizes.items()),
            "batches": sum(self.batch_sizes.values()),
            "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())},
            "largest_batch": max(self.batch_sizes, default=0),
            "refused": dict(self.refusals),
        }

    @api.post("/v1/keypoints")
    async def keypoints(self, request: Request) -> Response:
        try:
            check_bearer(request.headers.get("authorization"), self.token_digest)
            data, name, fields = await read_request(request, self.limits)
            parameters = parse_parameters(fields, self.limits)
            image = await asyncio.to_thread(decode_upload, data, name, self.limits)
        except RequestRefused as refused:
            self.refusals[refused.code] += 1
            logger.info("refused a request: %d %s", refused.status, refused.code)
            raise
        try:
            detection = await self._detect_batch(_Job(image, parameters))
            if parameters.format == "png":
                return await asyncio.to_thread(self._picture, image, detection)
            return JSONResponse(self._record(image, parameters, detection))
        except Exception as error:  # a bug or a device failure: an error for this request, never a guess
            logger.exception("detection failed")
            message = f"detection failed ({type(error).__name__}); the request can be retried"
            return JSONResponse({"error": {"code": "internal_error", "message": message}}, status_code=500)

    def _authorize(self, request: Request) -> None:
        """The token check of the GET endpoints (``keypoints`` counts its own refusals)."""
        try:
            check_bearer(request.headers.get("authorization"), self.token_digest)
        except RequestRefused:
            self.refusals["unauthorized"] += 1
            raise

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # both set per replica in __init__
    async def _detect_batch(self, jobs: list[_Job]) -> list:
        self.batch_sizes[len(jobs)] += 1
        return await asyncio.to_thread(self.detector.detect, jobs)  # the event loop keeps reading requests meanwhile

    def _record(self, image: DecodedImage, parameters: Parameters, detection) -> dict:
        """The JSON answer to ``detection`` (a ``serving_detector.Detection``), in the labelling rows'
        conventions (see ``keypoint_positions``)."""
        normalized, pixels = keypoint_positions(detection.keypoints_yx, image.width, image.height)
        return {
            "keypoints_xy": pixels.tolist(),
            "keypoints_xy_normalized": normalized.tolist(),
            "peaks": detection.peaks.tolist(),
            "confidence": {
                "keypoint_spread_px": detection.spread_px.tolist(),
                "peak_share": detection.peak_share.tolist(),
            },
            "width": image.width,
            "height": image.height,
            "content_hash": image.content_hash,
            "artifact_id": self.artifact.id,
            "model": self.model,
            "seed": parameters.seed,
            "augmentation_iterations": parameters.augmentation_iterations,
            "batch_size": detection.batch_size,
        }

    def _picture(self, image: DecodedImage, detection) -> Response:
        normalized, _ = keypoint_positions(detection.keypoints_yx, image.width, image.height)
        buffer = io.BytesIO()
        draw_keypoints(Image.fromarray(image.rgb), normalized, order="xy_normalized").save(buffer, format="PNG")
        headers = {"X-Artifact-Id": self.artifact.id, "X-Batch-Size": str(detection.batch_size)}
        return Response(buffer.getvalue(), media_type="image/png", headers=headers)


# --- building and running -------------------------------------------------------------------------


def build_app(config: ServeConfig) -> serve.Application:
    """The Serve application for ``config``, its settings checked first (this needs no Ray)."""
    config = checked(config)
    plan = check_settings(config)
    return KeypointService.options(**deployment_options(config, plan)).bind(config, plan.token_digest)


def deployment_options(config: ServeConfig, plan: ServicePlan) -> dict:
    """Replicas (fixed, or autoscaled between MIN and MAX), their resources, and how many requests each takes."""
    resources = {"num_cpus": config.cpus_per_replica, "num_gpus": 1 if config.use_gpu else 0}
    # One batch runs while the next one fills; Serve requires at least max_batch_size.
    options = dict(max_ongoing_requests=2 * config.max_batch_size, ray_actor_options=resources)
    if plan.min_replicas == plan.max_replicas:
        options["num_replicas"] = plan.min_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": plan.min_replicas,
            "max_replicas": plan.max_replicas,
            "target_ongoing_requests": config.max_batch_size,
        }
    return options


def app_from_args(args: dict) -> serve.Application:
    """The application builder that ``serve deploy`` and a RayService call with the config's ``args``
    (the ``ServeConfig`` options; host and port come from the config's ``http_options`` instead)."""
    origin = "the Serve config's args"
    known = [field.name for field in dataclasses.fields(ServeConfig)]
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ValueError(f"{origin} have unknown option(s) {unknown}; known options: {known}")
    return build_app(ServeConfig(**typed_settings(ServeConfig, dict(args), origin=origin)))


def run_server(config: ServeConfig) -> None:
    """Serve ``config`` on ``http://host:port`` until SIGINT or SIGTERM, then stop cleanly.

    Joins the cluster that ``RAY_ADDRESS`` names (as under ``ray job submit``):
    there, stopping deletes this application only. Otherwise it starts a
    local Ray and shuts Serve and that Ray down at the end.
    """
    config = checked(config)
    app = build_app(config)
    started_ray = _join_or_start_ray()
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(app, name=config.name, route_prefix="/")
        url = f"http://{config.host}:{config.port}"
        _check_reachable(config.host, config.port)
        token = "a bearer token is required" if config.token_file or config.token_env else "no token required"
        endpoints = "POST /v1/keypoints, GET /v1/artifact, /v1/stats, /healthz"
        print(f"[serve] listening on {url} ({endpoints}); {token}", flush=True)
        _wait_for_a_stop_signal()
    finally:
        _stop(config.name, started_ray)


def _join_or_start_ray() -> bool:
    """True when this process starts the Ray it uses (and so shuts it down at the end)."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        connect()
        return False
    ray.init(address="local")  # never a stray `ray start` cluster found on this machine
    return True


def _check_reachable(host: str, port: int) -> None:
    """Serve keeps the HTTP options of its first start on a cluster: say so when ours did not take."""
    probe = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/healthz"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP(S)_PROXY
    try:
        with direct.open(probe, timeout=30) as answer:
            answer.read()
    except OSError as error:
        raise RuntimeError(
            f"the application runs, but {probe} does not answer ({error}): Serve already runs on this cluster "
            "with other HTTP options; use its host and port, or stop that Serve instance first"
        ) from None


def _wait_for_a_stop_signal() -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(name: str, started_ray: bool) -> None:
    print("[serve] stopping", flush=True)
    if started_ray:
        serve.shutdown()
        ray.shutdown()
    elif ray.is_initialized():
        serve.delete(name)
    print("[serve] stopped", flush=True)
