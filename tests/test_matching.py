"""DIFT matching and PCK (SPEC 2), each checked against an independent computation."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skp_ray.correspondence.matching import bilinear_weights, feature_vectors_at, match_points
from skp_ray.correspondence.pck import correspondence_pck, image_size_box, summarise_pck


def upsample(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The reference: F.interpolate's full map, [C, H, W]."""
    return F.interpolate(features[None], size=size, mode="bilinear", align_corners=False)[0]


def brute_force_match(source, target, points_xy, source_size, target_size):
    """Upsample both maps in full, cosine with plain torch ops in float64, first argmax in row-major order."""
    source_map = upsample(source.double(), source_size)
    target_map = upsample(target.double(), target_size)
    queries = torch.stack([source_map[:, y, x] for x, y in points_xy.tolist()])
    flat = target_map.flatten(1)
    cosine = (queries @ flat) / (queries.norm(dim=1, keepdim=True).clamp_min(1e-12) * flat.norm(dim=0).clamp_min(1e-12))
    # F.interpolate leaves ulp-level noise between pixels that are equal in exact arithmetic (those
    # past the last cell centre repeat the edge cell); such ties go to the first pixel, as in exact math.
    best = cosine.max(dim=1, keepdim=True).values
    index = torch.tensor([int(np.flatnonzero(row)[0]) for row in (cosine >= best - 1e-12).numpy()])
    width = target_size[1]
    return torch.stack([index % width, index // width], dim=1), cosine.max(dim=1).values


def all_pixels(height: int, width: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)


# --- bilinear weights and source vectors ---------------------------------------------------------


@pytest.mark.parametrize(
    "out_size, in_size", [(7, 3), (12, 4), (13, 6), (3, 7), (4, 13), (5, 5), (1, 4), (4, 1), (9, 2)]
)
def test_bilinear_weights_equal_interpolate_of_each_basis_vector(out_size, in_size):
    basis = torch.eye(in_size, dtype=torch.float64).reshape(1, in_size, in_size, 1)  # channel k = e_k along height
    reference = F.interpolate(basis, size=(out_size, 1), mode="bilinear", align_corners=False)[0, :, :, 0].T
    weights = bilinear_weights(out_size, in_size)
    assert weights.shape == (out_size, in_size) and weights.dtype == torch.float64
    torch.testing.assert_close(weights, reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(out_size, dtype=torch.float64))


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 3e-6)])
def test_separable_weights_reproduce_2d_interpolate(dtype, atol):
    features = torch.randn(3, 9, 5, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for size in [(4, 13), (23, 11), (9, 5)]:
        rows, columns = bilinear_weights(size[0], 9, dtype=dtype), bilinear_weights(size[1], 5, dtype=dtype)
        torch.testing.assert_close(rows @ features @ columns.T, upsample(features, size), rtol=0, atol=atol)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("image_size", [(13, 21), (4, 3), (5, 7), (1, 1), (6, 2)])
def test_source_vectors_equal_interpolated_map_read_at_each_pixel(dtype, atol, image_size):
    features = torch.randn(6, 5, 7, generator=torch.Generator().manual_seed(1), dtype=dtype)
    points = all_pixels(*image_size)
    vectors = feature_vectors_at(features, points, image_size=image_size)
    reference = upsample(features, image_size)[:, points[:, 1], points[:, 0]].T
    assert vectors.dtype == dtype
    torch.testing.assert_close(vectors, reference, rtol=0, atol=atol)


def test_source_of_a_huge_image_is_never_upsampled_in_full():
    # 4 x 10^10 values if it were; the corner pixel's taps clamp to the corner cell exactly.
    features = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(2))
    vectors = feature_vectors_at(features, [[0, 0], [99_999, 99_999], [0, 99_999]], image_size=(100_000, 100_000))
    torch.testing.assert_close(vectors, features[:, [0, 2, 2], [0, 2, 0]].T, rtol=0, atol=0)


# --- matching ------------------------------------------------------------------------------------


def test_one_hot_features_match_their_known_positions():
    # Source: 4 x 5 cells, cell (i, j) holds channel 5i + j; image 12 x 5 (rows x3, columns x1), so
    # pixel (x=j, y=3i+1) reads cell (i, j). Target: 7 x 6 cells, channel 5i + j at cell
    # (row 1 + j, column 1 + i), a filler channel elsewhere; image 21 x 30 (rows x3, columns x5),
    # so cell (r, c) is read purely at pixel (x=5c+2, y=3r+1) and blended everywhere else.
    channels = 21
    source = torch.zeros(channels, 4, 5)
    target = torch.zeros(channels, 7, 6)
    target[channels - 1] = 1.0
    queries, expected = [], []
    for i in range(4):
        for j in range(5):
            source[5 * i + j, i, j] = 1.0
            target[:, 1 + j, 1 + i] = 0.0
            target[5 * i + j, 1 + j, 1 + i] = 1.0
            queries.append([j, 3 * i + 1])
            expected.append([5 * (1 + i) + 2, 3 * (1 + j) + 1])
    for max_elements in (2**26, 1):
        predicted, scores = match_points(
            source, target, torch.tensor(queries), source_size=(12, 5), target_size=(21, 30), max_elements=max_elements
        )
        assert predicted.dtype == torch.long and scores.dtype == torch.float32
        assert predicted.tolist() == expected
        torch.testing.assert_close(scores, torch.ones(20), rtol=0, atol=1e-6)


def tie_case():
    """Target pixels with identical vectors; every value and unit query exact in binary."""
    v, u = torch.tensor([1.0, 1, 1, 1]), torch.tensor([1.0, -1, 1, -1])  # unit vectors are +-0.5: exact
    target = torch.randint(-3, 4, (4, 4, 5), generator=torch.Generator().manual_seed(3)).double()
    target[:, 0, 3] = target[:, 2, 1] = v  # across rows: (x=3, y=0) comes first in row-major order
    target[:, 1, 0] = target[:, 1, 2] = u  # within a row: (x=0, y=1) comes first
    source = torch.zeros(4, 2, 2, dtype=torch.float64)
    source[:, 0, 0], source[:, 1, 1] = v, u
    return source, target


def test_exact_ties_resolve_to_the_first_pixel_in_row_major_order_whatever_the_bands():
    source, target = tie_case()
    flat = F.normalize(target.flatten(1), dim=0)
    for query in (source[:, 0, 0], source[:, 1, 1]):  # the tie is real: nothing else comes close
        cosine = F.normalize(query, dim=0) @ flat
        assert (cosine == cosine.max()).sum() == 2 and (cosine < cosine.max() - 1e-3).sum() == 18
    # a band row costs (5 N + 16) x W = 130 elements: bands of 1 row (the tie spans bands 0 and 2),
    # 2 rows (band boundary between rows 1 and 2, inside the tie), untiled
    for max_elements in (1, 130, 2 * 130, 2**26):
        predicted, scores = match_points(
            source, target, [[0, 0], [1, 1]], source_size=(2, 2), target_size=(4, 5), max_elements=max_elements
        )
        assert predicted.tolist() == [[3, 0], [0, 1]], max_elements
        torch.testing.assert_close(scores, torch.ones(2), rtol=0, atol=1e-7)


def test_pixels_past_the_last_cell_centres_tie_exactly_and_the_first_wins():
    # Upsampling 3 x 4 cells to 10 x 13 pixels, a pixel reads only the last row of cells when
    # (y + 0.5) * 3 / 10 - 0.5 >= 2 (y >= 8), the last column when (x + 0.5) * 4 / 13 - 0.5 >= 3
    # (x >= 11), the first row when the source position is <= 0 (y <= 1). F.interpolate leaves
    # ulp noise inside such blocks; here they are exact copies, so a self-match of a corner lands
    # on the block's first pixel in row-major order, whatever the bands.
    features = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    size = (10, 13)
    upsampled = upsample(features, size)
    torch.testing.assert_close(upsampled[:, 8:, 11:], features[:, 2:, 3:].expand(6, 2, 2), rtol=0, atol=1e-15)
    torch.testing.assert_close(upsampled[:, :2, 11:], features[:, :1, 3:].expand(6, 2, 2), rtol=0, atol=1e-15)
    for max_elements in (1, 2**26):
        predicted, scores = match_points(
            features, features, [[12, 9], [12, 0]], source_size=size, target_size=size, max_elements=max_elements
        )
        assert predicted.tolist() == [[11, 8], [11, 0]]
        torch.testing.assert_close(scores, torch.ones(2), rtol=0, atol=1e-7)


def random_pair(dtype):
    generator = torch.Generator().manual_seed(4)
    source = torch.randn(8, 5, 6, generator=generator, dtype=dtype)
    target = torch.randn(8, 7, 4, generator=generator, dtype=dtype)
    source_size, target_size = (17, 23), (29, 13)
    points = torch.stack(
        [torch.randint(0, 23, (40,), generator=generator), torch.randint(0, 17, (40,), generator=generator)], dim=1
    )
    points = torch.cat([points, torch.tensor([[0, 0], [22, 0], [0, 16], [22, 16]])])
    return source, target, points, source_size, target_size


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 6e-8), (torch.float32, 1e-5)])  # scores come back float32
def test_tiled_and_untiled_equal_brute_force(dtype, atol):
    source, target, points, source_size, target_size = random_pair(dtype)
    expected_xy, expected_scores = brute_force_match(source, target, points, source_size, target_size)
    row_cost = (5 * len(points) + 16) * target_size[1]
    untiled = match_points(source, target, points, source_size=source_size, target_size=target_size)
    assert torch.equal(untiled[0], expected_xy)
    torch.testing.assert_close(untiled[1].double(), expected_scores, rtol=0, atol=atol)
    for rows in (1, 3, 28):  # 29, 10 and 2 bands
        tiled = match_points(
            source, target, points, source_size=source_size, target_size=target_size, max_elements=rows * row_cost
        )
        assert torch.equal(tiled[0], untiled[0]) and torch.equal(tiled[1], untiled[1]), rows  # bitwise


def test_batched_low_precision_and_mixed_inputs():
    source, target, points, source_size, target_size = random_pair(torch.float32)
    expected = match_points(source, target, points, source_size=source_size, target_size=target_size)
    batched = match_points(source[None], target[None], points.numpy(), source_size=source_size, target_size=target_size)
    assert torch.equal(batched[0], expected[0]) and torch.equal(batched[1], expected[1])
    low = match_points(source.bfloat16(), target.half(), points, source_size=source_size, target_size=target_size)
    rounded = match_points(
        source.bfloat16().float(), target.half().float(), points, source_size=source_size, target_size=target_size
    )
    assert torch.equal(low[0], rounded[0]) and low[1].dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matching_on_gpu_equals_cpu():
    source, target, points, source_size, target_size = random_pair(torch.float32)
    on_cpu = match_points(source, target, points, source_size=source_size, target_size=target_size)
    on_gpu = match_points(source.cuda(), target.cuda(), points, source_size=source_size, target_size=target_size)
    assert on_gpu[0].is_cuda and on_gpu[1].is_cuda
    assert torch.equal(on_gpu[0].cpu(), on_cpu[0])
    torch.testing.assert_close(on_gpu[1].cpu(), on_cpu[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        feature_vectors_at(source.cuda(), points, image_size=source_size).cpu(),
        feature_vectors_at(source, points, image_size=source_size),
        rtol=0,
        atol=1e-5,
    )


def test_zero_vectors_give_zero_cosine_not_nan():
    source = torch.zeros(3, 2, 2)
    target = torch.zeros(3, 2, 2)
    target[0, 1, 1] = 1.0
    predicted, scores = match_points(source, target, [[1, 1]], source_size=(2, 2), target_size=(2, 2))
    assert predicted.tolist() == [[0, 0]] and scores.tolist() == [0.0]


@pytest.mark.parametrize(
    "points, message",
    [
        ([[0, 0], [5, 1]], r"source_points_xy\[1\] = \(x=5, y=1\) lies outside its image of size \(H=3, W=5\)"),
        ([[0, 3]], r"source_points_xy\[0\] = \(x=0, y=3\)"),
        ([[-1, 0]], r"x=-1"),
        ([[0, 0, 0]], r"\[N, 2\]"),
    ],
)
def test_points_outside_the_image_or_misshapen_are_refused(points, message):
    features = torch.zeros(2, 3, 3)
    with pytest.raises(ValueError, match=message):
        match_points(features, features, points, source_size=(3, 5), target_size=(3, 3))


def test_other_bad_inputs_are_refused_with_clear_errors():
    features = torch.zeros(2, 3, 3)
    sizes = dict(source_size=(3, 3), target_size=(3, 3))
    with pytest.raises(TypeError, match="integer pixel indices"):
        match_points(features, features, [[0.5, 1.0]], **sizes)
    with pytest.raises(ValueError, match="2 channels but target_features has 4"):
        match_points(features, torch.zeros(4, 3, 3), [[0, 0]], **sizes)
    with pytest.raises(ValueError, match=r"target_features must be \[C, h, w\] or \[1, C, h, w\]"):
        match_points(features, torch.zeros(2, 2, 3, 3), [[0, 0]], **sizes)
    with pytest.raises(TypeError, match="floating-point"):
        match_points(features.long(), features, [[0, 0]], **sizes)
    with pytest.raises(ValueError, match=r"target_size must be the original image's \(H, W\)"):
        match_points(features, features, [[0, 0]], source_size=(3, 3), target_size=(3, 0))
    with pytest.raises(ValueError, match="max_elements"):
        match_points(features, features, [[0, 0]], max_elements=0, **sizes)


# --- PCK -----------------------------------------------------------------------------------------


def test_pck_threshold_is_inclusive_and_uses_the_larger_box_side():
    box = (10, 20, 60, 50)  # width 50, height 30: threshold 0.1 x 50 = 5
    predicted = [[0, 0], [0, 0], [0, 0], [7, 7], [0, 0]]
    truth = [[3, 4], [0, 5.0001], [0, -5], [7, 7], [4.9, 0]]  # 5 (3-4-5), 5.0001, 5, 0, 4.9
    hits, fraction = correspondence_pck(predicted, truth, box_xyxy=box)
    assert hits.dtype == bool and hits.tolist() == [True, False, True, True, True]
    assert fraction == 0.8 and isinstance(fraction, float)
    hits, _ = correspondence_pck(predicted, truth, box_xyxy=box, alpha=0.05)  # threshold 2.5
    assert hits.tolist() == [False, False, False, True, False]


def test_pck_box_size_has_no_plus_one():
    # With +1 the threshold would be 0.1 x 51 = 5.1 and an error of 5.05 would count.
    hits, _ = correspondence_pck([[0, 0]], [[5.05, 0]], box_xyxy=(0, 0, 50, 30))
    assert hits.tolist() == [False]
    assert image_size_box(30, 50) == (0, 0, 50, 30)
    hits, _ = correspondence_pck([[0, 0], [0, 0]], [[3, 4], [5.05, 0]], box_xyxy=image_size_box(height=30, width=50))
    assert hits.tolist() == [True, False]


def test_pck_of_integer_inputs_does_not_overflow():
    # 400^2 overflows int16: the distance must come from float64 values.
    predicted = np.array([[0, 0]], dtype=np.int16)
    truth = np.array([[300, 400]], dtype=np.int16)
    hits, _ = correspondence_pck(predicted, truth, box_xyxy=np.array([0, 0, 5000, 3000], dtype=np.int16))
    assert hits.tolist() == [True]  # 500 <= 0.1 x 5000
    box = torch.tensor([0, 0, 50, 30])
    hits, fraction = correspondence_pck(torch.tensor([[0, 0]]), torch.tensor([[3, 4]]), box_xyxy=box)
    assert hits.tolist() == [True] and fraction == 1.0


def test_pck_of_float32_inputs_is_computed_in_float64():
    box = np.array([0.3, 0.0, 50.3, 30.0], dtype=np.float32)
    # In float32 the width rounds to exactly 50 and the 3-4-5 error of 5 would count ...
    width32 = box[2] - box[0]
    assert width32 == np.float32(50.0) and np.float32(5.0) <= np.float32(0.1) * width32
    # ... but the stored values are 50.2999992 and 0.3000000119: in float64 the threshold is below 5.
    assert 0.1 * (float(box[2]) - float(box[0])) < 5.0
    predicted = np.zeros((1, 2), dtype=np.float32)
    truth = np.array([[3, 4]], dtype=np.float32)
    hits, fraction = correspondence_pck(predicted, truth, box_xyxy=box)
    assert hits.tolist() == [False] and fraction == 0.0
    hits, _ = correspondence_pck(torch.from_numpy(predicted), torch.from_numpy(truth), box_xyxy=torch.from_numpy(box))
    assert hits.tolist() == [False]


@pytest.mark.parametrize(
    "predicted, truth, box, alpha, message",
    [
        ([[0, 0, 0]], [[0, 0, 0]], (0, 0, 1, 1), 0.1, r"predicted_xy must be \[N, 2\]"),
        ([[0, 0]], [[0, 0], [1, 1]], (0, 0, 1, 1), 0.1, "predicted_xy has 1 points but true_xy has 2"),
        (np.zeros((0, 2)), np.zeros((0, 2)), (0, 0, 1, 1), 0.1, "N >= 1"),
        ([[0, 0]], [[0, 0]], (0, 0, 1), 0.1, r"box_xyxy must be 4 finite numbers"),
        ([[0, 0]], [[0, 0]], (5, 0, 5, 10), 0.1, "x2 > x1 and y2 > y1"),
        ([[0, 0]], [[0, 0]], (0, 0, 1, 1), 0.0, "alpha must be a positive number"),
    ],
)
def test_pck_refuses_bad_inputs(predicted, truth, box, alpha, message):
    with pytest.raises(ValueError, match=message):
        correspondence_pck(predicted, truth, box_xyxy=box, alpha=alpha)


def test_summary_per_image_and_per_point_differ_when_pairs_have_different_point_counts():
    pairs = [
        {"category": "cat", "hits": {0.1: np.array([1, 1, 1, 0], bool), 0.05: np.array([1, 0, 0, 0], bool)}},
        {"category": "cat", "hits": {0.1: np.array([0], bool), 0.05: np.array([0], bool)}},
        {"category": "dog", "hits": {0.1: np.array([1, 1], bool), 0.05: np.array([1, 0], bool)}},
        {"category": "", "hits": {0.1: np.array([1, 0, 0], bool), 0.05: np.array([0, 0, 1], bool)}},
    ]
    summary = summarise_pck(iter(pairs))
    assert summary["alphas"] == [0.05, 0.1]
    overall = summary["overall"]
    assert (overall["pairs"], overall["points"]) == (4, 10)
    assert overall["pck@0.1"]["per_image"] == pytest.approx((3 / 4 + 0 + 1 + 1 / 3) / 4)
    assert overall["pck@0.1"]["per_point"] == pytest.approx(6 / 10)
    assert overall["pck@0.05"]["per_image"] == pytest.approx((1 / 4 + 0 + 1 / 2 + 1 / 3) / 4)
    assert overall["pck@0.05"]["per_point"] == pytest.approx(3 / 10)
    per_category = summary["per_category"]
    assert list(per_category) == ["", "cat", "dog"]
    cat = per_category["cat"]
    assert (cat["pairs"], cat["points"]) == (2, 5)
    assert cat["pck@0.1"] == pytest.approx({"per_image": 0.375, "per_point": 0.6})
    assert cat["pck@0.05"] == pytest.approx({"per_image": 0.125, "per_point": 0.2})
    assert per_category["dog"]["pck@0.05"] == {"per_image": 0.5, "per_point": 0.5}
    assert per_category[""]["pck@0.1"] == pytest.approx({"per_image": 1 / 3, "per_point": 1 / 3})
    assert json.loads(json.dumps(summary)) == summary  # plain python types only
    assert type(overall["pck@0.1"]["per_image"]) is float


def test_summary_of_no_pairs_has_zero_counts_and_no_values():
    empty = {"pairs": 0, "points": 0, "pck@0.1": {"per_image": None, "per_point": None}}
    assert summarise_pck([], alphas=(0.1,)) == {"alphas": [0.1], "overall": empty, "per_category": {}}


def test_summary_refuses_pairs_without_the_requested_alpha():
    with pytest.raises(ValueError, match="pair 0 has no hits for alpha 0.05"):
        summarise_pck([{"category": "cat", "hits": {0.1: np.array([True])}}])
    with pytest.raises(ValueError, match="non-empty 1-D bool array"):
        summarise_pck([{"category": "cat", "hits": {0.1: np.array([1, 0])}}], alphas=(0.1,))
