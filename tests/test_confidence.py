"""Per-keypoint confidence: detection's spread and peak share, the labelling rows' columns, the run tally,
old outputs without the columns, and show.py's least confident images."""

import json
import math
import runpy
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import skp_ray.detection as detection
from skp_ray.artifact import load_artifact
from skp_ray.confidence import ConfidenceTally, image_score
from skp_ray.detection import detect_keypoints, detect_with_confidence
from skp_ray.diffusion import load_diffusion
from skp_ray.geometry import random_affine, unwarp
from skp_ray.label_detector import detection_generator, detection_options
from skp_ray.label_pictures import label_picture, least_confident_rows, show_labels
from skp_ray.label_store import OUTPUT_SCHEMA, label_file_name, label_files, labelled_ids, read_labels
from skp_ray.labelling import run_labelling
from skp_ray.model_source import model_location
from skp_ray.plotting import keypoint_colours
from skp_ray.samples import write_sample_images
import test_labelling
from test_labelling import config, job_view

artifact = test_labelling.artifact  # the labelling tests' tiny artifact (a module fixture)

REPO = Path(__file__).resolve().parents[1]
IDENTITY = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


class _NoModel:
    image_size = 16


class _GivenMaps:
    """Stands in for attention_maps: returns the given maps [A, K, S, S] and keeps what it returned."""

    def __init__(self, maps=None, real=None):
        self.maps, self.real, self.returned = maps, real, []

    def __call__(self, *args, **options):
        maps = self.maps if self.real is None else self.real(*args, **options)
        self.returned.append(maps)
        return maps


def _three_copies_one_keypoint() -> torch.Tensor:
    """Maps [A=3, K=1, 16, 16]: background 0.01, copies 0 and 1 peak at pixel (4, 4), copy 2 at (10, 7)."""
    maps = torch.full((3, 1, 16, 16), 0.01)
    maps[0, 0, 4, 4] = maps[1, 0, 4, 4] = 1.0
    maps[2, 0, 10, 7] = 0.9
    return maps


def test_spread_and_peak_share_of_a_hand_worked_case(monkeypatch):
    monkeypatch.setattr(detection, "attention_maps", _GivenMaps(_three_copies_one_keypoint()))
    thetas = torch.tensor(IDENTITY).expand(1, 3, 2, 3)  # every copy sees every pixel, unmoved
    found = detect_with_confidence(
        _NoModel(), torch.rand(1, 3, 16, 16), torch.zeros(2, 4), [0], thetas=thetas, copies_per_call=3
    )
    # the average peaks at (4, 4): (1 + 1 + 0.01) / 3 against (0.01 + 0.01 + 0.9) / 3 at (10, 7)
    assert found.keypoints[0, 0].tolist() == [4.5 / 16, 4.5 / 16]
    assert found.augmentation_keypoints[0, 0].tolist() == [[4.5 / 16, 4.5 / 16]] * 2 + [[10.5 / 16, 7.5 / 16]]
    # offsets (0, 0), (0, 0), (6, 3) model pixels: sqrt(45 / 3) there, sqrt((12^2 + 12^2) / 3) in a 32 x 64 frame
    assert found.spread_px(torch.tensor([16.0]), torch.tensor([16.0]))[0, 0].item() == pytest.approx(math.sqrt(15))
    assert found.spread_px(torch.tensor([32.0]), torch.tensor([64.0]))[0, 0].item() == pytest.approx(math.sqrt(96))
    # peak share: 2.01 / 3 over the averaged map's sum, (3 * 255 * 0.01 + 1 + 1 + 0.9) / 3
    assert found.peak_share[0, 0].item() == pytest.approx(2.01 / (3 * 255 * 0.01 + 2.9), rel=1e-5)
    assert found.peaks[0, 0].item() == pytest.approx(2.01 / 3, rel=1e-6)


def test_a_copy_is_judged_only_where_it_sees_the_image(monkeypatch):
    # copy 1 is shifted half the frame to the right (x_in = x_out + 1 in [-1, 1] units): it sees only the
    # left half of the image frame, where its map is flat, so its argmax is the first pixel it covers
    maps = torch.zeros(2, 1, 16, 16)
    maps[0, 0, 3, 12] = 1.0
    maps[1, 0] = 0.5
    shifted = [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    thetas = torch.tensor([IDENTITY, shifted])[None]
    monkeypatch.setattr(detection, "attention_maps", _GivenMaps(maps))
    found = detect_with_confidence(
        _NoModel(), torch.rand(1, 3, 16, 16), torch.zeros(2, 4), [0], thetas=thetas, copies_per_call=2
    )
    covered = unwarp(torch.ones(1, 1, 16, 16), thetas[0, 1:]).squeeze() > 0
    first_row, first_col = np.argwhere(covered.numpy())[0]  # row-major, as the argmax breaks ties
    assert not covered[0, 0] or first_col > 0 or covered[:, 8:].any()
    assert found.augmentation_keypoints[0, 0, 1].tolist() == [(first_row + 0.5) / 16, (first_col + 0.5) / 16]


def test_the_spread_re_derived_in_float64_from_the_tiny_models_maps(tiny, monkeypatch):
    size, count = 128, 3
    images = torch.rand(1, 3, 96, 80, generator=torch.Generator().manual_seed(0))
    context = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    thetas = random_affine(count, generator=torch.Generator().manual_seed(2))[None]
    options = dict(thetas=thetas, image_size=size, feature_upsample_res=32, generator=torch.Generator().manual_seed(3))
    spy = _GivenMaps(real=detection.attention_maps)
    monkeypatch.setattr(detection, "attention_maps", spy)
    found = detect_with_confidence(tiny, images, context, [5, 2, 7], **options)
    options["generator"] = torch.Generator().manual_seed(3)
    points, peaks = detect_keypoints(tiny, images, context, [5, 2, 7], **options)  # the old call, unchanged
    assert torch.equal(points, found.keypoints) and torch.equal(peaks, found.peaks)

    maps = torch.nn.functional.interpolate(spy.returned[0].double(), size=(size, size), mode="bilinear")
    copies = unwarp(maps, thetas[0].double()).numpy()  # [A, K, S, S] in the image frame
    seen = unwarp(torch.ones(count, 1, size, size, dtype=torch.float64), thetas[0].double()).numpy()
    coverage = seen.sum(0)
    average = np.where(coverage > 0, copies.sum(0) / np.maximum(coverage, 1e-12), 0.0)
    centre = np.arange(size) + 0.5
    height, width = 96.0, 80.0
    for k in range(3):
        y, x = np.unravel_index(np.argmax(average[k]), average[k].shape)
        np.testing.assert_allclose(found.keypoints[0, k], [centre[y] / size, centre[x] / size])
        assert found.peak_share[0, k].item() == pytest.approx(average[k, y, x] / average[k].sum(), rel=1e-4)
        squares = []
        for a in range(count):
            own = np.where(seen[a, 0] > 0, copies[a, k] / np.maximum(seen[a, 0], 1e-12), -np.inf)
            ay, ax = np.unravel_index(np.argmax(own), own.shape)
            squares.append(((ay - y) * height / size) ** 2 + ((ax - x) * width / size) ** 2)
        expected = math.sqrt(np.mean(squares))
        assert found.spread_px(torch.tensor([height]), torch.tensor([width]))[0, k].item() == pytest.approx(expected)
    # one copy is its own average: no spread
    single = detect_with_confidence(tiny, images, context, [5, 2, 7], **{**options, "thetas": thetas[:, :1]})
    assert (single.spread_px(torch.tensor([height]), torch.tensor([width])) == 0).all()


# --- the tally ------------------------------------------------------------------------------------


def _tally_rows(count: int, seed: int) -> pa.Table:
    """``count`` rows: mostly ok with 5 spreads and shares (some NaN), some error rows, some ok rows
    without confidence (as written before it existed)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        spreads, shares = rng.gamma(2.0, 4.0, 5), rng.uniform(0.001, 0.05, 5)
        spreads[rng.random(5) < 0.1] = np.nan
        kind = rng.choice(["ok", "error", "old"], p=[0.85, 0.1, 0.05])
        rows.append({
            "uri": f"s3://bucket/{i:05d}.jpg",
            "status": "error" if kind == "error" else "ok",
            "keypoint_spread_px": None if kind != "ok" else spreads.tolist(),
            "peak_share": None if kind != "ok" else shares.tolist(),
        })  # fmt: skip
    schema = pa.schema([OUTPUT_SCHEMA.field(name) for name in ("uri", "status", "keypoint_spread_px", "peak_share")])
    return pa.Table.from_pylist(rows, schema=schema)


def _numpy_scores(table: pa.Table) -> tuple[int, list[str], np.ndarray, np.ndarray]:
    frame = table.to_pandas()
    ok = frame[frame.status == "ok"]
    scored = ok[ok.keypoint_spread_px.notna()]
    scores = np.array([np.nanmedian(np.array(s, dtype=np.float64)) for s in scored.keypoint_spread_px])
    shares = np.array([np.median(np.array(s, dtype=np.float64)) for s in scored.peak_share])
    return len(ok), list(scored.uri), scores, shares


def test_the_tally_equals_numpy_on_the_same_values():
    table = _tally_rows(300, seed=0)
    tally = ConfidenceTally(max_spread_px=10.0, least_confident=5)
    for batch in table.to_batches(max_chunksize=37):
        tally.add(batch)
    result = tally.result()
    ok, uris, scores, shares = _numpy_scores(table)
    assert (result["ok_images"], result["scored_images"]) == (ok, len(scores)) and ok > len(scores)
    assert result["unreliable_images"] == int((scores > 10.0).sum()) > 0
    expected = np.quantile(scores, [0.5, 0.9, 0.99])
    np.testing.assert_allclose(list(result["median_spread_px_quantiles"].values()), expected, rtol=1e-12)
    np.testing.assert_allclose(list(result["median_peak_share_quantiles"].values()), np.quantile(shares, [0.5, 0.9, 0.99]))
    worst = np.argsort(-scores)[:5]
    assert [e["uri"] for e in result["least_confident"]] == [uris[i] for i in worst]
    np.testing.assert_allclose([e["median_spread_px"] for e in result["least_confident"]], scores[worst])
    assert result["quantiles_exact"] and json.loads(json.dumps(result)) == result
    lines = tally.describe()
    assert all(line.startswith("[label]") for line in lines) and uris[worst[0]] in lines[3]
    assert f"{int((scores > 10.0).sum())} images unreliable" in lines[1]


def test_the_tally_keeps_a_fixed_size_sample_past_its_reservoir():
    table = _tally_rows(4000, seed=1)
    tally = ConfidenceTally(reservoir_size=500, least_confident=3, seed=4)
    tally.add(table)
    result = tally.result()
    _, _, scores, _ = _numpy_scores(table)
    assert len(tally._sample) == 500 and len(tally._heap) == 3 and not result["quantiles_exact"]
    sampled = np.array(list(result["median_spread_px_quantiles"].values())[:2])
    exact = np.quantile(scores, [0.5, 0.9])
    assert np.abs(sampled / exact - 1).max() < 0.1  # 500 of ~3400 images: within 10 %
    assert result["unreliable_images"] == int((scores > 12.0).sum())  # counted over every image, default threshold
    again = ConfidenceTally(reservoir_size=500, least_confident=3, seed=4)
    again.add(table)
    assert again.result() == result  # seeded


def test_the_tally_of_nothing_and_bad_settings():
    tally = ConfidenceTally()
    tally.add(pa.table({"uri": ["a"], "status": ["ok"]}))  # rows written before confidence existed
    result = tally.result()
    assert (result["ok_images"], result["scored_images"], result["median_spread_px_quantiles"]) == (1, 0, None)
    assert tally.describe() == ["[label] confidence: none of the 1 ok images has keypoint confidence"]
    with pytest.raises(ValueError, match="max_spread_px"):
        ConfidenceTally(max_spread_px=0)
    with pytest.raises(ValueError, match="status"):
        tally.add(pa.table({"uri": ["a"]}))
    assert math.isnan(image_score(None)) and math.isnan(image_score([float("nan")])) and image_score([3, 1, 2]) == 2


# --- the labelling rows -----------------------------------------------------------------------------


def test_labelling_rows_carry_each_keypoints_spread_and_peak_share(ray_session, artifact, tmp_path):
    (square,) = write_sample_images(tmp_path / "in", n=1, size=96, seed=5)
    Image.open(square).resize((90, 60)).save(tmp_path / "in" / "wide.png")  # a frame squashed by the model's input
    (tmp_path / "in" / "notes.jpg").write_text("not an image")
    summary = run_labelling(config(artifact, str(tmp_path / "in"), str(tmp_path / "out"), seed=7, max_spread_px=1e-3))
    rows = read_labels(str(tmp_path / "out")).to_pandas()
    assert pq.read_schema(next((tmp_path / "out").glob("labels-*.parquet"))).field("peak_share").type == pa.list_(
        pa.float32()
    )
    loaded = load_artifact(artifact)
    diffusion = load_diffusion(model_location(loaded.model), device="cpu", text_encoder=False, channels_last_vae=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actor, so sums round alike
    try:
        for row in rows.itertuples():
            if row.status == "error":
                assert row.keypoint_spread_px is None and row.peak_share is None
                continue
            pixels, digest = job_view(row.uri, loaded.settings["image_size"])
            found = detect_with_confidence(
                diffusion, pixels, loaded.context, loaded.token_indices, augmentation_iterations=2,
                generator=detection_generator(7, digest), **detection_options(loaded.settings),
            )  # fmt: skip
            # the spread in the image's own pixels: dy scaled by its height, dx by its width
            offsets = (found.augmentation_keypoints[0].double() - found.keypoints[0, :, None].double()).numpy()
            expected = np.sqrt(((offsets * [row.height, row.width]) ** 2).sum(-1).mean(-1))
            np.testing.assert_allclose(row.keypoint_spread_px, expected, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(row.peak_share, found.peak_share[0].numpy(), rtol=1e-5)
            assert len(row.keypoint_spread_px) == 3 and 0 < min(row.peak_share) and max(row.peak_share) <= 1
    finally:
        torch.set_num_threads(threads)
    assert sorted(rows.status) == ["error", "ok", "ok"]
    # the run's summary: both ok images scored by their median spread; unreliable the ones above 0.001 px
    ok = rows[rows.status == "ok"]
    scores = {uri: float(np.median(spread)) for uri, spread in zip(ok.uri, ok.keypoint_spread_px)}
    (record,) = [json.loads(path.read_text()) for path in (tmp_path / "out" / "_summary").glob("*.json")]
    assert record["confidence"] == summary.confidence.result()
    assert record["confidence"]["scored_images"] == 2
    assert record["confidence"]["unreliable_images"] == sum(score > 1e-3 for score in scores.values())
    worst = record["confidence"]["least_confident"]
    assert {entry["uri"]: entry["median_spread_px"] for entry in worst} == pytest.approx(scores, rel=1e-6)
    np.testing.assert_allclose([entry["median_spread_px"] for entry in worst], sorted(scores.values(), reverse=True), rtol=1e-6)


def _old_schema() -> pa.Schema:
    """The labels' schema before confidence existed, with the format's metadata."""
    fields = [field for field in OUTPUT_SCHEMA if field.name not in ("keypoint_spread_px", "peak_share")]
    return pa.schema(fields, metadata=OUTPUT_SCHEMA.metadata)


def _label_row(uri: str, **changes) -> dict:
    row = {
        "image_id": uri[-8:], "uri": uri, "content_hash": "0" * 16, "width": 40, "height": 30, "crop_box": None,
        "keypoints_xy": [[10.5, 10.5]], "keypoints_xy_normalized": [[0.26, 0.35]], "peaks": [0.5],
        "keypoint_spread_px": [2.0], "peak_share": [0.01], "artifact_id": "a", "model": "m", "status": "ok",
        "error_cause": None, "error": None, "labelled_at": datetime(2026, 1, 1, tzinfo=timezone.utc), "run_id": "ab",
    }  # fmt: skip
    return {**row, **changes}


def test_outputs_written_before_confidence_still_read_back_and_resume(tmp_path):
    old = _label_row("/img/old.png", image_id="old")
    old = {name: value for name, value in old.items() if name not in ("keypoint_spread_px", "peak_share")}
    pq.write_table(pa.Table.from_pylist([old], schema=_old_schema()), tmp_path / label_file_name("ab", "w1", 0))
    new = _label_row("/img/new.png", image_id="new", run_id="cd", keypoint_spread_px=[3.5])
    pq.write_table(pa.Table.from_pylist([new], schema=OUTPUT_SCHEMA), tmp_path / label_file_name("cd", "w2", 0))
    files = label_files(str(tmp_path))
    assert len(files.ours) == 2 and labelled_ids(files) == {"old", "new"}  # resume: both images are done
    table = read_labels(str(tmp_path)).to_pandas().set_index("image_id")
    assert table.loc["old", "keypoint_spread_px"] is None and table.loc["old", "peaks"].tolist() == [0.5]
    assert table.loc["new", "keypoint_spread_px"].tolist() == [3.5]
    chosen = read_labels(str(tmp_path), columns=["uri", "keypoint_spread_px"]).to_pylist()
    assert sorted(map(str, chosen)) == sorted(map(str, [{"uri": "/img/new.png", "keypoint_spread_px": [3.5]},
                                                        {"uri": "/img/old.png", "keypoint_spread_px": None}]))  # fmt: skip


# --- show.py ----------------------------------------------------------------------------------------


@pytest.fixture
def confident_labels(tmp_path) -> Path:
    """Four ok rows whose median spreads are 1, 9, 4 and 20 px (and no confidence for a fifth), an error row."""
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for name, median in (("a", 1.0), ("b", 9.0), ("c", 4.0), ("d", 20.0), ("e", None)):
        Image.new("RGB", (160, 90), (40, 60, 80)).save(images / f"{name}.png")
        spreads = None if median is None else [median / 2, median, median * 3]
        rows.append(_label_row(str(images / f"{name}.png"), image_id=name, width=160, height=90,
                               keypoints_xy=[[30.5, 20.5], [80.5, 45.5], [130.5, 60.5]],
                               keypoints_xy_normalized=None, peaks=[0.5] * 3, keypoint_spread_px=spreads,
                               peak_share=None if median is None else [0.01] * 3))  # fmt: skip
    rows.append(_label_row(str(images / "f.png"), image_id="f", status="error", error_cause="not_found",
                           error="gone", keypoints_xy=None, keypoint_spread_px=None, peak_share=None))  # fmt: skip
    folder = tmp_path / "labels"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), folder / label_file_name("ab", "w1", 0))
    return folder


def test_the_least_confident_rows_are_the_highest_median_spreads(confident_labels):
    rows = read_labels(str(confident_labels)).to_pylist()
    assert [row["image_id"] for row in least_confident_rows(rows, 3)] == ["d", "b", "c"]
    assert [row["image_id"] for row in least_confident_rows(rows, 10)] == ["d", "b", "c", "a"]
    with pytest.raises(ValueError, match="least_confident"):
        least_confident_rows(rows, 0)


def test_show_draws_the_least_confident_images_with_their_spread_circles(confident_labels, tmp_path, capsys):
    output = tmp_path / "doubtful.png"
    main = runpy.run_path(str(REPO / "jobs" / "show.py"))["main"]
    main(["--labels", str(confident_labels), "--least_confident", "2", "--output", str(output)])
    assert str(output) in capsys.readouterr().out
    rows = {row["image_id"]: row for row in read_labels(str(confident_labels)).to_pylist()}
    worst = np.asarray(label_picture(rows["d"]))
    grid = np.asarray(Image.open(output).convert("RGB"))
    pad = 4  # image_grid's margin
    assert np.array_equal(grid[pad : pad + worst.shape[0], pad : pad + worst.shape[1]], worst)  # the worst first
    second = np.asarray(label_picture(rows["b"]))
    assert np.array_equal(grid[pad : pad + second.shape[0], 2 * pad + 512 : 2 * pad + 1024], second)
    assert grid.shape[1] == 3 * pad + 1024  # two pictures, no more
    # keypoint 2 of d: spread 60 px around (130.5, 60.5) of a 160 x 90 image, drawn 512 / 160 = 3.2 times larger
    scale, (x, y), colour = 3.2, (130.5, 60.5), keypoint_colours(3)[2]
    ring = [(round(x * scale - 0.5 + 60 * scale * math.cos(t)), round(y * scale - 0.5 + 60 * scale * math.sin(t)))
            for t in np.linspace(2.7, 4.0, 9)]  # its left part, inside the 512 x 288 picture  # fmt: skip
    assert all(0 <= cx < 512 and 0 <= cy < 288 for cx, cy in ring)
    for cx, cy in ring:  # the ring's pixels, within 2 px of the computed circle, are keypoint 2's colour
        near = worst[cy - 2 : cy + 3, cx - 2 : cx + 3].astype(int)
        assert (np.abs(near - colour).sum(-1) < 40).any(), (cx, cy)
    middle = worst[round(y * scale - 0.5), round((x - 30) * scale)]  # halfway in: the image's own colour
    assert tuple(middle) == (40, 60, 80)
    plain = np.asarray(label_picture({**rows["d"], "keypoint_spread_px": None}))
    assert (plain[288:] != worst[288:]).any()  # the caption names the median spread


def test_show_says_when_no_row_has_confidence(tmp_path, capsys):
    folder = tmp_path / "labels"
    folder.mkdir()
    row = {**_label_row("/img/a0000001.png"), "keypoint_spread_px": None, "peak_share": None}
    pq.write_table(pa.Table.from_pylist([row], schema=OUTPUT_SCHEMA), folder / label_file_name("ab", "w1", 0))
    with pytest.raises(ValueError, match="no ok row .* has keypoint confidence"):
        show_labels(str(folder), str(tmp_path / "x.png"), least_confident=3)
    main = runpy.run_path(str(REPO / "jobs" / "show.py"))["main"]
    with pytest.raises(SystemExit) as exit_:
        main(["--labels", str(folder), "--least_confident", "1", "--sample", "2", "--output", "x.png"])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err
