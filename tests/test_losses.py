"""Tests of skp_ray.losses against numpy and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skp_ray.geometry import random_affine, warp
from skp_ray.losses import (
    LossParts,
    batch_keypoint_loss,
    equivariance_loss,
    image_keypoint_loss,
    sharpening_loss,
)

IDENTITY = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def _np_gaussian(cy: float, cx: float, height: int, width: int, sigma: float) -> np.ndarray:
    ys, xs = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    return np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2))


def _translation(dx: int, dy: int, size: int) -> torch.Tensor:
    return torch.tensor([[1.0, 0.0, 2.0 * dx / size], [0.0, 1.0, 2.0 * dy / size]])


def _blob_maps(amplitudes, locations, size=48, sigma=2.0) -> torch.Tensor:
    """Token t: amplitudes[t] * Gaussian at locations[t] (pixel centres)."""
    return torch.tensor(
        np.stack([a * _np_gaussian(cy, cx, size, size, sigma) for a, (cy, cx) in zip(amplitudes, locations)]),
        dtype=torch.float32,
    )


# 48 x 48 maps, tokens 0..3 at (12,12), (12,36), (36,36), (36,12): with amplitudes 3, 2, 1.5, 1
# the KL order is 0, 1, 2, 3, so the 3 candidates are {0, 1, 2}. The blobs are far enough from
# the border that a shift by a few pixels loses nothing (below 1e-10 in squared error).
SIZE = 48
CORNERS = [(12.5, 12.5), (12.5, 36.5), (36.5, 36.5), (36.5, 12.5)]
AMPLITUDES = [3.0, 2.0, 1.5, 1.0]


# --- sharpening ---------------------------------------------------------------------------


def test_sharpening_loss_one_subject_matches_numpy():
    maps = torch.rand(5, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = []
    for m in maps.numpy().astype(np.float64):
        flat = int(np.argmax(m))
        expected.append((m - _np_gaussian(flat // 16 + 0.5, flat % 16 + 0.5, 16, 16, 2.0)) ** 2)
    assert sharpening_loss(maps).item() == pytest.approx(np.mean(expected), rel=1e-5)


def test_sharpening_loss_two_subjects_matches_numpy_with_half_height_target():
    size = 40  # clearing radius 2 pixels
    maps = torch.zeros(2, size, size)
    maps[0, 5, 5], maps[0, 6, 6], maps[0, 30, 10] = 1.0, 0.9, 0.6  # (6,6) is cleared with (5,5)
    maps[1, 20, 20], maps[1, 3, 35] = 0.7, 0.8
    targets = np.stack(
        [
            0.5 * (_np_gaussian(5.5, 5.5, size, size, 1.5) + _np_gaussian(30.5, 10.5, size, size, 1.5)),
            0.5 * (_np_gaussian(3.5, 35.5, size, size, 1.5) + _np_gaussian(20.5, 20.5, size, size, 1.5)),
        ]
    )
    assert targets.max() == pytest.approx(0.5, abs=1e-6)
    expected = np.mean((maps.numpy().astype(np.float64) - targets) ** 2)
    got = sharpening_loss(maps, sigma=1.5, num_subjects=2)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() != pytest.approx(sharpening_loss(maps, sigma=1.5).item(), rel=1e-3)


def test_sharpening_loss_published_disc_targets_the_other_second_peak():
    # H = 20 -> radius 1. The centred disc around (5, 5) clears (4, 5), the published one (indices to
    # the centre (5.5, 5.5)) clears (6, 6) instead: the second peaks are (6, 6) and (4, 5)
    maps = torch.zeros(1, 20, 20)
    maps[0, 5, 5], maps[0, 6, 6], maps[0, 4, 5] = 1.0, 0.9, 0.8
    values = maps.numpy().astype(np.float64)
    for peak_disc, second in (("centred", (6.5, 6.5)), ("published", (4.5, 5.5))):
        target = 0.5 * (_np_gaussian(5.5, 5.5, 20, 20, 2.0) + _np_gaussian(*second, 20, 20, 2.0))
        got = sharpening_loss(maps, num_subjects=2, peak_disc=peak_disc)
        assert got.item() == pytest.approx(np.mean((values - target) ** 2), rel=1e-5)


def test_sharpening_loss_gradient_treats_target_as_constant():
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    maps.requires_grad_(True)
    sharpening_loss(maps).backward()
    target = []
    for m in maps.detach().numpy():
        flat = int(np.argmax(m))
        target.append(_np_gaussian(flat // 8 + 0.5, flat % 8 + 0.5, 8, 8, 2.0))
    expected = 2 * (maps.detach().numpy() - np.stack(target)) / maps.numel()
    np.testing.assert_allclose(maps.grad.numpy(), expected, rtol=1e-10, atol=1e-14)


def test_sharpening_loss_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"maps must have shape \[T, H, W\]"):
        sharpening_loss(torch.rand(1, 2, 8, 8))


# --- equivariance -------------------------------------------------------------------------


def test_equivariance_loss_zero_for_whole_pixel_translation_inside_the_frame():
    maps = _blob_maps(AMPLITUDES, CORNERS)  # negligible mass near the border
    theta = _translation(3, -2, SIZE)
    assert equivariance_loss(maps, warp(maps, theta), theta).item() < 1e-10


def test_equivariance_loss_hand_values_and_no_masking():
    a = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(2))
    b = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(3))
    expected = np.mean((a.numpy().astype(np.float64) - b.numpy()) ** 2)
    assert equivariance_loss(a, b, IDENTITY).item() == pytest.approx(expected, rel=1e-5)
    # ones shifted by one pixel: one column leaves the frame and counts as an error of 1
    ones = torch.ones(3, 8, 8)
    assert equivariance_loss(ones, ones, _translation(1, 0, 8)).item() == pytest.approx(1 / 8, rel=1e-5)


def test_equivariance_loss_batched():
    ones = torch.ones(2, 3, 8, 8)
    thetas = torch.stack([IDENTITY, _translation(0, 2, 8)])
    # image 0: no error; image 1: two rows of 8 lost -> 16 / 64
    assert equivariance_loss(ones, ones, thetas).item() == pytest.approx(0.5 * 16 / 64, rel=1e-5)


def test_equivariance_loss_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="maps_transformed must have the shape of maps"):
        equivariance_loss(torch.rand(2, 8, 8), torch.rand(3, 8, 8), IDENTITY)
    with pytest.raises(ValueError, match=r"maps must have shape \[T, H, W\] or \[B, T, H, W\]"):
        equivariance_loss(torch.rand(8, 8), torch.rand(8, 8), IDENTITY)
    with pytest.raises(ValueError, match=r"theta must have shape \[2, 3\]"):
        equivariance_loss(torch.rand(2, 8, 8), torch.rand(2, 8, 8), IDENTITY[None])
    with pytest.raises(ValueError, match=r"theta must have shape \[B, 2, 3\]"):
        equivariance_loss(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), IDENTITY[None])


# --- per-image and batch losses -----------------------------------------------------------


def _hand_case():
    """maps, maps_transformed, theta and the (sharpening, equivariance) values by hand.

    Candidates (KL on maps) = {0, 1, 2}. In maps_transformed token 1 moved to (0.5, 47.5),
    so the furthest pair among the candidates' transformed locations is (1, 2) (distances
    0-1: 37.0, 0-2: 33.9, 1-2: 37.6); with top_k = 2 the chosen tokens are [1, 2].
    """
    maps = _blob_maps(AMPLITUDES, CORNERS)
    moved = list(CORNERS)
    moved[1] = (0.5, 47.5)
    maps_t = _blob_maps(AMPLITUDES, moved)
    g = [_np_gaussian(cy, cx, SIZE, SIZE, 2.0) for cy, cx in CORNERS]
    g_moved = _np_gaussian(0.5, 47.5, SIZE, SIZE, 2.0)
    # sharpening on maps[[1, 2]]: token 1 is 2 G (target G), token 2 is 1.5 G
    sharp = (np.sum((1.0 * g[1]) ** 2) + np.sum((0.5 * g[2]) ** 2)) / (2 * SIZE * SIZE)
    # equivariance with the identity: token 2 unchanged, token 1 moved
    equi = np.sum((2.0 * g[1] - 2.0 * g_moved) ** 2) / (2 * SIZE * SIZE)
    return maps, maps_t, IDENTITY, sharp, equi


def test_image_keypoint_loss_hand_case():
    maps, maps_t, theta, sharp, equi = _hand_case()
    parts = image_keypoint_loss(maps, maps_t, theta, top_k=2, furthest_point_num_samples=3)
    assert isinstance(parts, LossParts)
    assert parts.sharpening.item() == pytest.approx(sharp, rel=1e-5)
    assert parts.equivariance.item() == pytest.approx(equi, rel=1e-5)
    assert parts.total.item() == pytest.approx(100 * sharp + 1000 * equi, rel=1e-5)
    weighted = image_keypoint_loss(
        maps, maps_t, theta, top_k=2, furthest_point_num_samples=3,
        sharpening_loss_weight=2.0, equivariance_attn_loss_weight=0.5,
    )
    assert weighted.total.item() == pytest.approx(2 * sharp + 0.5 * equi, rel=1e-5)


def test_image_keypoint_loss_whole_pixel_translation_has_no_equivariance_error():
    maps = _blob_maps(AMPLITUDES, CORNERS)
    theta = _translation(-2, 3, SIZE)
    parts = image_keypoint_loss(maps, warp(maps, theta), theta, top_k=2, furthest_point_num_samples=3)
    # chosen = {0, 2} (the diagonal); token 0 is 3 G, token 2 is 1.5 G, targets G
    g0 = _np_gaussian(*CORNERS[0], SIZE, SIZE, 2.0)
    g2 = _np_gaussian(*CORNERS[2], SIZE, SIZE, 2.0)
    sharp = (np.sum((2.0 * g0) ** 2) + np.sum((0.5 * g2) ** 2)) / (2 * SIZE * SIZE)
    assert parts.equivariance.item() < 1e-10
    assert parts.sharpening.item() == pytest.approx(sharp, rel=1e-5)


def test_batch_keypoint_loss_is_mean_of_per_image_losses():
    maps_a, maps_ta, theta_a, sharp_a, equi_a = _hand_case()
    maps_b = _blob_maps(AMPLITUDES, CORNERS)
    theta_b = _translation(-2, 3, SIZE)
    maps_tb = warp(maps_b, theta_b)
    options = dict(top_k=2, furthest_point_num_samples=3)
    parts_b = image_keypoint_loss(maps_b, maps_tb, theta_b, **options)
    batch = batch_keypoint_loss(
        torch.stack([maps_a, maps_b]), torch.stack([maps_ta, maps_tb]),
        torch.stack([theta_a, theta_b]), **options,
    )
    assert batch.sharpening.item() == pytest.approx((sharp_a + parts_b.sharpening.item()) / 2, rel=1e-5)
    assert batch.equivariance.item() == pytest.approx((equi_a + parts_b.equivariance.item()) / 2, rel=1e-5)
    assert batch.total.item() == pytest.approx(
        (100 * sharp_a + 1000 * equi_a + parts_b.total.item()) / 2, rel=1e-5
    )


def test_gradients_flow_through_both_map_sets():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 12, 16, 16, generator=gen, requires_grad=True)
    maps = torch.softmax(logits, dim=1)
    thetas = random_affine(2, generator=gen)
    maps_t = warp(maps, thetas)
    parts = batch_keypoint_loss(maps, maps_t, thetas, top_k=3, furthest_point_num_samples=6)
    assert torch.isfinite(parts.total) and parts.total.item() > 0
    parts.total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_image_and_batch_loss_reject_wrong_shapes():
    maps = torch.rand(6, 8, 8)
    with pytest.raises(ValueError, match=r"maps must have shape \[T, H, W\]"):
        image_keypoint_loss(maps[None], maps[None], IDENTITY)
    with pytest.raises(ValueError, match="maps_transformed must have the shape of maps"):
        image_keypoint_loss(maps, maps[:5], IDENTITY)
    with pytest.raises(ValueError, match=r"theta must have shape \[2, 3\]"):
        image_keypoint_loss(maps, maps, IDENTITY[None])
    with pytest.raises(ValueError, match=r"k must be in \[1, T\] = \[1, 6\]"):
        image_keypoint_loss(maps, maps, IDENTITY)  # 25 candidates from 6 tokens
    with pytest.raises(ValueError, match=r"top_k \(5\) is larger than the number of candidates \(4\)"):
        image_keypoint_loss(maps, maps, IDENTITY, top_k=5, furthest_point_num_samples=4)
    with pytest.raises(ValueError, match=r"maps must have shape \[B, T, H, W\]"):
        batch_keypoint_loss(maps, maps, IDENTITY[None])
    with pytest.raises(ValueError, match=r"thetas must have shape \[B, 2, 3\] = \[2, 2, 3\]"):
        batch_keypoint_loss(torch.rand(2, 6, 8, 8), torch.rand(2, 6, 8, 8), IDENTITY[None])
    with pytest.raises(ValueError, match="maps_transformed must have the shape of maps"):
        batch_keypoint_loss(torch.rand(2, 6, 8, 8), torch.rand(1, 6, 8, 8), IDENTITY.expand(2, 2, 3))
    with pytest.raises(ValueError, match="at least one image"):
        batch_keypoint_loss(torch.rand(0, 6, 8, 8), torch.rand(0, 6, 8, 8), torch.rand(0, 2, 3))
