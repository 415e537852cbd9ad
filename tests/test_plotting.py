import numpy as np
import pytest
import torch
from PIL import Image

from skp_ray.plotting import colour_ramp, draw_keypoints, heatmap_overlay, image_grid, keypoint_colours, line_plot


def test_keypoint_colours_distinct_and_consistent():
    many = keypoint_colours(64)
    assert len(many) == 64 and len(set(many)) == 64
    assert all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in many)
    for k in (0, 1, 5, 19, 20, 40):
        assert keypoint_colours(k) == many[:k]
    first = np.array(keypoint_colours(10), dtype=float)
    gaps = [np.abs(first[i] - first[j]).sum() for i in range(10) for j in range(i)]
    assert min(gaps) > 60  # visibly different


def test_draw_keypoints_colours_at_keypoint_pixels():
    image = torch.full((3, 60, 80), 0.5)
    keypoints = torch.tensor([[0.25, 0.125], [0.75, 0.5], [0.5, 0.875]])  # (y, x)
    picture = draw_keypoints(image, keypoints)
    assert isinstance(picture, Image.Image) and picture.size == (80, 60)
    colours = keypoint_colours(3)
    pixels = np.asarray(picture)
    for (y, x), colour in zip(keypoints.tolist(), colours):
        row, col = int(y * 60), int(x * 80)
        assert tuple(pixels[row, col]) == colour
    # far away from every keypoint the image is untouched
    assert tuple(pixels[2, 40]) == (128, 128, 128)
    # the input is not modified and is a copy when given a PIL image
    assert torch.equal(image, torch.full((3, 60, 80), 0.5))
    base = Image.new("RGB", (40, 40), (255, 255, 255))
    out = draw_keypoints(base, [[0.5, 0.5]], numbered=False, radius=5)
    assert out is not base and base.getpixel((20, 20)) == (255, 255, 255)
    assert out.getpixel((20, 20)) == keypoint_colours(1)[0]


def test_draw_keypoints_outline_numbers_and_missing_points():
    white = torch.ones(3, 64, 64)
    plain = np.asarray(draw_keypoints(white, [[0.5, 0.5]], numbered=False, radius=6))
    numbered = np.asarray(draw_keypoints(white, [[0.5, 0.5]], numbered=True, radius=6))
    assert (plain.sum(axis=2) < 150).any()  # dark outline
    assert (numbered != plain).any()  # the label adds ink
    skipped = np.asarray(draw_keypoints(white, [[float("nan"), 0.5]], numbered=True))
    assert (skipped == 255).all()


def test_image_grid_size_and_placement():
    red = Image.new("RGB", (10, 20), (255, 0, 0))
    blue = Image.new("RGB", (30, 10), (0, 0, 255))
    grid = image_grid([red, blue, red], columns=2, pad=4, background=(0, 255, 0))
    # cells 30 x 20, 2 columns x 2 rows
    assert grid.size == (2 * 30 + 3 * 4, 2 * 20 + 3 * 4)
    assert grid.getpixel((4, 4)) == (255, 0, 0)
    assert grid.getpixel((4 + 30 + 4, 4)) == (0, 0, 255)
    assert grid.getpixel((4, 4 + 20 + 4)) == (255, 0, 0)
    assert grid.getpixel((0, 0)) == (0, 255, 0)
    assert image_grid([red], columns=4, pad=0).size == (10, 20)
    with pytest.raises(ValueError):
        image_grid([])


def test_colour_ramp_is_monotone_in_brightness():
    ramp = colour_ramp(np.linspace(0, 1, 11))
    assert ramp.shape == (11, 3)
    luma = ramp @ np.array([0.299, 0.587, 0.114])
    assert (np.diff(luma) > 0).all()
    assert np.allclose(colour_ramp(np.array([-1.0, 2.0])), colour_ramp(np.array([0.0, 1.0])))


def test_heatmap_overlay():
    image = torch.zeros(3, 32, 48)
    heat = torch.zeros(4, 6)
    heat[1:3, 3:5] = 10.0  # a 2x2 hot block: its middle stays at the max after bilinear upsampling
    picture = heatmap_overlay(image, heat, alpha=0.5)
    assert picture.size == (48, 32)
    pixels = np.asarray(picture).astype(float)
    top, bottom = colour_ramp(np.array([1.0, 0.0]))
    assert np.abs(pixels[15, 31] - 0.5 * top).max() <= 1  # the peak is the top of the ramp
    assert np.abs(pixels[30, 2] - 0.5 * bottom).max() <= 1  # zero is the bottom
    # scale-free: the map is normalised to its own max
    assert np.array_equal(np.asarray(heatmap_overlay(image, heat * 1e-6)), np.asarray(picture))
    # alpha 0 leaves the image unchanged
    assert (np.asarray(heatmap_overlay(image, heat, alpha=0.0)) == 0).all()


def test_line_plot():
    values = [1.0 / (i + 1) for i in range(50)]
    picture = line_plot(values, title="loss", width=300, height=200)
    assert picture.size == (300, 200)
    pixels = np.asarray(picture).astype(int)
    line = (np.abs(pixels - np.array([31, 119, 180])).sum(axis=2) < 30)
    assert line.sum() > 100
    rows, cols = np.nonzero(line)
    # a decreasing curve: its leftmost ink is higher (smaller row) than its rightmost ink
    assert rows[cols == cols.min()].mean() < rows[cols == cols.max()].mean()
    assert (pixels[:, :, 0] < 100).sum() > line.sum()  # axes and labels add dark ink
    for degenerate in ([], [2.0], [3.0, 3.0], [float("nan"), 1.0, float("inf")]):
        assert line_plot(degenerate, width=120, height=90).size == (120, 90)
