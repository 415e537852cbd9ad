import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from skp_ray.samples import LANDMARK_NAMES, PUPIL_MAX, _render_face, render_samples, write_sample_images

SIZE = 256


def test_shapes_range_and_exact_uint8():
    images, landmarks = render_samples(3, size=SIZE, seed=0)
    assert images.shape == (3, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert landmarks.shape == (3, len(LANDMARK_NAMES), 2) and landmarks.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    # values are exactly k / 255 so a PNG round trip is lossless
    assert torch.equal((images * 255).round() / 255, images)
    assert ((landmarks > 0.02) & (landmarks < 0.98)).all()


def test_deterministic_per_seed_and_prefix_stable():
    a_img, a_lm = render_samples(3, size=64, seed=7)
    b_img, b_lm = render_samples(3, size=64, seed=7)
    assert torch.equal(a_img, b_img) and torch.equal(a_lm, b_lm)
    c_img, c_lm = render_samples(3, size=64, seed=8)
    assert not torch.equal(a_img, c_img) and not torch.equal(a_lm, c_lm)
    d_img, d_lm = render_samples(5, size=64, seed=7)
    assert torch.equal(d_img[:3], a_img) and torch.equal(d_lm[:3], a_lm)


def test_faces_differ_within_a_batch():
    images, landmarks = render_samples(4, size=64, seed=0)
    for i in range(3):
        assert not torch.equal(images[i], images[i + 1])
        assert not torch.allclose(landmarks[i], landmarks[i + 1])


def _pixel(image_hwc: np.ndarray, yx) -> np.ndarray:
    h, w = image_hwc.shape[:2]
    return image_hwc[int(yx[0] * h), int(yx[1] * w)].astype(int)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_landmark_pixels_have_feature_colours(seed):
    face = _render_face(np.random.default_rng(seed), SIZE)
    expected = [face.colours["pupil"]] * 2 + [face.colours["nose"]] + [face.colours["lips"]] * 2
    for name, yx, colour in zip(LANDMARK_NAMES, face.landmarks, expected):
        assert np.abs(_pixel(face.image, yx) - np.array(colour)).max() <= 1, name


def test_public_render_puts_eye_landmarks_on_dark_pupils():
    images, landmarks = render_samples(6, size=SIZE, seed=3)
    pixels = (images * 255).round().permute(0, 2, 3, 1).numpy()
    for img, lm in zip(pixels, landmarks.numpy()):
        for eye in (0, 1):
            assert _pixel(img, lm[eye]).max() <= PUPIL_MAX + 1


@pytest.mark.parametrize("seed", [0, 5])
def test_eye_landmark_is_the_pupil_centroid(seed):
    """Sub-pixel check: the coverage-weighted centre of the pupil is the landmark."""
    face = _render_face(np.random.default_rng(seed), SIZE)
    pupil = np.array(face.colours["pupil"], dtype=np.float64)
    img = face.image.astype(np.float64)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    for eye in (0, 1):
        cy, cx = face.landmarks[eye] * SIZE
        # inside the white of the eye: only white and pupil, anti-aliased in between
        window = np.hypot(ys - cy, xs - cx) < 0.035 * face.scale + 1.5
        coverage = ((255.0 - img) / (255.0 - pupil)).mean(axis=2) * window
        my = (coverage * ys).sum() / coverage.sum()
        mx = (coverage * xs).sum() / coverage.sum()
        assert abs(my - cy) < 0.02 and abs(mx - cx) < 0.02


def test_similarity_transform_rotation_range_and_variety():
    _, landmarks = render_samples(24, size=128, seed=11)
    eyes = landmarks[:, 1] - landmarks[:, 0]  # left eye -> right eye, (dy, dx)
    angles = torch.rad2deg(torch.atan2(eyes[:, 0], eyes[:, 1]))
    assert angles.abs().max() < 21.0  # +/- 20 degrees plus snapping to the supersampled grid
    assert angles.std() > 3.0
    # mouth corners lie below the eyes in the face's own frame
    down = torch.stack([eyes[:, 1], -eyes[:, 0]], dim=1)  # eye line turned 90 degrees, (dy, dx)
    mouth_mid = (landmarks[:, 3] + landmarks[:, 4]) / 2 - (landmarks[:, 0] + landmarks[:, 1]) / 2
    assert ((mouth_mid * down).sum(dim=1) > 0).all()
    sizes = eyes.norm(dim=1)
    assert sizes.max() / sizes.min() > 1.2  # scale varies


def test_write_sample_images_round_trip(tmp_path):
    paths = write_sample_images(tmp_path / "out", n=3, size=64, seed=2)
    assert [os.path.basename(p) for p in paths] == ["sample_000.png", "sample_001.png", "sample_002.png"]
    images, landmarks = render_samples(3, size=64, seed=2)
    table = json.loads((tmp_path / "out" / "landmarks.json").read_text())
    assert list(table) == ["sample_000.png", "sample_001.png", "sample_002.png"]
    for i, path in enumerate(paths):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert np.array_equal(pixels, (images[i] * 255).round().byte().permute(1, 2, 0).numpy())
        np.testing.assert_allclose(table[os.path.basename(path)], landmarks[i].numpy(), atol=1e-6)


def test_write_sample_images_to_fsspec_url():
    import fsspec

    paths = write_sample_images("memory://skp_samples_test", n=2, size=48)
    try:
        assert paths == ["memory://skp_samples_test/sample_000.png", "memory://skp_samples_test/sample_001.png"]
        with fsspec.open(paths[1], "rb") as f:
            assert Image.open(f).size == (48, 48)
        with fsspec.open("memory://skp_samples_test/landmarks.json", "r") as f:
            assert len(json.load(f)) == 2
    finally:
        fsspec.filesystem("memory").rm("/skp_samples_test", recursive=True)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        render_samples(-1)
    with pytest.raises(ValueError):
        render_samples(1, size=8)
    images, landmarks = render_samples(0, size=32)
    assert images.shape == (0, 3, 32, 32) and landmarks.shape == (0, 5, 2)
