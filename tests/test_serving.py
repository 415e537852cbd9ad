"""The keypoint endpoint: a real Serve application on localhost (tiny model), called over real HTTP."""

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import ray
import torch
import yaml
from PIL import Image
from ray import serve
from ray.serve.schema import ServeDeploySchema

from skp_ray.artifact import KeypointArtifact, load_artifact, save_artifact
from skp_ray.config import typed_settings
from skp_ray.detection import detect_keypoints
from skp_ray.diffusion import load_diffusion
from skp_ray.images import content_hash, decode_image, pixels_from_uint8, pixels_to_uint8, resize_batch, to_tensor
from skp_ray.label_detector import detection_generator, detection_options
from skp_ray.labelling import LabelConfig, run_labelling
from skp_ray.model_source import TINY_MODEL, ModelNotFoundError, model_location
from skp_ray.serving import ServeConfig, app_from_args, build_app, check_settings, deployment_options

REPO = Path(__file__).resolve().parents[1]
APP = "skp-test"
TOKEN = "test-token-5f2d"
MAX_PIXELS, MAX_UPLOAD_BYTES = 200_000, 400_000

pytestmark = pytest.mark.timeout(600)  # a hung Serve start fails here instead of eating CI's budget


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> str:
    """A small artifact for the tiny model (as in test_labelling.py), at 128 px to keep detection quick."""
    folder = str(tmp_path_factory.mktemp("artifact") / "tiny")
    context = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    settings = dict(image_size=128, feature_upsample_res=32, layers=[0, 1, 2, 3], noise_level=-1,
                    augment_degrees=15.0, augment_scale=[0.8, 1.0], augment_translate=[0.25, 0.25])  # fmt: skip
    save_artifact(KeypointArtifact(context, [3, 5, 6], model=TINY_MODEL, settings=settings), folder)
    return folder


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    """Encoded test images by name: JPEG, a non-square PNG, RGBA, palette, grayscale WebP."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8), "RGB")
    pictures = {
        "photo.jpg": (rgb, "JPEG"),
        "tall.png": (rgb.crop((0, 0, 40, 72)), "PNG"),
        "rgba.png": (rgb.convert("RGBA"), "PNG"),
        "palette.png": (rgb.convert("P"), "PNG"),
        "gray.webp": (rgb.convert("L"), "WEBP"),
    }
    encoded = {}
    for name, (picture, kind) in pictures.items():
        buffer = io.BytesIO()
        picture.save(buffer, format=kind)
        encoded[name] = buffer.getvalue()
    return encoded


@pytest.fixture(scope="module")
def image_folder(images, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("images")
    for name, data in images.items():
        (folder / name).write_bytes(data)
    return str(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("secrets") / "api-token"
    path.write_text(TOKEN + "\n")
    return str(path)


def serve_config(artifact: str, **changes) -> ServeConfig:
    settings = dict(cpus_per_replica=0.5, augmentation_iterations=2, max_batch_size=8, batch_wait_timeout_s=0.05,
                    max_pixels=MAX_PIXELS, max_upload_bytes=MAX_UPLOAD_BYTES)  # fmt: skip
    return ServeConfig(artifact=artifact, **{**settings, **changes})


@pytest.fixture(scope="module")
def server(ray_session, artifact, token_file):
    """The application on a free localhost port, one replica of 0.5 CPU; a client sending the token."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(serve_config(artifact, token_file=token_file)), name=APP, route_prefix="/")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=120, trust_env=False) as client:
        yield client
    serve.shutdown()


@pytest.fixture(scope="module")
def anonymous():
    """A client without the token (and never through an HTTP(S)_PROXY)."""
    with httpx.Client(trust_env=False, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def direct(artifact):
    """``detect_keypoints`` run here as the replica runs it (one thread, as Ray gives a 0.5-CPU replica; a
    channels-last VAE on the CPU; the pixels rounded to uint8 as labelling's transport rounds them)."""
    loaded = load_artifact(artifact)
    diffusion = load_diffusion(model_location(loaded.model), device="cpu", text_encoder=False, channels_last_vae=True)

    def detect(data: bytes, seed: int, iterations: int):
        decoded = decode_image(data)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            points, peaks = detect_keypoints(
                diffusion, pixels_from_uint8(pixels_to_uint8(resize_batch(to_tensor(decoded)[None], 128))),
                loaded.context, loaded.token_indices,
                augmentation_iterations=iterations, generator=detection_generator(seed, content_hash(decoded)),
                **detection_options(loaded.settings),
            )  # fmt: skip
        finally:
            torch.set_num_threads(threads)
        return points[0].flip(-1).numpy(), peaks[0].numpy(), decoded

    return detect


def assert_answer_is(answer: dict, expected) -> None:
    normalized, peaks, decoded = expected
    height, width = decoded.shape[:2]
    assert (answer["width"], answer["height"], answer["content_hash"]) == (width, height, content_hash(decoded))
    np.testing.assert_allclose(answer["keypoints_xy_normalized"], normalized, atol=1e-6)
    np.testing.assert_allclose(answer["keypoints_xy"], normalized * [width, height], atol=1e-4)
    np.testing.assert_allclose(answer["peaks"], peaks, rtol=1e-5)


def address(client: httpx.Client, path: str) -> str:
    """The server's URL for ``path``, for calls without the client's token."""
    return str(client.base_url).rstrip("/") + path


def post(client, data: bytes, **params) -> httpx.Response:
    return client.post("/v1/keypoints", content=data, params=params)


# --- answers ---------------------------------------------------------------------------------------


def test_the_json_equals_detect_keypoints_on_the_same_image_and_seed(server, images, direct, artifact):
    for name in ("photo.jpg", "tall.png", "rgba.png", "palette.png", "gray.webp"):
        answer = post(server, images[name], seed=7).json()
        assert_answer_is(answer, direct(images[name], 7, 2))
        assert answer["artifact_id"] == load_artifact(artifact).id and answer["model"] == TINY_MODEL
        assert (answer["seed"], answer["augmentation_iterations"], {k: len(v) for k, v in answer["confidence"].items()}) == (
            7, 2, {"keypoint_spread_px": 3, "peak_share": 3}
        )  # fmt: skip
        assert len(answer["keypoints_xy"]) == len(answer["peaks"]) == 3 and answer["batch_size"] >= 1
    # a multipart upload with form fields is the same request; other seeds and counts give their own answers
    form = server.post("/v1/keypoints", files={"image": ("p.jpg", images["photo.jpg"])}, data={"seed": "7"}).json()
    assert form["keypoints_xy"] == post(server, images["photo.jpg"], seed=7).json()["keypoints_xy"]
    assert_answer_is(post(server, images["photo.jpg"]).json(), direct(images["photo.jpg"], 0, 2))  # the default seed
    assert_answer_is(post(server, images["photo.jpg"], augmentation_iterations=3).json(), direct(images["photo.jpg"], 0, 3))


def test_the_answer_equals_the_labelling_jobs_row(server, image_folder, artifact, tmp_path):
    output = tmp_path / "labels"
    job = LabelConfig(artifact=artifact, input=image_folder, output=str(output), augmentation_iterations=2,
                      seed=3, cpus_per_actor=0.5, progress=False)  # fmt: skip
    run_labelling(job)
    for row in pd.read_parquet(output).itertuples():
        answer = post(server, Path(row.uri).read_bytes(), seed=3).json()
        assert answer["content_hash"] == row.content_hash and (answer["width"], answer["height"]) == (row.width, row.height)
        np.testing.assert_allclose(answer["keypoints_xy"], np.stack(row.keypoints_xy), atol=1e-4)
        np.testing.assert_allclose(answer["keypoints_xy_normalized"], np.stack(row.keypoints_xy_normalized), atol=1e-6)
        np.testing.assert_allclose(answer["peaks"], row.peaks, rtol=1e-5)


def test_format_png_is_the_image_with_its_keypoints_drawn(server, images, artifact):
    response = post(server, images["tall.png"], format="png", seed=1)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-artifact-id"] == load_artifact(artifact).id
    picture = Image.open(io.BytesIO(response.content))
    picture.load()
    assert picture.size == (40, 72) and picture.mode == "RGB"
    assert not np.array_equal(np.asarray(picture), np.asarray(Image.open(io.BytesIO(images["tall.png"]))))


def test_the_artifact_and_health_endpoints(server, anonymous, artifact):
    loaded = load_artifact(artifact)
    described = server.get("/v1/artifact").json()
    assert (described["artifact_id"], described["model"], described["token_count"]) == (loaded.id, TINY_MODEL, 3)
    assert described["settings"] == loaded.settings and described["image_size"] == 128
    assert described["limits"]["max_pixels"] == MAX_PIXELS and described["defaults"]["augmentation_iterations"] == 2
    assert anonymous.get(address(server, "/healthz")).json() == {"status": "ok", "artifact_id": loaded.id}  # no token


# --- batching ----------------------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, images, direct):
    names = ["photo.jpg", "tall.png", "rgba.png", "gray.webp"]
    requests = [(names[i % 4], i % 3, 1 + i % 2) for i in range(16)]  # image, seed, augmentations: mixed in batches
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda r: post(server, images[r[0]], seed=r[1], augmentation_iterations=r[2]), requests))
    assert [answer.status_code for answer in answers] == [200] * 16
    assert max(answer.json()["batch_size"] for answer in answers) > 1
    for (name, seed, iterations), answer in zip(requests, answers):
        assert (answer.json()["seed"], answer.json()["augmentation_iterations"]) == (seed, iterations)
        assert_answer_is(answer.json(), direct(images[name], seed, iterations))
    stats = server.get("/v1/stats").json()
    assert stats["largest_batch"] > 1 and stats["requests"] >= 16


# --- refusals ----------------------------------------------------------------------------------------


def broken(images: dict) -> dict:
    png = images["tall.png"]
    huge = io.BytesIO()
    Image.new("RGB", (600, 400)).save(huge, format="PNG")  # 240,000 pixels > MAX_PIXELS, few bytes
    return {
        "no body": (dict(content=b""), 400, "no_image", "has no image"),
        "a form without the image": (dict(data={"seed": "1"}, files={"note": ("n.txt", b"x")}), 422, "unknown_parameter", "'note'"),
        "an empty image part": (dict(files={"image": ("e.png", b"")}), 400, "empty", "0 bytes"),
        "not an image": (dict(content=b"just some text"), 400, "not_an_image", "JPEG, PNG or WebP"),
        "a truncated file": (dict(content=png[: len(png) // 2]), 400, "truncated", "cut short"),
        "a cut-off header": (dict(content=png[:12]), 400, "truncated", "header"),
        "too many pixels": (dict(content=huge.getvalue()), 413, "too_large", f"max_pixels={MAX_PIXELS}"),
        "too many bytes": (dict(content=b"\xff\xd8\xff" + bytes(MAX_UPLOAD_BYTES)), 413, "upload_too_large", str(MAX_UPLOAD_BYTES)),
        "too many bytes, streamed": (dict(content=iter([bytes(300_000)] * 2)), 413, "upload_too_large", "more than"),
        "an unknown parameter": (dict(content=png, params={"sed": "1"}), 422, "unknown_parameter", "'sed'"),
        "no augmentations": (dict(content=png, params={"augmentation_iterations": "0"}), 422, "invalid_parameter", "from 1 to 32"),
        "too many augmentations": (dict(content=png, params={"augmentation_iterations": "33"}), 422, "invalid_parameter", "'33'"),
        "a negative seed": (dict(content=png, params={"seed": "-1"}), 422, "invalid_parameter", "seed"),
        "a seed that is no number": (dict(content=png, params={"seed": "one"}), 422, "invalid_parameter", "'one'"),
        "a seed given twice": (dict(content=png, params=[("seed", "1"), ("seed", "2")]), 422, "invalid_parameter", "twice"),
        "an unknown format": (dict(content=png, params={"format": "gif"}), 422, "invalid_parameter", "json, png"),
        "two images": (dict(files=[("image", ("a.png", png)), ("image", ("b.png", png))]), 422, "invalid_parameter", "one image"),
        "a form without a boundary": (dict(content=b"--x\r\n", headers={"content-type": "multipart/form-data"}),
                                      400, "bad_multipart", "boundary"),  # fmt: skip
    }


@pytest.mark.parametrize("case", list(broken({"tall.png": b"\x89PNG" * 100})))
def test_a_bad_request_gets_a_4xx_naming_the_problem_and_the_next_one_succeeds(server, images, case):
    request, status, code, fragment = broken(images)[case]
    response = server.post("/v1/keypoints", **request)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and fragment in error["message"], error
    assert post(server, images["photo.jpg"]).status_code == 200


def test_unknown_paths_and_methods_answer_in_the_same_shape(server):
    assert server.get("/v2/keypoints").json()["error"]["code"] == "not_found"
    response = server.get("/v1/keypoints")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_the_token_is_required_and_checked(server, anonymous, images):
    url = address(server, "/v1/keypoints")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}):
        response = anonymous.post(url, content=images["photo.jpg"], headers=headers, timeout=60)
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized", headers
        assert response.headers["www-authenticate"] == "Bearer" and TOKEN not in response.text
    assert anonymous.get(address(server, "/v1/artifact"), timeout=60).status_code == 401
    ok = anonymous.post(url, content=images["photo.jpg"], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert ok.status_code == 200


def test_a_crashed_replica_answers_5xx_in_flight_and_is_restarted(server, images, direct):
    """A replica killed outright mid-batch: its requests get a 5xx (never a wrong answer), Serve starts a
    new replica, and requests succeed again."""
    slow = [(name, seed) for name in ("photo.jpg", "tall.png") for seed in range(10, 14)]  # 8 x 32 augmentations
    batches_before = server.get("/v1/stats").json()["batches"]
    with ThreadPoolExecutor(len(slow)) as pool:
        pending = [pool.submit(post, server, images[n], seed=s, augmentation_iterations=32) for n, s in slow]
        started = time.monotonic()
        while server.get("/v1/stats").json()["batches"] == batches_before:  # until a batch is being detected
            assert time.monotonic() < started + 60, "no batch started within a minute"
            time.sleep(0.05)
        (replica,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["name"].startswith(f"SERVE_REPLICA::{APP}#KeypointService")]  # fmt: skip
        ray.kill(ray.get_actor(replica, namespace="serve"))
        answers = [future.result() for future in pending]
    assert any(answer.status_code >= 500 for answer in answers), [a.status_code for a in answers]
    for (name, seed), answer in zip(slow, answers):
        assert answer.status_code >= 500 or answer.status_code == 200, answer.text
        if answer.status_code == 200:
            assert_answer_is(answer.json(), direct(images[name], seed, 32))
    deadline = time.monotonic() + 120
    while post(server, images["photo.jpg"]).status_code != 200:
        assert time.monotonic() < deadline, "no replica answered within 2 minutes of the crash"
        time.sleep(1)


# --- settings, configs and the job ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(max_batch_size=0), "--max_batch_size must be at least 1"),
        (dict(replicas="0"), "--replicas '0'"),
        (dict(replicas="4,2"), "MIN,MAX"),
        (dict(port=70000), "--port must lie in 1..65535"),
        (dict(augmentation_iterations=40), "--augmentation_iterations must lie in 1..--max_augmentation_iterations"),
        (dict(dtype="int8"), "--dtype 'int8'"),
        (dict(token_file="/nonexistent/token"), "--token_file '/nonexistent/token' cannot be read"),
        (dict(token_env="SKP_TEST_NO_SUCH_VARIABLE"), "SKP_TEST_NO_SUCH_VARIABLE: that environment variable is not set"),
        (dict(token_env="X", token_file="y"), "not both"),
        (dict(artifact="/nonexistent"), "not a keypoint artifact"),
        (dict(model="/nowhere/model"), "/nowhere/model"),
        (dict(max_batch_size="many"), "max_batch_size: expected a whole number"),
    ],
)
def test_bad_settings_fail_on_the_driver_before_ray(artifact, changes, message, monkeypatch):
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    with pytest.raises((ValueError, FileNotFoundError, ModelNotFoundError), match=message):
        build_app(serve_config(**{"artifact": artifact, **changes}))


def test_an_empty_token_file_is_refused_and_the_token_never_shown(artifact, tmp_path, monkeypatch):
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        build_app(serve_config(artifact, token_file=str(tmp_path / "empty")))
    monkeypatch.setenv("SKP_TEST_TOKEN", "secret-value-91")
    app = build_app(serve_config(artifact, token_env="SKP_TEST_TOKEN"))
    assert b"secret-value-91" not in ray.cloudpickle.dumps(app)  # what replicas get holds its sha256 only


def test_the_serve_configs_deploy_this_application(artifact):
    serve_yaml = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
    service = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP" and cluster["workerGroupSpecs"][0]["maxReplicas"] >= 1
    in_cluster = yaml.safe_load(service["spec"]["serveConfigV2"])
    for config in (serve_yaml, in_cluster):
        (application,) = ServeDeploySchema.model_validate(config).applications
        assert application.import_path == "skp_ray.serving:app_from_args"
        typed_settings(ServeConfig, application.args)  # every key is an option of the right type
        assert not {"token", "api_token"} & set(application.args)  # tokens come from a file or the environment
    assert serve_yaml["http_options"]["host"] == "127.0.0.1"
    head_env = {e["name"] for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert in_cluster["applications"][0]["args"]["token_env"] in head_env
    args = {"artifact": artifact, "cpus_per_replica": "0.5", "replicas": "1,3"}
    app_from_args(args)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['token'\]"):
        app_from_args({**args, "token": "x"})


def test_replicas_are_fixed_or_autoscaled(artifact):
    config = serve_config(artifact, replicas="1,3", max_batch_size=4)
    autoscaled = deployment_options(config, check_settings(config))
    assert autoscaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}
    assert autoscaled["max_ongoing_requests"] == 8 and autoscaled["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0}
    config = serve_config(artifact, replicas="2", use_gpu=True)
    fixed = deployment_options(config, check_settings(config))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed and fixed["ray_actor_options"]["num_gpus"] == 1


def test_the_job_serves_until_sigterm_then_stops_its_ray(anonymous, artifact, images):
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = [sys.executable, "jobs/serve.py", "--artifact", artifact, "--port", str(port), "--cpus_per_replica", "0.5",
               "--augmentation_iterations", "1"]  # fmt: skip
    job = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any("[serve] listening on" in line for line in lines):
            assert job.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.5)
        assert f"http://127.0.0.1:{port}" in "".join(lines) and "no token required" in "".join(lines)
        answer = anonymous.post(f"http://127.0.0.1:{port}/v1/keypoints", content=images["photo.jpg"], timeout=120)
        assert answer.status_code == 200 and answer.json()["augmentation_iterations"] == 1
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=120) == 0, "".join(lines)[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)  # the group this test started, and only it
    reader.join(timeout=10)
    assert "[serve] stopped" in "".join(lines)
    with pytest.raises(httpx.TransportError):
        anonymous.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
