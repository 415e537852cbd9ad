"""Tests of skp_ray.selection against numpy re-derivations and hand-built cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from skp_ray.selection import (
    furthest_point_sampling,
    gaussian_kl,
    token_pick_counts,
    top_k_gaussian,
    top_voted_tokens,
)


def _np_gaussian(cy: float, cx: float, size: int, sigma: float) -> np.ndarray:
    ys, xs = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    return np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2))


def _np_peaks(m: np.ndarray, num: int, offset: float = 0.5) -> list[tuple[float, float]]:
    """Peaks one at a time, clearing pixels at ``index + offset`` within 0.05 x side of each peak centre."""
    m = m.copy()
    size = m.shape[0]
    ys, xs = np.meshgrid(np.arange(size) + offset, np.arange(size) + offset, indexing="ij")
    peaks = []
    for _ in range(num):
        flat = int(np.argmax(m))
        cy, cx = flat // size + 0.5, flat % size + 0.5
        peaks.append((cy, cx))
        m[np.hypot(ys - cy, xs - cx) <= 0.05 * size] = 0.0
    return peaks


def _np_kl(maps: np.ndarray, sigma: float, num_subjects: int, offset: float = 0.5) -> np.ndarray:
    out = []
    for a in maps.astype(np.float64):
        peaks = _np_peaks(a, num_subjects, offset)
        g = np.mean([_np_gaussian(cy, cx, a.shape[0], sigma) for cy, cx in peaks], 0)
        p = (g + 1e-5) / (g + 1e-5).sum()
        logits = a + 1e-5
        log_q = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        out.append((p * (np.log(p) - log_q)).sum())
    return np.array(out)


def _point_maps(points: list[tuple[int, int]], size: int = 20) -> torch.Tensor:
    """One map per point, 1 at that pixel (argmax centre = point + 0.5)."""
    maps = torch.zeros(len(points), size, size)
    for t, (r, c) in enumerate(points):
        maps[t, r, c] = 1.0
    return maps


def _brute_force_fps(points: np.ndarray, k: int) -> list[int]:
    """Loop transcription of SPEC 1.3's FPS; returns candidate positions."""
    n = len(points)
    dist = lambda a, b: math.dist(points[a], points[b])  # noqa: E731
    best, pair = -1.0, None
    for i in range(n):
        for j in range(i + 1, n):
            if dist(i, j) > best:
                best, pair = dist(i, j), [i, j]
    chosen = pair
    while len(chosen) < k:
        best, pick = -1.0, None
        for c in range(n):
            if c in chosen:
                continue
            d = min(dist(c, s) for s in chosen)
            if d > best:
                best, pick = d, c
        chosen.append(pick)
    return chosen


# --- top_k_gaussian -----------------------------------------------------------------------


@pytest.mark.parametrize(("num_subjects", "sigma"), [(1, 2.0), (2, 2.0), (1, 1.0), (1, 4.0)])
def test_kl_ranking_matches_float64_numpy(num_subjects, sigma):
    gen = torch.Generator().manual_seed(5)
    maps = torch.softmax(3.0 * torch.randn(14, 16, 16, generator=gen), dim=0)
    expected_kl = _np_kl(maps.numpy(), sigma, num_subjects)
    np.testing.assert_allclose(
        gaussian_kl(maps, sigma=sigma, num_subjects=num_subjects).numpy(), expected_kl, rtol=1e-4
    )
    order = np.argsort(expected_kl, kind="stable")
    assert np.diff(np.sort(expected_kl))[:6].min() > 1e-5  # no near-ties that float32 could swap
    got = top_k_gaussian(maps, 6, sigma=sigma, num_subjects=num_subjects)
    assert got.dtype == torch.long
    assert got.tolist() == order[:6].tolist()


def test_kl_ranking_with_the_published_peak_disc_matches_numpy():
    # 16 x 16 maps, radius 0.8: the centred disc clears the peak pixel only, the published one
    # (integer indices to the peak centre) also the pixels one row below, one column right, and both.
    # Smooth maps keep the second highest pixel next to the peak, so the discs give different peaks.
    gen = torch.Generator().manual_seed(5)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(14, 16, 16, generator=gen), 3, stride=1, padding=1)
    maps = torch.softmax(6.0 * smooth, dim=0)
    centred = _np_kl(maps.numpy(), 2.0, 2)
    published = _np_kl(maps.numpy(), 2.0, 2, offset=0.0)
    assert np.abs(published - centred).max() > 1e-3  # the second peak moved for some tokens
    got = gaussian_kl(maps, sigma=2.0, num_subjects=2, peak_disc="published")
    np.testing.assert_allclose(got.numpy(), published, rtol=1e-4)
    assert np.diff(np.sort(published))[:6].min() > 1e-5
    chosen = top_k_gaussian(maps, 6, sigma=2.0, num_subjects=2, peak_disc="published")
    assert chosen.tolist() == np.argsort(published, kind="stable")[:6].tolist()


def test_kl_ranking_hand_built_with_tie():
    size = 24
    g = torch.tensor(_np_gaussian(12.5, 11.5, size, 2.0), dtype=torch.float32)
    # same shape everywhere; a taller peak puts more of Q's mass where P is: lower KL
    maps = torch.stack([0.2 * g, 1.0 * g, 3.0 * g, 1.0 * g])
    assert top_k_gaussian(maps, 4).tolist() == [2, 1, 3, 0]  # tokens 1 and 3 tie: lower id first
    assert top_k_gaussian(maps, 2).tolist() == [2, 1]


def test_top_k_gaussian_rejects_bad_k_and_shape():
    maps = torch.rand(5, 8, 8)
    for k in (0, 6):
        with pytest.raises(ValueError, match=r"k must be in \[1, T\] = \[1, 5\]"):
            top_k_gaussian(maps, k)
    with pytest.raises(ValueError, match=r"maps must have shape \[T, H, W\]"):
        top_k_gaussian(torch.rand(8, 8), 1)


# --- furthest_point_sampling --------------------------------------------------------------


def _fps_case_maps() -> torch.Tensor:
    # token ids -> locations: 7 (0,0), 3 (0,10), 5 (10,0), 0 (19,19), 2 (5,5); others empty-ish
    points = {7: (0, 0), 3: (0, 10), 5: (10, 0), 0: (19, 19), 2: (5, 5)}
    maps = torch.zeros(8, 20, 20)
    maps[:, 1, 1] = 0.5  # unused tokens peak at (1, 1)
    for token, (r, c) in points.items():
        maps[token] = 0.0
        maps[token, r, c] = 1.0
    return maps


def test_fps_hand_case_pair_then_greedy_with_tie():
    maps = _fps_case_maps()
    # pair: (0,0)-(19,19). Then tokens 3 and 5 tie at min distance 10: first in candidate order.
    assert furthest_point_sampling(maps, 5, torch.tensor([7, 3, 5, 0, 2])).tolist() == [7, 0, 3, 5, 2]
    assert furthest_point_sampling(maps, 3, torch.tensor([7, 5, 3, 0, 2])).tolist() == [7, 0, 5]
    # the pair keeps candidate order (i before j)
    assert furthest_point_sampling(maps, 2, torch.tensor([0, 2, 3, 7])).tolist() == [0, 7]


def test_fps_pair_tie_first_in_scan_order():
    # corners of a square: both diagonals have the largest distance
    maps = _point_maps([(0, 0), (0, 10), (10, 10), (10, 0)])
    assert furthest_point_sampling(maps, 2, torch.tensor([0, 1, 2, 3])).tolist() == [0, 2]
    assert furthest_point_sampling(maps, 2, torch.tensor([3, 2, 1, 0])).tolist() == [3, 1]
    # greedy after the pair: 1 and 3 tie at min distance 10, first in candidate order wins
    assert furthest_point_sampling(maps, 4, torch.tensor([0, 1, 2, 3])).tolist() == [0, 2, 1, 3]
    assert furthest_point_sampling(maps, 4, torch.tensor([0, 3, 2, 1])).tolist() == [0, 2, 3, 1]


def test_fps_duplicate_locations_are_still_distinct_picks():
    maps = _point_maps([(2, 2), (2, 2), (15, 15)])
    assert furthest_point_sampling(maps, 3, torch.tensor([0, 1, 2])).tolist() == [0, 2, 1]


def test_fps_matches_loop_transcription_on_random_points():
    gen = np.random.default_rng(3)
    for trial in range(5):
        points = [tuple(p) for p in gen.integers(0, 16, size=(12, 2))]
        maps = _point_maps(points, 16)
        candidates = torch.tensor(gen.permutation(12)[:9])
        expected_pos = _brute_force_fps(np.array([points[c] for c in candidates.tolist()]) + 0.5, 6)
        got = furthest_point_sampling(maps, 6, candidates)
        assert got.tolist() == candidates[expected_pos].tolist(), trial


def test_fps_k_one_returns_first_candidate():
    maps = _point_maps([(0, 0), (5, 5), (9, 9)])
    assert furthest_point_sampling(maps, 1, torch.tensor([2, 0, 1])).tolist() == [2]


def test_fps_rejects_bad_arguments():
    maps = _point_maps([(0, 0), (5, 5), (9, 9)])
    with pytest.raises(ValueError, match=r"top_k \(4\) is larger than the number of candidates \(3\)"):
        furthest_point_sampling(maps, 4, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        furthest_point_sampling(maps, 0, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"candidates must have shape \[C\]"):
        furthest_point_sampling(maps, 1, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"maps must have shape \[T, H, W\]"):
        furthest_point_sampling(maps[0], 1, torch.tensor([0]))


# --- token_pick_counts / top_voted_tokens -------------------------------------------------


def _blob_image(amplitudes: list[float]) -> torch.Tensor:
    # tokens 0..3 at (8,8), (8,24), (24,24), (24,8) of a 32 x 32 map
    locations = [(8.5, 8.5), (8.5, 24.5), (24.5, 24.5), (24.5, 8.5)]
    return torch.tensor(
        np.stack([a * _np_gaussian(cy, cx, 32, 2.0) for a, (cy, cx) in zip(amplitudes, locations)]),
        dtype=torch.float32,
    )


def test_token_pick_counts_hand_case():
    # image A: KL order 0, 1, 2, 3 -> candidates {0, 1, 2}; furthest pair 0-2 (the diagonal)
    # image B: KL order 3, 1, 2, 0 -> candidates {3, 1, 2}; furthest pair 3-1
    image_a = _blob_image([3.0, 2.0, 1.5, 1.0])
    image_b = _blob_image([1.0, 2.0, 1.5, 3.0])
    maps = torch.stack([image_a, image_b, image_a])
    counts = token_pick_counts(maps, top_k=2, furthest_point_num_samples=3)
    assert counts.dtype == torch.long
    assert counts.tolist() == [2, 1, 2, 1]
    assert top_voted_tokens(counts, 3).tolist() == [0, 2, 1]
    # all four candidates and all four picked: every token once per image
    assert token_pick_counts(maps, top_k=4, furthest_point_num_samples=4).tolist() == [3, 3, 3, 3]


def test_token_pick_counts_rejects_3d_maps():
    with pytest.raises(ValueError, match=r"maps must have shape \[N, T, H, W\]"):
        token_pick_counts(torch.rand(4, 8, 8))
    with pytest.raises(ValueError, match=r"top_k \(3\) is larger than the number of candidates \(2\)"):
        token_pick_counts(torch.rand(1, 4, 8, 8), top_k=3, furthest_point_num_samples=2)


def test_top_voted_tokens_ties_by_lower_id():
    counts = torch.tensor([3, 5, 5, 0, 5, 1])
    assert top_voted_tokens(counts, 4).tolist() == [1, 2, 4, 0]
    assert top_voted_tokens(torch.zeros(5, dtype=torch.long), 3).tolist() == [0, 1, 2]
    # many ties across sizes: stable against a python sort
    gen = np.random.default_rng(0)
    values = gen.integers(0, 3, size=40)
    expected = sorted(range(40), key=lambda t: (-values[t], t))[:17]
    assert top_voted_tokens(torch.tensor(values), 17).tolist() == expected


def test_top_voted_tokens_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"k must be in \[1, T\] = \[1, 3\]"):
        top_voted_tokens(torch.tensor([1, 2, 3]), 4)
    with pytest.raises(ValueError, match=r"counts must have shape \[T\]"):
        top_voted_tokens(torch.ones(2, 2), 1)


def test_selection_is_detached():
    maps = torch.rand(6, 8, 8, requires_grad=True)
    assert not gaussian_kl(maps).requires_grad
    candidates = top_k_gaussian(maps, 4)
    assert furthest_point_sampling(maps, 3, candidates).shape == (3,)


def test_fps_pair_is_first_maximum_of_the_i_lt_j_scan_exhaustively():
    # a square's corners plus its centre: two tied diagonals, every candidate order
    points = [(0, 0), (0, 6), (6, 0), (6, 6), (3, 3)]
    maps = _point_maps(points, 8)
    for order in itertools.permutations(range(5)):
        got = furthest_point_sampling(maps, 3, torch.tensor(order)).tolist()
        expected = _brute_force_fps(np.array([points[o] for o in order]) + 0.5, 3)
        assert got == [order[e] for e in expected]
