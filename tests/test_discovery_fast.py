"""Discovery's fast path: cached untransformed latents and the fast capture change nothing beyond rounding."""

import pytest
import torch

from skp_ray.diffusion import encode_images
from skp_ray.discovery import run_discovery
from skp_ray.latent_cache import LatentCache
from skp_ray.optimization import training_loss
from skp_ray.samples import write_sample_images
from test_discovery import small_config


def _count_encodes(diffusion):
    calls = []
    hook = diffusion.vae.encoder.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    return calls, hook


def test_the_cache_encodes_each_image_once_and_returns_what_the_vae_gives(tiny):
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cache = LatentCache(capacity=2)
    calls, hook = _count_encodes(tiny)
    try:
        first = cache.latents(tiny, images, [10, 11, 12])
        again = cache.latents(tiny, images[[1, 0, 2]], [11, 10, 12])
    finally:
        hook.remove()
    assert calls == [3, 1]  # the third image did not fit in the cache: it is encoded again, alone
    assert len(cache) == 2
    torch.testing.assert_close(first, encode_images(tiny, images), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, first[[1, 0, 2]], rtol=1e-5, atol=1e-6)


def test_the_loss_from_cached_latents_equals_the_loss_from_images(tiny):
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=generator)
    context = torch.randn(8, 32, generator=generator)
    thetas = torch.tensor([[[0.9, 0.1, 0.05], [-0.1, 0.9, 0.0]]] * 2)
    noise = (torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator))
    options = dict(thetas=thetas, noise=noise, top_k=2, furthest_point_num_samples=4, image_size=64,
                   feature_upsample_res=32)  # fmt: skip
    plain = training_loss(tiny, images, context, **options)
    cached = training_loss(tiny, images, context, latents=encode_images(tiny, images), **options)
    assert torch.equal(plain.total, cached.total)


def test_a_run_on_the_fast_path_matches_one_on_the_direct_path(ray_session, tmp_path):
    data = tmp_path / "data"
    write_sample_images(data, n=4, size=128, seed=7)
    runs = {
        name: run_discovery(small_config(str(data), tmp_path, name=name, num_steps=3, **changes)).artifact
        for name, changes in {"fast": {}, "direct": dict(cache_latents=0, fast_capture=False)}.items()
    }
    fast, direct = runs["fast"], runs["direct"]
    torch.testing.assert_close(fast.context, direct.context, rtol=1e-4, atol=1e-5)
    assert fast.loss_history == pytest.approx(direct.loss_history, rel=1e-4)
    assert fast.token_indices == direct.token_indices


def test_a_negative_latent_cache_is_refused_on_the_driver(tmp_path, refuse_ray):
    refuse_ray("skp_ray.discovery")
    write_sample_images(tmp_path / "data", n=4, size=64, seed=6)
    with pytest.raises(ValueError, match=r"--cache_latents must be 0 \(no cache\) or more \(got -1\)"):
        run_discovery(small_config(str(tmp_path / "data"), tmp_path / "out", name="neg", cache_latents=-1))
