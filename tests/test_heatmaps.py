"""Tests of skp_ray.heatmaps against hand computations."""

from __future__ import annotations

import math
import re

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


def _disc_case() -> torch.Tensor:
    """H = 20 -> radius 1. Peak at pixel (5, 5); the centred disc clears (4, 5), (6, 5), (5, 4), (5, 6),
    the published one (index to the centre (5.5, 5.5)) clears (5, 6), (6, 5), (6, 6)."""
    maps = torch.zeros(1, 20, 20)
    maps[0, 5, 5] = 1.0
    maps[0, 6, 6] = 0.9  # centred: distance sqrt(2) > 1, survives; published: sqrt(0.5), cleared
    maps[0, 4, 5] = 0.8  # centred: distance 1, cleared; published: sqrt(2.5), survives
    return maps


def test_find_peaks_centred_and_published_discs_clear_different_pixels():
    maps = _disc_case()
    centred = find_peaks(maps, 2)
    torch.testing.assert_close(centred[0], torch.tensor([[5.5, 5.5], [6.5, 6.5]]))
    torch.testing.assert_close(find_peaks(maps, 2, peak_disc="centred"), centred)
    published = find_peaks(maps, 2, peak_disc="published")
    torch.testing.assert_close(published[0], torch.tensor([[5.5, 5.5], [4.5, 5.5]]))


def test_find_peaks_published_disc_is_shifted_half_a_pixel():
    # H = 40 -> radius 2 around the centre (10.5, 10.5), measured to integer indices:
    # (12, 10) is 1.5 + 0.5 -> sqrt(2.5) away (cleared), (8, 10) is 2.5, 0.5 -> sqrt(6.5) (survives)
    maps = torch.zeros(1, 40, 40)
    maps[0, 10, 10] = 1.0
    maps[0, 12, 10] = 0.9
    maps[0, 8, 10] = 0.8
    published = find_peaks(maps, 2, peak_disc="published")
    torch.testing.assert_close(published[0, 1], torch.tensor([8.5, 10.5]))
    # centred: (12, 10) and (8, 10) are both exactly 2 away, both cleared; the next is 0 at (0, 0)
    torch.testing.assert_close(find_peaks(maps, 2)[0, 1], torch.tensor([0.5, 0.5]))


def test_unknown_peak_disc_is_refused():
    message = re.escape("peak_disc must be one of 'centred', 'published'; got 'corner'")
    with pytest.raises(ValueError, match=message):
        find_peaks(torch.zeros(1, 4, 4), 2, peak_disc="corner")
    with pytest.raises(ValueError, match=message):
        peak_targets(torch.zeros(1, 4, 4), sigma=1.0, peak_disc="corner")


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


def test_peak_targets_published_disc_averages_the_other_second_peak():
    target = peak_targets(_disc_case(), sigma=2.0, num_subjects=2, peak_disc="published")
    expected = 0.5 * (_np_gaussian(5.5, 5.5, 20, 20, 2.0) + _np_gaussian(4.5, 5.5, 20, 20, 2.0))
    np.testing.assert_allclose(target[0].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_peak_targets_keeps_dtype():
    assert peak_targets(torch.rand(2, 5, 5, dtype=torch.float64), sigma=1.0).dtype == torch.float64


# --- peak_disc reaches find_peaks from every caller ----------------------------------------


def test_peak_disc_is_passed_down_to_find_peaks(tiny, monkeypatch):
    import skp_ray.heatmaps as heatmaps
    from skp_ray.detection import count_token_picks
    from skp_ray.losses import batch_keypoint_loss, image_keypoint_loss, sharpening_loss
    from skp_ray.optimization import training_loss
    from skp_ray.selection import token_pick_counts, top_k_gaussian

    seen = []
    original = heatmaps.find_peaks

    def recording_find_peaks(maps, num, *, peak_disc="centred"):
        seen.append((num, peak_disc))
        return original(maps, num, peak_disc=peak_disc)

    monkeypatch.setattr(heatmaps, "find_peaks", recording_find_peaks)
    maps = torch.rand(2, 6, 16, 16, generator=torch.Generator().manual_seed(0))
    identity = torch.eye(2, 3).expand(2, 2, 3)
    options = dict(num_subjects=2, peak_disc="published")
    small = dict(top_k=2, furthest_point_num_samples=3)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    context = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    model = dict(image_size=64, feature_upsample_res=16, generator=torch.Generator().manual_seed(3))
    calls = {
        "sharpening_loss": lambda: sharpening_loss(maps[0], **options),
        "top_k_gaussian": lambda: top_k_gaussian(maps[0], 3, **options),
        "token_pick_counts": lambda: token_pick_counts(maps, **small, **options),
        "image_keypoint_loss": lambda: image_keypoint_loss(maps[0], maps[1], identity[0], **small, **options),
        "batch_keypoint_loss": lambda: batch_keypoint_loss(maps, maps, identity, **small, **options),
        "training_loss": lambda: training_loss(tiny, images, context, **small, **options, **model),
        "count_token_picks": lambda: count_token_picks(tiny, images, context, **small, **options, **model),
    }
    for name, call in calls.items():
        seen.clear()
        call()
        assert seen and set(seen) == {(2, "published")}, name


def test_training_and_token_picks_refuse_an_unknown_peak_disc_before_the_model_runs():
    from skp_ray.detection import count_token_picks
    from skp_ray.optimization import training_loss

    images, context = torch.rand(1, 3, 8, 8), torch.zeros(4, 32)
    for call in (training_loss, count_token_picks):
        with pytest.raises(ValueError, match="peak_disc must be one of 'centred', 'published'; got 'disc'"):
            call(None, images, context, peak_disc="disc")  # no model: refused before it is needed
