"""jobs/show.py and skp_ray.label_pictures: the labelling job's rows drawn on their images."""

import hashlib
import re
import runpy
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from skp_ray.label_pictures import DISPLAY_SIZE, label_picture, pick_rows, show_labels
from skp_ray.label_store import OUTPUT_SCHEMA, label_file_name, read_labels
from skp_ray.plotting import image_grid, keypoint_colours

REPO = Path(__file__).resolve().parents[1]
SHOW = REPO / "jobs" / "show.py"
WIDE, TALL, READABLE_ERROR = (40, 60, 80), (80, 40, 60), (20, 100, 20)
GREY = (110, 110, 110)
# keypoints of wide.png (160 x 90) in original pixels; keypoint 0 in the top-right corner
WIDE_POINTS = [[158.5, 1.5], [20.5, 60.5], [80.5, 45.5]]


def _row(uri: str, status: str = "ok", keypoints=None, size=(None, None), cause=None, error=None) -> dict:
    return {
        "image_id": hashlib.sha256(uri.encode()).hexdigest()[:16],
        "uri": uri,
        "content_hash": "0" * 16,
        "width": size[0],
        "height": size[1],
        "crop_box": None,
        "keypoints_xy": keypoints,
        "keypoints_xy_normalized": None if keypoints is None else (np.array(keypoints) / size).tolist(),
        "peaks": None if keypoints is None else [1.0] * len(keypoints),
        "artifact_id": "artifact",
        "model": "tiny",
        "status": status,
        "error_cause": cause,
        "error": error,
        "labelled_at": datetime(2026, 1, 1, tzinfo=timezone.utc),
        "run_id": "abc123",
    }


@pytest.fixture
def labels(tmp_path) -> Path:
    """A label folder of five rows: two ok images (wide, tall), an error row with a readable image, and
    two error rows whose images cannot be read (broken bytes, missing file)."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (160, 90), WIDE).save(images / "wide.png")
    Image.new("RGB", (90, 160), TALL).save(images / "tall.png")
    Image.new("RGB", (160, 90), READABLE_ERROR).save(images / "huge.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n0123")
    rows = [
        _row(str(images / "wide.png"), keypoints=WIDE_POINTS, size=(160, 90)),
        _row(str(images / "tall.png"), keypoints=[[45.5, 80.5], [5.5, 150.5]], size=(90, 160)),
        _row(str(images / "huge.png"), "error", cause="too_large", error="160x90 = 14400 pixels > max_pixels=1000"),
        _row(str(images / "broken.png"), "error", cause="truncated", error="the header is incomplete"),
        _row(str(images / "missing.png"), "error", cause="not_found", error="cannot read image (not_found)"),
    ]
    folder = tmp_path / "labels"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), folder / label_file_name("abc123", "w1", 0))
    return folder


def _rows(labels: Path) -> dict[str, dict]:
    return {Path(row["uri"]).name: row for row in read_labels(str(labels)).to_pylist()}


def _box(pixels: np.ndarray, colour) -> tuple[int, int, int, int]:
    """The bounding box (left, top, right, bottom exclusive) of the pixels of ``colour``."""
    rows, cols = np.nonzero((pixels == colour).all(axis=2))
    return cols.min(), rows.min(), cols.max() + 1, rows.max() + 1


def test_job_draws_one_grid_png(labels, tmp_path):
    output = tmp_path / "grid.png"
    done = subprocess.run(
        [sys.executable, str(SHOW), "--labels", str(labels), "--output", str(output)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert str(output) in done.stdout
    grid = Image.open(output)
    rows = sorted(_rows(labels).values(), key=lambda row: row["uri"])
    expected = image_grid([label_picture(row) for row in rows], columns=4, tight=True)
    assert grid.size == expected.size
    assert np.array_equal(np.asarray(grid.convert("RGB")), np.asarray(expected))


def test_ok_row_is_drawn_at_its_aspect_with_numbered_coloured_keypoints(labels):
    row = _rows(labels)["wide.png"]
    pixels = np.asarray(label_picture(row))
    assert _box(pixels, WIDE) == (0, 0, 512, 288)  # 160 x 90 shown at 512 x 288, not squashed
    assert pixels.shape[0] > 288 and pixels.shape[1] == 512  # with a caption below
    scale = 512 / 160
    for (x, y), colour in zip(WIDE_POINTS, keypoint_colours(3)):
        assert tuple(pixels[int(y * scale), int(x * scale)]) == colour
    # keypoint 0's number, in the top-right corner, is moved inside the frame: all of its ink is there
    in_the_middle = np.asarray(label_picture({**row, "keypoints_xy": [[110.5, 30.5], *WIDE_POINTS[1:]]}))
    assert _ink(pixels, 0) == pytest.approx(_ink(in_the_middle, 0), rel=0.1)
    assert _ink(pixels[:40, 440:], 0) == _ink(pixels, 0)
    tall = np.asarray(label_picture(_rows(labels)["tall.png"]))
    assert _box(tall, TALL) == (0, 0, 288, 512)


def _ink(pixels: np.ndarray, k: int) -> int:
    """How many pixels are (nearly) keypoint ``k``'s colour."""
    return int((np.abs(pixels.astype(int) - keypoint_colours(k + 1)[k]).sum(axis=2) < 40).sum())


def test_caption_names_the_file_and_status(labels):
    row = _rows(labels)["wide.png"]
    picture = np.asarray(label_picture(row))
    caption = picture[288:]
    assert (caption.sum(axis=2) < 300).sum() > 50  # dark text on white
    copy = shutil.copy(row["uri"], Path(row["uri"]).with_name("another name.png"))
    renamed = np.asarray(label_picture({**row, "uri": str(copy)}))
    assert np.array_equal(renamed[:288], picture[:288])  # the same image and keypoints...
    assert (renamed[288:] != caption).any()  # ...under another name
    error = np.asarray(label_picture({**row, "status": "error", "error_cause": "too_large", "keypoints_xy": None}))
    assert (error[288:] != caption).any()  # ...under a caption that says the status
    assert _box(error, WIDE) == (0, 0, 512, 288)  # an error row's readable image is shown, without keypoints
    assert not (error[:288] == keypoint_colours(3)[1]).all(axis=2).any()


def test_error_rows(labels):
    rows = _rows(labels)
    readable = np.asarray(label_picture(rows["huge.png"]))
    assert _box(readable, READABLE_ERROR) == (0, 0, 512, 288)
    missing = np.asarray(label_picture(rows["missing.png"]))
    broken = np.asarray(label_picture(rows["broken.png"]))
    panel_h = DISPLAY_SIZE * 3 // 4
    for picture in (missing, broken):
        assert picture.shape[1] == 512 and tuple(picture[2, 2]) == GREY and tuple(picture[panel_h - 3, 509]) == GREY
        assert ((picture[:panel_h] == 255).all(axis=2)).sum() > 50  # the cause, written on the panel
    assert (missing[:panel_h] != broken[:panel_h]).any()  # not_found versus truncated
    # an ok row whose image is gone is a grey panel too
    gone = np.asarray(label_picture({**rows["wide.png"], "uri": rows["missing.png"]["uri"]}))
    assert tuple(gone[2, 2]) == GREY


def test_folder_output_one_png_per_image(labels, tmp_path):
    output = tmp_path / "pictures"
    written = show_labels(str(labels), str(output), sample=2, seed=1)
    assert len(written) == 2 and sorted(p.name for p in output.iterdir()) == sorted(Path(p).name for p in written)
    rows = pick_rows(list(_rows(labels).values()), sample=2, seed=1)
    for path, row in zip(written, rows):
        assert re.fullmatch(rf"{Path(row['uri']).stem}-{row['image_id']}\.png", Path(path).name)
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(label_picture(row)))


def test_pick_rows(labels, tmp_path, monkeypatch):
    rows = list(_rows(labels).values())
    everything = pick_rows(rows)
    assert [row["uri"] for row in everything] == sorted(row["uri"] for row in rows)
    picked = pick_rows(rows, sample=3, seed=7)
    chosen = np.random.default_rng(7).choice(5, size=3, replace=False)
    assert picked == [everything[i] for i in sorted(chosen)]
    assert pick_rows(rows, sample=3, seed=7) == picked
    assert len({tuple(r["uri"] for r in pick_rows(rows, sample=3, seed=s)) for s in range(10)}) > 1
    assert pick_rows(rows, sample=50) == everything
    monkeypatch.chdir(tmp_path)
    named = pick_rows(rows, uris=["images/tall.png", str(tmp_path / "images" / "wide.png")])
    assert [Path(row["uri"]).name for row in named] == ["tall.png", "wide.png"]
    with pytest.raises(ValueError, match="nope.png"):
        pick_rows(rows, uris=["images/tall.png", "nope.png"])
    with pytest.raises(ValueError, match="sample"):
        pick_rows(rows, sample=0)


def _main(argv, capsys) -> tuple[int, str]:
    main = runpy.run_path(str(SHOW))["main"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out = capsys.readouterr()
    return exit_.value.code, out.out + out.err


def test_help_describes_every_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    code, text = _main(["--help"], capsys)
    assert code == 0
    entries = re.split(r"\n  (?=-)", text.split("options:")[1])
    options = {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries if entry.strip()}
    described = {
        "--labels": "labelling job's --output",
        "--output": "a .png file",
        "--uri": "draw these images",
        "--sample": "picked at random",
        "--seed": "seed of the --sample pick",
        "--size": "longest side",
    }
    for option, words in described.items():
        assert words in options[option], option


def test_job_errors_name_the_problem(labels, tmp_path, capsys):
    code, text = _main(["--labels", str(labels), "--uri", "nope.png", "--output", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "nope.png" in text
    code, text = _main(["--labels", str(labels), "--uri", "a", "--sample", "2", "--output", "x.png"], capsys)
    assert code == 2 and "not allowed with" in text
    code, text = _main(["--labels", str(tmp_path), "--output", "x.png"], capsys)
    assert code == 2 and "no label files" in text
    assert not (tmp_path / "x.png").exists()
