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
