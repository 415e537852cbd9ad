import re

import pytest
import torch

import skp_ray.detection as detection
from skp_ray.detection import count_token_picks, detect_keypoints, draw_augmentations, select_keypoint_tokens
from skp_ray.geometry import random_affine, warp


def _blob_maps(peaks_yx, size, sigma=3.0):
    """Maps [K, size, size], one Gaussian blob each, centred at normalised (y, x)."""
    coords = torch.arange(size, dtype=torch.float64) + 0.5
    maps = []
    for y, x in peaks_yx:
        maps.append(torch.exp(-((coords[:, None] - y * size) ** 2 + (coords[None, :] - x * size) ** 2) / (2 * sigma**2)))
    return torch.stack(maps).float()


class _FakeMaps:
    """Stands in for attention_maps: each copy 'sees' the known maps carried along by its warp.

    A keypoint at a fixed spot of the object moves with the image, so the maps of
    warp(image, theta) are warp(maps, theta); detection must undo that.
    """

    def __init__(self, maps, thetas, res=128):
        self.maps = torch.nn.functional.interpolate(maps[None], size=(res, res), mode="bilinear", align_corners=False)[0]
        self.thetas = thetas
        self.calls = []

    def __call__(self, diffusion, copies, context, *, token_indices, **options):
        self.calls.append(len(copies))
        thetas = self.thetas[len(self.calls) - 1]
        return warp(self.maps.expand(len(copies), -1, -1, -1), thetas)[:, : len(token_indices)]


class _NoModel:
    image_size = 64


def test_detection_recovers_known_peaks_through_augmentation(monkeypatch):
    size, augmentations = 64, 6
    peaks = [(0.25, 0.75), (0.5, 0.5), (0.7, 0.3)]
    thetas = random_affine(2 * augmentations, degrees=10, scale=(0.9, 1.0), translate=(0.1, 0.1),
                           generator=torch.Generator().manual_seed(0)).unflatten(0, (2, augmentations))
    fake = _FakeMaps(_blob_maps(peaks, size), thetas, res=size)
    monkeypatch.setattr(detection, "attention_maps", fake)
    keypoints, values = detect_keypoints(
        _NoModel(), torch.rand(2, 3, size, size), torch.zeros(3, 4), [0, 1, 2], thetas=thetas, copies_per_call=augmentations
    )
    assert fake.calls == [augmentations, augmentations]  # one batch per image
    assert keypoints.shape == (2, 3, 2) and values.shape == (2, 3)
    expected = torch.tensor(peaks).expand(2, -1, -1)
    assert (keypoints - expected).abs().max() <= 1.0 / size  # within a pixel of the truth
    assert (values > 0.8).all()


def test_weighted_average_finds_subpixel_peak(monkeypatch):
    size = 64
    peaks = [(20.3 / size, 40.7 / size)]
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(1, 1, 2, 3)
    monkeypatch.setattr(detection, "attention_maps", _FakeMaps(_blob_maps(peaks, size, sigma=2.0), identity, res=size))
    hard, _ = detect_keypoints(_NoModel(), torch.rand(1, 3, size, size), torch.zeros(1, 4), [0], thetas=identity, copies_per_call=1)
    monkeypatch.setattr(detection, "attention_maps", _FakeMaps(_blob_maps(peaks, size, sigma=2.0), identity, res=size))
    soft, _ = detect_keypoints(
        _NoModel(), torch.rand(1, 3, size, size), torch.zeros(1, 4), [0], thetas=identity, weighted_avg=True, copies_per_call=1
    )
    assert hard[0, 0].tolist() == [20.5 / size, 40.5 / size]  # argmax pixel centre
    # Within 5 px of the argmax the blob is nearly symmetric about its true centre.
    torch.testing.assert_close(soft[0, 0], torch.tensor(peaks[0]), atol=0.05 / size, rtol=0)


def test_detection_on_tiny_model_is_seeded_and_in_range(tiny):
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    context = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    options = dict(augmentation_iterations=3, image_size=128, feature_upsample_res=32)
    first = detect_keypoints(tiny, images, context, [5, 2, 7], generator=torch.Generator().manual_seed(2), **options)
    again = detect_keypoints(tiny, images, context, [5, 2, 7], generator=torch.Generator().manual_seed(2), **options)
    other = detect_keypoints(tiny, images, context, [5, 2, 7], generator=torch.Generator().manual_seed(3), **options)
    assert first[0].shape == (2, 3, 2) and first[1].shape == (2, 3)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])
    assert ((first[0] > 0) & (first[0] < 1)).all()
    assert ((first[1] > 0) & (first[1] < 1)).all()  # averaged softmax values


def test_identity_augmentation_is_the_argmax_of_the_resized_maps(tiny):
    from skp_ray.attention import attention_maps

    images = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    context = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(1, 1, 2, 3)
    noise = torch.randn(1, 1, 4, 16, 16, generator=torch.Generator().manual_seed(2))  # [B, A, C, h, w]
    keypoints, _ = detect_keypoints(tiny, images, context, [3, 6], thetas=identity, image_size=128, noise=noise)
    maps = attention_maps(tiny, images, context, noise=noise[0], image_size=128)[0, [3, 6]]
    maps = torch.nn.functional.interpolate(maps[None], size=(128, 128), mode="bilinear", align_corners=False)[0]
    flat = maps.flatten(1).argmax(dim=1)
    expected = torch.stack([flat // 128 + 0.5, flat % 128 + 0.5], dim=1) / 128
    torch.testing.assert_close(keypoints[0], expected)


def test_given_noise_replays_a_generator_driven_run(tiny):
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    context = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    options = dict(image_size=128, feature_upsample_res=32)
    generator = torch.Generator().manual_seed(2)
    drawn = detect_keypoints(tiny, images, context, [5, 2, 7], augmentation_iterations=3, generator=generator, **options)
    # the generator's draws in order: all B x A transforms, then each image's A latent noises [4, 16, 16]
    generator = torch.Generator().manual_seed(2)
    thetas = random_affine(6, generator=generator).unflatten(0, (2, 3))
    noise = torch.stack([torch.randn(3, 4, 16, 16, generator=generator) for _ in range(2)])
    replayed = detect_keypoints(tiny, images, context, [5, 2, 7], thetas=thetas, noise=noise, **options)
    assert torch.equal(replayed[0], drawn[0]) and torch.equal(replayed[1], drawn[1])
    # no generator needed, and other noise gives other maps
    again = detect_keypoints(tiny, images, context, [5, 2, 7], thetas=thetas, noise=noise, **options)
    assert torch.equal(again[1], drawn[1])
    other = detect_keypoints(tiny, images, context, [5, 2, 7], thetas=thetas, noise=-noise, **options)
    assert not torch.equal(other[1], drawn[1])


def test_drawn_augmentations_let_images_with_their_own_generators_share_one_call(tiny):
    images = torch.rand(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    context = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    options = dict(image_size=128, feature_upsample_res=32, layers=(0, 1), degrees=10.0, scale=(0.9, 1.0))
    seeds = [4, 5, 4]  # two images with equal generators draw alike
    alone = [
        detect_keypoints(tiny, image[None], context, [5, 2, 7], augmentation_iterations=3,
                         generator=torch.Generator().manual_seed(seed), **options)
        for image, seed in zip(images, seeds)
    ]  # fmt: skip
    draws = [draw_augmentations(tiny, torch.Generator().manual_seed(seed), augmentation_iterations=3, **options) for seed in seeds]
    assert draws[0][0].shape == (3, 2, 3) and draws[0][1].shape == (3, 4, 16, 16)
    thetas, noise = torch.stack([t for t, _ in draws]), torch.stack([n for _, n in draws])
    together = detect_keypoints(tiny, images, context, [5, 2, 7], thetas=thetas, noise=noise, copies_per_call=3, **options)
    for i, (points, peaks) in enumerate(alone):
        assert torch.equal(together[0][i], points[0]) and torch.equal(together[1][i], peaks[0])
    with pytest.raises(ValueError, match="augmentation_iterations must be at least 1"):
        draw_augmentations(tiny, torch.Generator(), augmentation_iterations=0)


def test_noise_of_the_wrong_shape_is_refused(tiny):
    images, context = torch.rand(2, 3, 64, 64), torch.randn(4, 32)
    expected = re.escape("noise must be [B, A, C, h, w] = [2, 3, 4, 16, 16]")
    for shape in [(2, 2, 4, 16, 16), (3, 4, 16, 16), (2, 3, 4, 8, 8)]:
        with pytest.raises(ValueError, match=expected):
            noise = torch.zeros(shape)
            detect_keypoints(tiny, images, context, [0], augmentation_iterations=3, noise=noise, image_size=128)
    thetas = torch.eye(2, 3).expand(2, 3, 2, 3)
    with pytest.raises(ValueError, match=expected):
        detect_keypoints(tiny, images, context, [0], thetas=thetas, noise=torch.zeros(2, 1, 4, 16, 16), image_size=128)


def test_bad_thetas_and_iterations_are_clear_errors(tiny):
    images, context = torch.rand(2, 3, 64, 64), torch.randn(4, 32)
    with pytest.raises(ValueError, match=r"thetas must be \[B=2, A, 2, 3\]"):
        detect_keypoints(tiny, images, context, [0], thetas=torch.zeros(1, 3, 2, 3))
    with pytest.raises(ValueError, match="augmentation_iterations must be at least 1"):
        detect_keypoints(tiny, images, context, [0], augmentation_iterations=0)


def test_token_votes_count_every_image_once(monkeypatch):
    size = 32
    # Four tokens with blobs in different corners in every image, two flat tokens never picked.
    corners = [(0.2, 0.2), (0.2, 0.8), (0.8, 0.2), (0.8, 0.8)]
    blobs = _blob_maps(corners, size, sigma=1.5)
    maps = torch.cat([blobs * 0.9 + 0.01, torch.full((2, size, size), 0.02)])
    monkeypatch.setattr(detection, "attention_maps", lambda d, images, c, **o: maps.expand(len(images), -1, -1, -1))
    counts = count_token_picks(None, torch.rand(5, 3, 8, 8), torch.zeros(6, 4), top_k=3, furthest_point_num_samples=4, batch_size=2)
    assert counts.sum() == 5 * 3
    assert counts[4:].tolist() == [0, 0]
    chosen = select_keypoint_tokens(None, torch.rand(5, 3, 8, 8), torch.zeros(6, 4), top_k=3, furthest_point_num_samples=4, batch_size=2)
    assert chosen.tolist() == counts.argsort(descending=True, stable=True)[:3].tolist()
