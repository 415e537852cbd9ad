import numpy as np
import pytest
import torch
from PIL import Image

from skp_ray.plotting import (
    axis_ticks,
    captioned,
    colour_ramp,
    draw_keypoints,
    heatmap_overlay,
    image_grid,
    keypoint_colours,
    keypoint_sheet,
    label_rows,
    landmark_comparison,
    line_plot,
    text_panel,
)


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


# --- keypoint orders, labels inside the frame, one keypoint alone ---------------------------------


def test_draw_keypoints_orders_agree_and_unknown_order_is_refused():
    image = torch.full((3, 90, 160), 0.5)
    xy_pixels = np.array([[20.5, 10.5], [150.5, 80.5], [80.5, 45.5]])  # pixel centres (20, 10), (150, 80), (80, 45)
    xy_normalized = xy_pixels / [160, 90]
    yx_normalized = xy_normalized[:, ::-1]
    default = np.asarray(draw_keypoints(image, yx_normalized))
    assert np.array_equal(np.asarray(draw_keypoints(image, yx_normalized, order="yx_normalized")), default)
    assert np.array_equal(np.asarray(draw_keypoints(image, xy_normalized, order="xy_normalized")), default)
    assert np.array_equal(np.asarray(draw_keypoints(image, xy_pixels, order="xy_pixels")), default)
    for (col, row), colour in zip([(20, 10), (150, 80), (80, 45)], keypoint_colours(3)):
        assert tuple(default[row, col]) == colour
    with pytest.raises(ValueError, match="yx_normalized.*xy_normalized.*xy_pixels") as error:
        draw_keypoints(image, xy_pixels, order="xy")
    assert "'xy'" in str(error.value)


def _number_ink(centre_xy, size=(160, 90), label=0, count=1) -> int:
    """Pixels the number of keypoint ``label`` adds to a white picture, the point at ``centre_xy`` pixels."""
    points = np.full((count, 2), np.nan)
    points[label] = centre_xy
    white = Image.new("RGB", size, (255, 255, 255))
    plain = np.asarray(draw_keypoints(white, points, order="xy_pixels", numbered=False, radius=4))
    numbered = np.asarray(draw_keypoints(white, points, order="xy_pixels", numbered=True, radius=4))
    return int((plain != numbered).any(axis=2).sum())


def test_keypoint_numbers_stay_whole_at_every_edge():
    for label, count in ((0, 1), (12, 13)):  # one and two digits
        middle = _number_ink((80.5, 45.5), label=label, count=count)
        assert middle > 20
        for corner in ((158.5, 1.5), (1.5, 1.5), (158.5, 88.5), (1.5, 88.5), (80.5, 0.5), (159.5, 45.5)):
            assert _number_ink(corner, label=label, count=count) == pytest.approx(middle, rel=0.1), corner


def test_draw_keypoints_only_one():
    image = torch.full((3, 60, 80), 0.5)
    keypoints = [[0.25, 0.125], [0.75, 0.5], [0.5, 0.875]]  # (y, x)
    pixels = np.asarray(draw_keypoints(image, keypoints, only=1))
    colours = keypoint_colours(3)
    assert tuple(pixels[45, 40]) == colours[1]
    assert tuple(pixels[15, 10]) == (128, 128, 128) and tuple(pixels[30, 70]) == (128, 128, 128)


def test_landmark_comparison_orders_agree():
    image = torch.full((3, 60, 80), 0.5)
    truth_xy = np.array([[0.2, 0.3], [0.7, 0.6]])
    prediction_xy = np.array([[0.25, 0.35], [0.6, 0.5]])
    as_yx = np.asarray(landmark_comparison(image, truth_xy[:, ::-1], prediction_xy[:, ::-1], [True, False]))
    as_xy = np.asarray(landmark_comparison(image, truth_xy, prediction_xy, [True, False], order="xy_normalized"))
    assert np.array_equal(as_xy, as_yx)
    ring = (int(0.2 * 80 - 0.5 + 3 - 1), int(0.3 * 60 - 0.5))  # right edge of landmark 0's ring (radius 3, width 2)
    assert tuple(as_xy[ring[1], ring[0]]) == keypoint_colours(2)[0]
    pixels_xy = truth_xy * [80, 60]
    in_pixels = landmark_comparison(image, pixels_xy, prediction_xy * [80, 60], [True, False], order="xy_pixels")
    assert np.array_equal(np.asarray(in_pixels), as_xy)


# --- grids, captions, labelled rows --------------------------------------------------------------


def test_image_grid_tight_rows():
    red = Image.new("RGB", (10, 20), (255, 0, 0))
    blue = Image.new("RGB", (30, 10), (0, 0, 255))
    grid = image_grid([red, blue, blue], columns=2, pad=4, background=(0, 255, 0), tight=True)
    # row 0: red then blue at their own widths; row 1: blue, 10 high
    assert grid.size == (4 + 10 + 4 + 30 + 4, 4 + 20 + 4 + 10 + 4)
    assert grid.getpixel((4, 4)) == (255, 0, 0)
    assert grid.getpixel((4 + 10 + 4, 4)) == (0, 0, 255)
    assert grid.getpixel((4, 4 + 20 + 4)) == (0, 0, 255)


def test_captioned_adds_a_strip_with_the_text():
    picture = Image.new("RGB", (120, 80), (0, 0, 200))
    plain = captioned(picture, "")
    titled = captioned(picture, "image 0")
    assert titled.width == 120 and titled.height > 80
    assert np.array_equal(np.asarray(titled)[:80], np.asarray(picture))
    strip = np.asarray(titled)[80:]
    assert (strip != np.asarray(plain)[80:]).any()
    assert (strip.sum(axis=2) < 300).sum() > 20  # dark ink
    two_lines = captioned(picture, ["a.png", "ok, 3 keypoints"])
    assert two_lines.height > titled.height


def test_long_captions_are_shortened_not_cut():
    picture = Image.new("RGB", (100, 60), (0, 0, 200))
    strip = np.asarray(captioned(picture, "a_very_long_file_name_without_any_space_in_it.png"))[60:]
    ink_columns = np.flatnonzero((strip.sum(axis=2) < 600).any(axis=0))
    assert ink_columns.min() > 0 and ink_columns.max() < 99  # nothing runs into the edge
    wrapped = captioned(picture, "several short words that wrap onto lines")
    assert wrapped.height > captioned(picture, "several").height


def test_text_panel_background_and_text():
    panel = np.asarray(text_panel(200, 100, ["error: not_found", "", "cannot read"], background=(110, 110, 110)))
    assert panel.shape == (100, 200, 3)
    assert tuple(panel[2, 2]) == (110, 110, 110)
    assert (panel != 110).any(axis=2).sum() > 50


def test_label_rows_writes_each_label_left_of_its_row_in_its_colour():
    rows = [Image.new("RGB", (90, 40), (0, 0, 0)), Image.new("RGB", (90, 40), (0, 0, 0))]
    colours = keypoint_colours(2)
    picture = np.asarray(label_rows(rows, ["keypoint 0", "keypoint 1"], colours=colours, pad=2)).astype(int)
    column = picture.shape[1] - 2 - 90 - 2  # label column width
    assert column > 30
    for k, colour in enumerate(colours):
        top = 2 + k * (40 + 2)
        label = picture[top : top + 40, 2 : 2 + column]
        assert (np.abs(label - colour).sum(axis=2) < 40).sum() > 5, k
        assert (picture[top : top + 40, 2 + column : 2 + column + 90] == 0).all()  # the row itself
    blank = np.asarray(label_rows(rows, ["", ""], colours=colours, pad=2))
    assert blank.shape[1] < picture.shape[1]


# --- the keypoint sheet ---------------------------------------------------------------------------


def _sheet_inputs(count=4, k=10, side=96):
    images = torch.full((count, 3, side, side), 0.5)
    keypoints = torch.zeros(count, k, 2)
    for j in range(k):  # two staggered lines, far enough apart for whole numbers
        keypoints[:, j] = torch.tensor([0.3 if j % 2 == 0 else 0.7, 0.08 + 0.09 * j])
    return images, keypoints, torch.zeros(k, 6, 6)


def test_keypoint_sheet_has_no_empty_row_space_and_keeps_the_aspect():
    images, keypoints, maps = _sheet_inputs()
    sheet = keypoint_sheet(images, keypoints, maps, sizes=[(90, 160)] * 4)
    panel_w = round(96 * 160 / 90)  # 171: the images' height, their original aspect
    caption_h = captioned(Image.new("RGB", (panel_w, 96)), "image 0").height - 96
    panel_h = 96 + caption_h
    # 4 images in the first row, the 10 maps in rows of the same 4 columns: 4 rows, no wider than the images
    assert sheet.size == (4 * panel_w + 5 * 4, 4 * panel_h + 5 * 4)
    pixels = np.asarray(sheet)

    def panel(index):
        row, col = divmod(index, 4)
        left, top = 4 + col * (panel_w + 4), 4 + row * (panel_h + 4)
        return pixels[top : top + panel_h, left : left + panel_w]

    def caption(text):
        return np.asarray(captioned(Image.new("RGB", (panel_w, 96)), text))[96:]

    assert np.array_equal(panel(0)[96:], caption("image 0"))
    assert np.array_equal(panel(3)[96:], caption("image 3"))
    assert np.array_equal(panel(4 + 5)[96:], caption("keypoint 5 map"))
    colours = keypoint_colours(10)
    for k in (0, 5, 9):
        drawn = panel(4 + k)
        for j in range(10):
            y, x = keypoints[0, j].tolist()
            here = tuple(drawn[int(y * 96), int(x * panel_w)])
            assert (here == colours[j]) == (j == k), (k, j)
    y, x = keypoints[0, 9].tolist()
    assert tuple(panel(0)[int(y * 96), int(x * panel_w)]) == colours[9]  # the image panel has all of them


def test_keypoint_sheet_positional_call_and_a_single_image():
    images, keypoints, maps = _sheet_inputs(count=4, k=3)
    sheet = keypoint_sheet(images, keypoints, maps)
    caption_h = captioned(Image.new("RGB", (96, 96)), "image 0").height - 96
    assert sheet.size == (4 * 96 + 5 * 4, 2 * (96 + caption_h) + 3 * 4)  # square panels
    images, keypoints, maps = _sheet_inputs(count=1, k=8)
    one = keypoint_sheet(images, keypoints, maps, captions=["face.png"])
    caption_h = captioned(Image.new("RGB", (96, 96)), "keypoint 0 map").height - 96  # captions may wrap
    assert one.width == 3 * 96 + 4 * 4  # 1 + 8 panels in 3 columns, not one long row or column
    assert one.height == 3 * (96 + caption_h) + 4 * 4
    expected = np.asarray(captioned(Image.new("RGB", (96, 96)), "face.png"))[96:]
    assert np.array_equal(np.asarray(one)[4 + 96 : 4 + 96 + expected.shape[0], 4 : 4 + 96], expected)


# --- the loss curve -------------------------------------------------------------------------------


def test_axis_ticks():
    assert axis_ticks(1, 50, integer=True) == [1, 10, 20, 30, 40, 50]
    assert axis_ticks(1, 10, integer=True) == [1, 4, 6, 8, 10]
    assert axis_ticks(1, 2, integer=True) == [1, 2]
    assert axis_ticks(1, 1, integer=True) == [1]
    assert axis_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert axis_ticks(0.0123, 0.987)[1:-1] == [0.2, 0.4, 0.6, 0.8]


def _axis(pixels: np.ndarray) -> tuple[int, int, int]:
    """The x axis: its row and its first and last column (the longest dark horizontal run)."""
    best = (0, 0, 0, -1)
    for row, dark in enumerate(pixels.sum(axis=2) < 200):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], dark.astype(int), [0]])))
        for start, stop in zip(edges[::2], edges[1::2]):
            best = max(best, (stop - start, row, start, stop - 1))
    return best[1], best[2], best[3]


def test_line_plot_labels_its_axes():
    values = [1.0 / (i + 1) for i in range(50)]
    picture = np.asarray(line_plot(values, title="discovery loss"))
    assert np.array_equal(picture, np.asarray(line_plot(values, title="discovery loss", xlabel="step", ylabel="loss")))
    unlabelled = np.asarray(line_plot(values, title="discovery loss", xlabel="", ylabel=""))
    rows, cols = np.nonzero((picture != unlabelled).any(axis=2))
    axis_row, left, right = _axis(picture)
    below = rows > axis_row + 12  # under the tick labels: the x label, centred
    assert below.sum() > 10 and abs(cols[below].mean() - (left + right) / 2) < 10
    beside = cols < left - 20  # left of the y tick labels: the turned y label
    assert beside.sum() > 10
    assert np.ptp(rows[beside]) > np.ptp(cols[beside])  # reads upwards: taller than wide
    assert (below | beside).all()


def test_line_plot_steps_start_at_one():
    values = [1.0 / (i + 1) for i in range(50)]
    pixels = np.asarray(line_plot(values, ylabel=""))
    axis_row, left, right = _axis(pixels)
    tick_marks = pixels[axis_row + 2].sum(axis=1) < 200

    def column(step: int) -> int:
        return int(round(left + (step - 1) / 49 * (right - left)))

    for step in (1, 10, 20, 30, 40, 50):
        assert tick_marks[column(step) - 1 : column(step) + 2].any(), step
    for step in (5, 15, 25):
        assert not tick_marks[column(step) - 1 : column(step) + 2].any(), step
    # the first value, step 1, sits on the y axis: the line starts there at the top
    line = np.abs(pixels.astype(int) - [31, 119, 180]).sum(axis=2) < 30
    assert line[:, left : left + 3].any()


# --- the report's attention picture ---------------------------------------------------------------


def test_attention_picture_rows_are_labelled_and_show_one_keypoint():
    from skp_ray.report import _attention_picture

    views = torch.full((2, 3, 64, 64), 0.5)
    keypoints_xy = np.array([[[0.2, 0.2], [0.5, 0.5], [0.8, 0.8]]] * 2)  # normalised (x, y)
    picture = np.asarray(_attention_picture(views, torch.zeros(2, 3, 8, 8), keypoints_xy)).astype(int)
    strips = 2 * 64 + 3 * 2
    column = picture.shape[1] - 2 - strips - 2
    assert column > 30  # the row labels
    assert picture.shape[0] == 2 + 3 * (64 + 2 * 2 + 2)
    colours = keypoint_colours(3)
    for k, colour in enumerate(colours):
        top = 2 + k * (64 + 2 * 2 + 2) + 2
        label = picture[top : top + 64, 2 : 2 + column]
        assert (np.abs(label - colour).sum(axis=2) < 40).sum() > 5, k
        cell = picture[top : top + 64, 2 + column + 2 : 2 + column + 2 + 64]
        for j, (x, y) in enumerate(keypoints_xy[0]):
            assert (tuple(cell[int(y * 64), int(x * 64)]) == colour) == (j == k), (k, j)
