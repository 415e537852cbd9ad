import numpy as np
import pytest

from skp_ray.regression import (
    H36M_SWAP_PAIRS,
    PUBLISHED_H36M_SWAP_PAIRS,
    fit_regressor,
    fit_regressor_with_swaps,
    predict_landmarks,
    swap_left_right,
)


def linear_problem(n=40, k=4, m=3, seed=0):
    rng = np.random.default_rng(seed)
    keypoints = rng.uniform(0, 1, (n, k, 2))
    weights = rng.normal(0, 0.3, (2 * k, 2 * m))
    landmarks = ((keypoints.reshape(n, -1) - 0.5) @ weights + 0.5).reshape(n, m, 2)
    return keypoints, landmarks, weights


def test_a_known_linear_map_is_recovered_exactly():
    keypoints, landmarks, weights = linear_problem()
    fitted = fit_regressor(keypoints, landmarks)
    np.testing.assert_allclose(fitted, weights, atol=1e-10)
    np.testing.assert_allclose(predict_landmarks(fitted, keypoints), landmarks, atol=1e-12)
    # the same as an independent least-squares solve of the centred system
    x, y = keypoints.reshape(40, -1) - 0.5, landmarks.reshape(40, -1) - 0.5
    np.testing.assert_allclose(fitted, np.linalg.lstsq(x, y, rcond=None)[0], atol=1e-10)


def test_the_visible_variant_ignores_invisible_entries():
    keypoints, landmarks, weights = linear_problem(n=60, seed=1)
    visible = np.random.default_rng(2).uniform(size=(60, 3)) > 0.3
    corrupted = landmarks.copy()
    corrupted[~visible] = 7.0  # garbage wherever the landmark is not visible
    np.testing.assert_allclose(fit_regressor(keypoints, corrupted, visible), weights, atol=1e-10)
    assert not np.allclose(fit_regressor(keypoints, corrupted), weights, atol=1e-3)


def test_the_swap_variant_recovers_from_left_right_flipped_truth():
    keypoints, landmarks, weights = linear_problem(n=200, k=8, m=32, seed=3)
    flipped = np.random.default_rng(4).permutation(200)[:30]  # more than the 10 that stop the refitting
    truth = landmarks.copy()
    truth[flipped] = swap_left_right(landmarks[flipped])
    fitted, target = fit_regressor_with_swaps(keypoints, truth)
    np.testing.assert_allclose(fitted, weights, atol=1e-8)
    np.testing.assert_allclose(target, landmarks, atol=1e-12)  # every flipped sample swapped back
    assert not np.allclose(fit_regressor(keypoints, truth), weights, atol=1e-3)


def test_swaps_follow_the_pairs_and_the_published_list_reproduces_its_defect():
    landmarks = np.stack([np.arange(32.0), -np.arange(32.0)], axis=-1)[None]  # landmark i holds (i, -i)
    swapped = swap_left_right(landmarks)[0, :, 0]
    for a, b in H36M_SWAP_PAIRS:
        assert (swapped[a], swapped[b]) == (b, a)
    np.testing.assert_array_equal(swap_left_right(swap_left_right(landmarks)), landmarks)
    published = swap_left_right(landmarks, PUBLISHED_H36M_SWAP_PAIRS)[0, :, 0]
    assert (published[20], published[21], published[28], published[29]) == (28, 28, 21, 29)
    assert 20 not in published  # landmark 20 is lost


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="keypoints must be"):
        fit_regressor(np.zeros((4, 6)), np.zeros((4, 2, 2)))
    with pytest.raises(ValueError, match="one row per image"):
        fit_regressor(np.zeros((4, 3, 2)), np.zeros((5, 2, 2)))
    with pytest.raises(ValueError, match="visible must be"):
        fit_regressor(np.zeros((4, 3, 2)), np.zeros((4, 2, 2)), np.ones((4, 3), bool))


def test_ten_or_fewer_closer_to_the_swap_are_left_as_they_are():
    keypoints, landmarks, _ = linear_problem(n=200, k=8, m=32, seed=3)
    truth = landmarks.copy()
    truth[:5] = swap_left_right(landmarks[:5])
    fitted, target = fit_regressor_with_swaps(keypoints, truth)
    np.testing.assert_array_equal(target, truth)  # SPEC 1.6 swaps only while more than 10 samples qualify
    np.testing.assert_allclose(fitted, fit_regressor(keypoints, truth))
