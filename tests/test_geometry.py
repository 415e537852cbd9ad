"""Tests of skp_ray.geometry against hand and numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from skp_ray.geometry import inverse_affine, random_affine, unwarp, warp


def _translation(dx_pixels: int, dy_pixels: int, height: int, width: int) -> torch.Tensor:
    """theta that samples input pixel (i + dy, j + dx) at output pixel (i, j)."""
    return torch.tensor([[1.0, 0.0, 2.0 * dx_pixels / width], [0.0, 1.0, 2.0 * dy_pixels / height]])


def _shift_reference(x: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """out[..., i, j] = x[..., i + dy, j + dx], zero outside."""
    height, width = x.shape[-2:]
    out = np.zeros_like(x)
    for i in range(height):
        for j in range(width):
            if 0 <= i + dy < height and 0 <= j + dx < width:
                out[..., i, j] = x[..., i + dy, j + dx]
    return out


# --- random_affine ------------------------------------------------------------------------


def test_random_affine_matches_numpy_formulas_from_the_same_draws():
    theta = random_affine(6, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    u = torch.rand(6, 4, generator=torch.Generator().manual_seed(123), dtype=torch.float64).numpy()
    angle = np.deg2rad((2 * u[:, 0] - 1) * 15.0)
    s = 0.8 + 0.2 * u[:, 1]
    tx = (2 * u[:, 2] - 1) * 0.25
    ty = (2 * u[:, 3] - 1) * 0.25
    expected = np.stack(
        [
            np.stack([s * np.cos(angle), s * np.sin(angle), tx], -1),
            np.stack([-s * np.sin(angle), s * np.cos(angle), ty], -1),
        ],
        -2,
    )
    assert theta.shape == (6, 2, 3)
    np.testing.assert_allclose(theta.numpy(), expected, rtol=0, atol=1e-12)


def test_random_affine_custom_ranges_and_reproducibility():
    kwargs = dict(degrees=40.0, scale=(0.5, 2.0), translate=(0.1, 0.3))
    theta = random_affine(2000, generator=torch.Generator().manual_seed(7), **kwargs)
    again = random_affine(2000, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(theta, again)
    assert theta.dtype == torch.float32
    t = theta.double().numpy()
    scale = np.sqrt(np.linalg.det(t[:, :, :2]))
    angle = np.rad2deg(np.arctan2(t[:, 0, 1], t[:, 0, 0]))
    assert scale.min() >= 0.5 - 1e-5 and scale.max() <= 2.0 + 1e-5
    assert np.abs(angle).max() <= 40.0 + 1e-4
    assert np.abs(t[:, 0, 2]).max() <= 0.1 and np.abs(t[:, 1, 2]).max() <= 0.3
    # the draws cover the ranges (not stuck at a constant)
    assert np.abs(angle).max() > 35.0 and scale.min() < 0.6 and scale.max() > 1.9
    # rotation-scale block: [[c, s], [-s, c]]
    np.testing.assert_allclose(t[:, 0, 0], t[:, 1, 1], atol=1e-6)
    np.testing.assert_allclose(t[:, 0, 1], -t[:, 1, 0], atol=1e-6)


def test_random_affine_dtype_device_and_empty_batch():
    theta = random_affine(3, device="cpu", dtype=torch.float64)
    assert theta.dtype == torch.float64 and theta.device.type == "cpu"
    assert random_affine(0).shape == (0, 2, 3)
    with pytest.raises(ValueError, match="batch"):
        random_affine(-1)


# --- inverse_affine -----------------------------------------------------------------------


def test_inverse_affine_matches_numpy_inv():
    theta = random_affine(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    inv = inverse_affine(theta.reshape(2, 4, 2, 3)).reshape(8, 2, 3).numpy()
    for t, i in zip(theta.numpy(), inv):
        full = np.vstack([t, [0.0, 0.0, 1.0]])
        np.testing.assert_allclose(i, np.linalg.inv(full)[:2], atol=1e-12)


def test_inverse_affine_keeps_dtype_including_half():
    theta = torch.tensor([[2.0, 0.0, 0.5], [0.0, 4.0, -1.0]], dtype=torch.float16)
    inv = inverse_affine(theta)
    assert inv.dtype == torch.float16
    np.testing.assert_allclose(inv.float().numpy(), [[0.5, 0.0, -0.25], [0.0, 0.25, 0.25]])


def test_inverse_affine_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"theta must have shape \[\.\.\., 2, 3\]"):
        inverse_affine(torch.eye(3))


# --- warp / unwarp ------------------------------------------------------------------------


def test_warp_whole_pixel_translation_is_an_exact_shift():
    x = torch.rand(2, 3, 8, 10, generator=torch.Generator().manual_seed(1))
    theta = torch.stack([_translation(2, -1, 8, 10), _translation(-3, 4, 8, 10)])
    out = warp(x, theta)
    np.testing.assert_allclose(out[0].numpy(), _shift_reference(x[0].numpy(), 2, -1), atol=1e-5)
    np.testing.assert_allclose(out[1].numpy(), _shift_reference(x[1].numpy(), -3, 4), atol=1e-5)


def test_unwarp_of_whole_pixel_translation_restores_the_field_of_view():
    x = torch.rand(1, 2, 12, 12, generator=torch.Generator().manual_seed(2))
    theta = _translation(3, 2, 12, 12)[None]
    back = unwarp(warp(x, theta), theta)
    # pixels that stayed inside the frame (rows 2.., cols 3..) come back exactly
    np.testing.assert_allclose(back[..., 2:, 3:].numpy(), x[..., 2:, 3:].numpy(), atol=1e-5)
    assert back[..., :2, :].abs().max() < 1e-6 and back[..., :, :3].abs().max() < 1e-6


def test_warp_then_unwarp_is_identity_on_the_centre_of_a_smooth_image():
    n = 64
    ys, xs = np.meshgrid(np.arange(n) + 0.5, np.arange(n) + 0.5, indexing="ij")
    image = np.sin(2 * np.pi * xs / n) * np.cos(2 * np.pi * ys / n) + 0.5 * np.sin(
        2 * np.pi * (xs + ys) / n
    )
    x = torch.tensor(image, dtype=torch.float32)[None, None]
    a, s = math.radians(12.0), 0.9
    theta = torch.tensor(
        [[[s * math.cos(a), s * math.sin(a), 0.05], [-s * math.sin(a), s * math.cos(a), -0.04]]]
    )
    back = unwarp(warp(x, theta), theta)[0, 0].numpy()
    centre = slice(n // 4, 3 * n // 4)
    # two bilinear resamplings of a smooth image: error of order h^2 |f''|, well below 0.02
    np.testing.assert_allclose(back[centre, centre], image[centre, centre], atol=0.02)


def test_single_pixel_lands_where_the_hand_computed_matrix_says():
    n = 16
    r, c = 3, 11
    x = torch.zeros(1, 1, n, n)
    x[0, 0, r, c] = 1.0
    # a = 90 degrees, s = 1, translation of whole pixels: theta = [[0, 1, tx], [-1, 0, ty]]
    tx, ty = 2 * 2 / n, -2 * 1 / n
    theta = torch.tensor([[[0.0, 1.0, tx], [-1.0, 0.0, ty]]])
    out = warp(x, theta)[0, 0]
    # input point (normalised) of the pixel; solve x_in = y_out + tx, y_in = -x_out + ty
    x_in, y_in = (2 * c + 1) / n - 1, (2 * r + 1) / n - 1
    x_out, y_out = ty - y_in, x_in - tx
    j, i = ((x_out + 1) * n - 1) / 2, ((y_out + 1) * n - 1) / 2
    assert float(i).is_integer() and float(j).is_integer()
    expected = torch.zeros(n, n)
    expected[int(round(i)), int(round(j))] = 1.0
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_blob_centroid_follows_a_generic_affine_matrix():
    n = 48
    cy, cx = 20.0, 27.0  # blob centre in pixels (y, x)
    ys, xs = np.meshgrid(np.arange(n) + 0.5, np.arange(n) + 0.5, indexing="ij")
    blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * 2.5**2))
    theta = np.array([[0.8, 0.3, 0.1], [-0.3, 0.8, -0.05]])
    out = warp(torch.tensor(blob, dtype=torch.float32)[None], torch.tensor(theta))[0].numpy()
    # hand: output point = inv(theta) applied to the input point, in normalised coordinates
    p_in = np.array([2 * cx / n - 1, 2 * cy / n - 1, 1.0])
    x_out, y_out, _ = np.linalg.inv(np.vstack([theta, [0, 0, 1]])) @ p_in
    px, py = (x_out + 1) * n / 2, (y_out + 1) * n / 2
    # the warped blob is an anisotropic Gaussian; its centroid sits at the mapped centre
    mass = out.sum()
    assert abs((out * xs).sum() / mass - px) < 0.05
    assert abs((out * ys).sum() / mass - py) < 0.05


def test_single_image_form_matches_batched_and_casts_theta():
    x = torch.rand(3, 9, 7, generator=torch.Generator().manual_seed(3))
    theta = random_affine(1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    single = warp(x, theta[0])
    assert single.shape == (3, 9, 7) and single.dtype == torch.float32
    torch.testing.assert_close(single, warp(x[None], theta)[0])
    torch.testing.assert_close(unwarp(x, theta[0]), unwarp(x[None], theta)[0])


def test_warp_passes_gradient_to_x():
    x = torch.rand(1, 1, 8, 8, requires_grad=True)
    warp(x, random_affine(1)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("x_shape", "theta_shape", "message"),
    [
        ((2, 1, 4, 4), (2, 3), r"theta must have shape \[B, 2, 3\] = \[2, 2, 3\]"),
        ((2, 1, 4, 4), (3, 2, 3), r"theta must have shape \[B, 2, 3\] = \[2, 2, 3\]"),
        ((2, 1, 4, 4), (2, 3, 3), r"theta must have shape \[B, 2, 3\]"),
        ((1, 4, 4), (1, 2, 3), r"theta must have shape \[2, 3\]"),
        ((4, 4), (2, 3), r"x must have shape \[B, C, H, W\] or \[C, H, W\]"),
    ],
)
@pytest.mark.parametrize("fn", [warp, unwarp])
def test_warp_and_unwarp_reject_wrong_shapes(fn, x_shape, theta_shape, message):
    with pytest.raises(ValueError, match=message):
        fn(torch.zeros(x_shape), torch.zeros(theta_shape))
