import os

# Set before Ray or the hub client is imported anywhere in the test session.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from skp_ray.diffusion import load_diffusion, make_tiny_diffusion


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    return make_tiny_diffusion(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_model_path):
    return load_diffusion(tiny_model_path, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def tiny64(tiny_model_path):
    return load_diffusion(tiny_model_path, dtype=torch.float64, device="cpu", text_encoder=False)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto's) on localhost for the whole session.

    The AWS variables are set before Ray starts, so Ray's workers inherit them and reach the same
    server through s3fs and pyarrow alike."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for the whole test session, with more logical CPUs than the 2 cores so that
    Ray Train workers (0.5 CPU each in the tests) never wait on each other."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """Real photographs (scikit-learn's samples) brightened until large regions saturate, as JPEG and PNG,
    half of them not square: antialiased resizing overshoots 1 on such pixels (a rounding error)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("photos")
    for i, photo in enumerate(load_sample_images().images):
        bright = np.clip(photo.astype(np.float32) * 1.8, 0, 255).astype(np.uint8)[::4, ::4]
        Image.fromarray(bright).save(folder / f"photo_{i}.jpg", quality=92)
        Image.fromarray(bright[:, : bright.shape[1] // 3]).save(folder / f"photo_{i}_tall.png")
    return folder


@pytest.fixture
def refuse_ray(monkeypatch):
    """``refuse_ray("skp_ray.labelling")``: that module's ``connect`` fails the test if reached, for
    checks that must refuse on the driver before Ray starts anything."""

    def refuse():
        raise AssertionError("Ray was reached: the driver should have refused first")

    def install(module: str) -> None:
        monkeypatch.setattr(f"{module}.connect", refuse)

    return install


@pytest.fixture(scope="session")
def tiny21_path(tmp_path_factory) -> str:
    """The embedded tiny SD-2.1-shaped model (DIFT's topology), written once per session."""
    from skp_ray.diffusion import make_tiny_sd21

    return make_tiny_sd21(tmp_path_factory.mktemp("models") / "tiny-sd21", seed=0)


@pytest.fixture(scope="session")
def tiny21(tiny21_path):
    """The tiny SD 2.1 model in float32 on the CPU, text encoder and tokenizer included. Do not change its weights."""
    return load_diffusion(tiny21_path, dtype=torch.float32, device="cpu")
