"""Tests of skp_ray.heatmaps against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from skp_ray.heatmaps import argmax_centres, find_peaks, gaussian_maps, peak_targets


def _np_gaussian(cy: float, cx: float, height: int, width: int, sigma: float) -> np.ndarray:
    ys, xs = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    return np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2))


# --- argmax_centres -----------------------------------------------------------------------


def test_argmax_centres_hand_case_and_first_maximum_wins():
    maps = torch.zeros(2, 4, 5)
    maps[0, 2, 0] = 3.0
    maps[0, 1, 3] = 3.0  # same value, earlier in row-major order -> wins
    maps[1, 3, 4] = 1.0
    centres = argmax_centres(maps)
    assert centres.dtype == torch.float32
    torch.testing.assert_close(centres, torch.tensor([[1.5, 3.5], [3.5, 4.5]]))


def test_argmax_centres_leading_dims_dtype_and_no_gradient():
    maps = torch.rand(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    centres = argmax_centres(maps)
    assert centres.shape == (2, 3, 2) and centres.dtype == torch.float64
    assert not centres.requires_grad
    flat = maps.detach().numpy().reshape(2, 3, -1).argmax(-1)
    np.testing.assert_array_equal(centres[..., 0].numpy(), flat // 7 + 0.5)
    np.testing.assert_array_equal(centres[..., 1].numpy(), flat % 7 + 0.5)


def test_argmax_centres_rejects_1d():
    with pytest.raises(ValueError, match=r"maps must have shape \[\.\.\., H, W\]"):
        argmax_centres(torch.zeros(5))


# --- gaussian_maps ------------------------------------------------------------------------


def test_gaussian_maps_hand_values():
    g = gaussian_maps(torch.tensor([2.5, 1.0]), 4, 1.5)
    assert g.shape == (4, 4)
    # pixel (i, j) centre (i + 0.5, j + 0.5)
    assert g[2, 0].item() == pytest.approx(math.exp(-(0.0**2 + 0.5**2) / (2 * 1.5**2)), rel=1e-6)
    assert g[0, 3].item() == pytest.approx(math.exp(-(2.0**2 + 2.5**2) / (2 * 1.5**2)), rel=1e-6)
    assert g[3, 1].item() == pytest.approx(math.exp(-(1.0**2 + 0.5**2) / (2 * 1.5**2)), rel=1e-6)


def test_gaussian_maps_peak_is_one_at_a_pixel_centre_and_batched_shape():
    centres = torch.tensor([[[3.5, 4.5], [0.5, 0.5]]])
    g = gaussian_maps(centres, 8, 2.0)
    assert g.shape == (1, 2, 8, 8)
    assert g[0, 0, 3, 4].item() == 1.0 and g[0, 1, 0, 0].item() == 1.0
    assert g.max().item() == 1.0
    np.testing.assert_allclose(g[0, 0].numpy(), _np_gaussian(3.5, 4.5, 8, 8, 2.0), rtol=1e-6)


def test_gaussian_maps_rectangular_size():
    g = gaussian_maps(torch.tensor([1.0, 5.0]), (3, 9), 1.0)
    np.testing.assert_allclose(g.numpy(), _np_gaussian(1.0, 5.0, 3, 9, 1.0), rtol=1e-6)


def test_gaussian_maps_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"centres must have shape \[\.\.\., 2\]"):
        gaussian_maps(torch.zeros(3), 4, 1.0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        gaussian_maps(torch.zeros(2), 4, 0.0)


# --- find_peaks ---------------------------------------------------------------------------


def test_find_peaks_two_separated_blobs():
    maps = torch.zeros(2, 20, 20)
    maps[0] = torch.tensor(0.9 * _np_gaussian(4.5, 5.5, 20, 20, 1.5) + _np_gaussian(14.5, 15.5, 20, 20, 1.5))
    maps[1, 2, 17] = 1.0
    maps[1, 16, 3] = 0.7
    peaks = find_peaks(maps, 2)
    assert peaks.shape == (2, 2, 2)
    torch.testing.assert_close(peaks[0], torch.tensor([[14.5, 15.5], [4.5, 5.5]]))
    torch.testing.assert_close(peaks[1], torch.tensor([[2.5, 17.5], [16.5, 3.5]]))
    torch.testing.assert_close(find_peaks(maps, 1), peaks[:, :1])


def test_find_peaks_clears_radius_of_005_side_around_each_peak():
    # H = 40 -> radius 2 pixels; pixels whose centre is within (<=) 2 of a peak are cleared
    maps = torch.zeros(1, 40, 40)
    maps[0, 10, 10] = 1.0
    maps[0, 11, 11] = 0.95  # distance sqrt(2): inside
    maps[0, 10, 12] = 0.9  # distance exactly 2: inside (<=)
    maps[0, 30, 30] = 0.5  # far: the real second peak
    maps[0, 10, 13] = 0.4  # distance 3: survives; third peak
    before = maps.clone()
    peaks = find_peaks(maps, 3)
    torch.testing.assert_close(peaks[0], torch.tensor([[10.5, 10.5], [30.5, 30.5], [10.5, 13.5]]))
    assert torch.equal(maps, before)  # input untouched


def test_find_peaks_radius_scales_with_side():
    # H = 100 -> radius 5: a second blob 4 pixels away is cleared, 6 pixels away is not
    maps = torch.zeros(2, 100, 100)
    maps[:, 50, 50] = 1.0
    maps[0, 50, 54] = 0.8
    maps[0, 90, 90] = 0.1
    maps[1, 50, 56] = 0.8
    peaks = find_peaks(maps, 2)
    torch.testing.assert_close(peaks[:, 1], torch.tensor([[90.5, 90.5], [50.5, 56.5]]))


def test_find_peaks_rejects_bad_num():
    with pytest.raises(ValueError, match="num must be >= 1"):
        find_peaks(torch.zeros(1, 4, 4), 0)


# --- peak_targets -------------------------------------------------------------------------


def test_peak_targets_one_subject_is_gaussian_at_argmax():
    maps = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(0), requires_grad=True)
    target = peak_targets(maps, sigma=2.0)
    assert not target.requires_grad and target.shape == (3, 12, 12)
    for t in range(3):
        flat = int(np.argmax(maps[t].detach().numpy()))
        expected = _np_gaussian(flat // 12 + 0.5, flat % 12 + 0.5, 12, 12, 2.0)
        np.testing.assert_allclose(target[t].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_peak_targets_two_subjects_is_mean_of_two_gaussians():
    maps = torch.zeros(1, 32, 32)
    maps[0, 5, 6] = 1.0
    maps[0, 20, 25] = 0.8
    target = peak_targets(maps, sigma=2.0, num_subjects=2)
    expected = 0.5 * (_np_gaussian(5.5, 6.5, 32, 32, 2.0) + _np_gaussian(20.5, 25.5, 32, 32, 2.0))
    np.testing.assert_allclose(target[0].numpy(), expected, rtol=1e-5, atol=1e-7)
    assert target.max().item() == pytest.approx(0.5, abs=1e-3)


def test_peak_targets_keeps_dtype():
    assert peak_targets(torch.rand(2, 5, 5, dtype=torch.float64), sigma=1.0).dtype == torch.float64
