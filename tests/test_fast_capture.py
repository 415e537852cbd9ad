"""The fast capture (bicubic as matrix products, slab-wise softmax, recomputing backward) against the direct path."""

import pytest
import torch
import torch.nn.functional as F

from skp_ray.attention import HeadMeanSoftmax, attention_maps, bicubic_matrix
from skp_ray.diffusion import encode_images, load_diffusion


@pytest.mark.parametrize("size_in, size_out", [(16, 128), (32, 128), (4, 9), (8, 8), (5, 3)])
def test_bicubic_matrix_products_equal_interpolate_in_float64(size_in, size_out):
    grid = torch.randn(3, 2, size_in, size_in, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    direct = F.interpolate(grid, size=(size_out, size_out), mode="bicubic", align_corners=False)
    matrix = bicubic_matrix(size_in, size_out, dtype=torch.float64)
    torch.testing.assert_close(matrix @ grid @ matrix.T, direct, rtol=0, atol=1e-12)


def test_bicubic_matrix_rows_are_the_cubic_weights_worked_by_hand():
    # Upsampling 4 -> 8 with align_corners=False: output 0 samples x = (0 + 0.5) / 2 - 0.5 = -0.25, so
    # t = 0.75 from input -1 (clamped to 0); Keys' cubic (a = -0.75) weights for t = 0.75.
    a, t = -0.75, 0.75

    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = [far(1 + t), near(t), near(1 - t), far(2 - t)]  # inputs -2, -1, 0, 1 -> clamped 0, 0, 0, 1
    expected = torch.tensor([weights[0] + weights[1] + weights[2], weights[3], 0, 0], dtype=torch.float64)
    torch.testing.assert_close(bicubic_matrix(4, 8, dtype=torch.float64)[0], expected, rtol=0, atol=1e-12)


def _direct_head_mean(logits, upsample_res, keep):
    batch, heads, tokens, side, _ = logits.shape
    up = F.interpolate(logits.flatten(0, 1), size=(upsample_res, upsample_res), mode="bicubic", align_corners=False)
    maps = up.unflatten(0, (batch, heads)).softmax(dim=2).mean(dim=1)
    return maps if keep is None else maps[:, keep]


@pytest.mark.parametrize("block_bytes", [None, 1, 5 * 9 * 8 * 4], ids=["one block", "row by row", "blocks of 4 rows"])
@pytest.mark.parametrize("keep", [None, [3, 0, 3]])
def test_head_mean_softmax_forward_and_gradient_equal_autograd_of_the_direct_path(keep, block_bytes, monkeypatch):
    if block_bytes is not None:  # 5 tokens x 9 columns of float64: blocks of 1 or 4 of the 9 rows
        monkeypatch.setattr("skp_ray.attention.SLAB_BLOCK_BYTES", block_bytes)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, 4, 4, dtype=torch.float64, generator=generator) * 3
    keep_tensor = None if keep is None else torch.tensor(keep)
    upsample = bicubic_matrix(4, 9, dtype=torch.float64)
    weights = torch.randn(2, 5 if keep is None else 3, 9, 9, dtype=torch.float64, generator=generator)

    fast_input = logits.clone().requires_grad_(True)
    fast = HeadMeanSoftmax.apply(fast_input, upsample, keep_tensor)
    (fast * weights).sum().backward()
    direct_input = logits.clone().requires_grad_(True)
    direct = _direct_head_mean(direct_input, 9, keep_tensor)
    (direct * weights).sum().backward()

    torch.testing.assert_close(fast, direct, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast_input.grad, direct_input.grad, rtol=0, atol=1e-12)


def test_head_mean_softmax_survives_logits_whose_upsampled_lobes_overflow_the_exponential(monkeypatch):
    # float32 exp overflows above about 88: bicubic overshoot of a 0 / 2000 checkerboard goes far past it
    monkeypatch.setattr("skp_ray.attention.SLAB_BLOCK_BYTES", 1)
    board = (torch.arange(4)[:, None] + torch.arange(4)) % 2 * 2000.0
    logits = torch.stack([board, 2000 - board, torch.zeros(4, 4)])[None, None]  # [1, 1, 3, 4, 4]
    upsample = bicubic_matrix(4, 9)
    shifted = logits[0, 0, 0] - logits[0, 0].amax(dim=0)  # 0 or -2000, as the fast path shifts it
    assert float((upsample @ shifted @ upsample.T).amax()) > 88
    fast = HeadMeanSoftmax.apply(logits, upsample, None)
    direct = _direct_head_mean(logits.double(), 9, None)
    assert torch.isfinite(fast).all()
    # logits near 2000 carry float32 rounding of 1.2e-4, which moves the probabilities by as much
    torch.testing.assert_close(fast, direct.float(), rtol=0, atol=2e-4)
    assert float((fast - direct).abs().mean()) < 1e-5


def test_head_mean_softmax_gradient_passes_finite_differences():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 2, 4, 3, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    upsample = bicubic_matrix(3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: HeadMeanSoftmax.apply(x, upsample, torch.tensor([1, 2])), (logits,))


def _inputs(tokens=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 256, 256, generator=generator)
    context = torch.randn(tokens, 32, generator=generator)
    noise = torch.randn(2, 4, 32, 32, generator=generator)
    return images, context, noise


@pytest.fixture(scope="module")
def tiny_float64(tiny_model_path):
    return load_diffusion(tiny_model_path, dtype=torch.float64, text_encoder=False)


def _maps_and_gradient(diffusion, token_indices, fast, dtype):
    images, context, noise = (tensor.to(dtype) for tensor in _inputs())
    kept = 7 if token_indices is None else len(token_indices)
    weights = torch.randn(2, kept, 128, 128, generator=torch.Generator().manual_seed(3), dtype=dtype)
    leaf = context.clone().requires_grad_(True)
    maps = attention_maps(
        diffusion, images, leaf, noise=noise, image_size=256, token_indices=token_indices, fast_capture=fast
    )
    (maps * weights).sum().backward()
    return maps.detach(), leaf.grad


@pytest.mark.parametrize("token_indices", [None, [4, 1, 4]])
def test_fast_maps_and_context_gradient_equal_the_direct_path_in_float64(tiny_float64, token_indices):
    fast = _maps_and_gradient(tiny_float64, token_indices, True, torch.float64)
    direct = _maps_and_gradient(tiny_float64, token_indices, False, torch.float64)
    torch.testing.assert_close(fast[0], direct[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(fast[1], direct[1], rtol=1e-9, atol=1e-12)


def test_fast_maps_and_gradient_agree_with_the_direct_path_in_float32(tiny):
    fast = _maps_and_gradient(tiny, [4, 1], True, torch.float32)
    direct = _maps_and_gradient(tiny, [4, 1], False, torch.float32)
    torch.testing.assert_close(fast[0], direct[0], rtol=1e-5, atol=1e-6)
    # float32 rounding of a sum over 2 x 128 x 128 pixels: compare against the gradient's own size
    assert float((fast[1] - direct[1]).norm() / direct[1].norm()) < 1e-4


def test_given_latents_replace_the_images(tiny):
    images, context, noise = _inputs()
    from_images = attention_maps(tiny, images, context, noise=noise, image_size=256)
    from_latents = attention_maps(tiny, None, context, noise=noise, latents=encode_images(tiny, images))
    torch.testing.assert_close(from_latents, from_images, rtol=0, atol=0)
