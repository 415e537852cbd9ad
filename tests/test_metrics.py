"""Each metric against values worked out by hand."""

import numpy as np
import pytest

from skp_ray.metrics import inter_eye_distance, mean_average_error, orientation_invariant_error, pck, visible_error
from skp_ray.regression import swap_left_right


def shifted(truth, offsets_x):
    """truth moved along the second coordinate by the given offsets: errors equal |offset|."""
    prediction = np.array(truth, dtype=float)
    prediction[..., 1] += offsets_x
    return prediction


def test_inter_eye_distance():
    truth = np.tile([[0.4, 0.3], [0.4, 0.7], [0.5, 0.5], [0.6, 0.4], [0.6, 0.6]], (2, 1, 1))  # eyes 0.4 apart
    prediction = shifted(truth, [[0.04, 0, 0.02, 0, 0.04], [0, 0, 0, 0, 0]])
    # image 1: mean error 0.02 / 0.4 = 0.05; image 2: 0
    assert inter_eye_distance(prediction, truth) == pytest.approx(0.025)


def test_visible_error_leaves_out_images_with_nothing_visible():
    truth = np.full((3, 3, 2), 0.5)
    prediction = shifted(truth, [[0.1, 0.2, 0.3], [0.05, 0.05, 0.05], [0.4, 0, 0]])
    visible = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1]], bool)
    # image 1: (0.1 + 0.3) / 2 = 0.2; image 2 left out; image 3: 0.4 / 3
    assert visible_error(prediction, truth, visible) == pytest.approx((0.2 + 0.4 / 3) / 2)


def test_mean_average_error_sums_visible_errors_in_256_pixels():
    truth = np.full((2, 2, 2), 0.5)
    prediction = shifted(truth, [[0.01, 0.02], [0.01, 0.5]])
    visible = np.array([[1, 1], [1, 0]], bool)
    # image 1: 2.56 + 5.12 = 7.68; image 2: 2.56 (the invisible 128 px error is ignored)
    assert mean_average_error(prediction, truth, visible) == pytest.approx((7.68 + 2.56) / 2)


def test_pck_counts_errors_under_6_of_256_pixels():
    truth = np.full((2, 2, 2), 0.5)
    prediction = shifted(truth, [[0.02, 0.03], [0.0, 0.01]])  # 5.12 px in, 7.68 px out; 0 and 2.56 px in
    assert pck(prediction, truth) == pytest.approx((0.5 + 1.0) / 2)


def test_orientation_invariant_error_forgives_a_left_right_flip():
    truth = np.random.default_rng(0).uniform(0.2, 0.8, (2, 32, 2))
    flipped = swap_left_right(truth[:1])  # image 1: predicted mirror-wise, error 0 after the swap
    offset = shifted(truth[1:], 0.01)  # image 2: every landmark 0.01 off -> 1.28 at 128
    assert orientation_invariant_error(np.concatenate([flipped, offset]), truth) == pytest.approx(1.28 / 2)
    assert orientation_invariant_error(offset, truth[1:]) == pytest.approx(1.28)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="must both be"):
        pck(np.zeros((2, 3, 2)), np.zeros((2, 4, 2)))
    with pytest.raises(ValueError, match="visible must be"):
        visible_error(np.zeros((2, 3, 2)), np.zeros((2, 3, 2)), np.ones((2, 2), bool))
