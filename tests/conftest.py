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
def ray_session():
    """One local Ray for the whole test session, with more logical CPUs than the 2 cores so that
    Ray Train workers (0.5 CPU each in the tests) never wait on each other."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()
