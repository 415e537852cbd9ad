"""The correspondence job's prompt-optimised method (jobs/correspond.py --method ldm, SPEC 3) on Ray, on a
miniature SPair-71k layout, with the tiny SD 1.5-shaped model at a 128 px model input."""

import contextlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pair_fixtures import make_spair
from skp_ray.config import parse_settings
from skp_ray.correspondence.context_store import ContextStore, context_key
from skp_ray.correspondence.dift_stage import pair_items
from skp_ray.correspondence.job import CorrespondConfig, run_correspondence
from skp_ray.correspondence.ldm_actors import canvas_points, target_pixels
from skp_ray.correspondence.ldm_contexts import optimize_point_contexts
from skp_ray.correspondence.ldm_locate import locate_point
from skp_ray.correspondence.ldm_settings import CANVAS, context_settings
from skp_ray.correspondence.ldm_stage import missing_contexts
from skp_ray.correspondence.match_store import read_matches
from skp_ray.correspondence.pair_rows import query_pixels
from skp_ray.correspondence.pairs import build_pairs, pairs_table, write_pairs
from skp_ray.images import ImageSource, load_source
from skp_ray.randomness import keyed_generator

pytestmark = pytest.mark.timeout(600)

# Small enough for CPU tests: a 128 px model input, 3 steps, 2 restarts, 6 passes.
FAST = dict(method="ldm", image_size=128, num_steps=3, restarts=2, passes=6, cpus_per_actor=0.5, progress=False, log_every_s=1.0)


@pytest.fixture(scope="module")
def spair(tmp_path_factory) -> Path:
    return make_spair(tmp_path_factory.mktemp("spair") / "SPair-71k", categories=("cat", "dog"), pairs_per_split=2)


def config(model, pairs, output, **changes) -> CorrespondConfig:
    return CorrespondConfig(pairs=str(pairs), output=str(output), **{"model": model, **FAST, **changes})


@pytest.fixture(scope="module")
def ldm_run(ray_session, tiny_model_path, spair, tmp_path_factory):
    """One run of the job on SPair's test pairs, shared by the tests that read its output."""
    folder = tmp_path_factory.mktemp("ldm")
    pairs = build_pairs("spair", str(spair))
    write_pairs(pairs, folder / "pairs.parquet")
    job = config(tiny_model_path, folder / "pairs.parquet", folder / "out")
    return {"pairs": pairs, "job": job, "output": folder / "out", "summary": run_correspondence(job)}


@contextlib.contextmanager
def torch_threads(count: int):
    """Ray starts a 0.5-CPU actor with OMP_NUM_THREADS=1; other thread counts may round sums differently."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def distinct_source_pixels(pairs) -> set:
    return {(row["source_uri"], x, y) for row in pairs.to_pylist()
            for x, y in query_pixels(row["source_points_xy"], row["source_height"], row["source_width"]).tolist()}  # fmt: skip


def test_the_job_locates_spair_points_and_writes_metrics_pictures_and_contexts(ldm_run):
    pairs, output, summary = ldm_run["pairs"], ldm_run["output"], ldm_run["summary"]
    rows = read_matches(str(output)).to_pandas().set_index("pair_id")
    assert sorted(rows.index) == sorted(pairs["pair_id"].to_pylist())
    assert (rows["status"] == "ok").all() and (rows["method"] == "ldm").all()
    for pair in pairs.to_pylist():
        row = rows.loc[pair["pair_id"]]
        expected = query_pixels(pair["source_points_xy"], pair["source_height"], pair["source_width"])
        assert np.stack(row.source_points_xy).tolist() == expected.tolist()
        predicted = np.stack(row.predicted_xy)
        assert predicted.shape == expected.shape and len(row.scores) == len(predicted)
        assert (predicted >= 0).all() and (predicted[:, 0] < row.target_width).all() and (predicted[:, 1] < row.target_height).all()
        assert (row.target_width, row.target_height) == (pair["target_width"], pair["target_height"])

    points = distinct_source_pixels(pairs)
    assert summary.points_optimised == len(points) and summary.points_reused == 0 and not summary.errors
    store = ContextStore(str(output / "_contexts"), context_settings(ldm_run["job"]))
    assert store.cached_keys() == {context_key(uri, x, y) for uri, x, y in points}
    assert len({row["settings_hash"] for row in read_matches(str(output)).to_pylist()}) == 1

    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["method"] == "ldm" and metrics["overall"]["pairs"] == 4
    assert metrics["published_percent"]["pck@0.1"]["per_image"] == 45.4
    assert 0.0 <= metrics["overall"]["pck@0.1"]["per_image"] <= 1.0
    assert Image.open(output / "pairs.png").width > 100
    report = (output / "report.html").read_text()
    assert "PCK@0.1 per image" in report and 'alt="context loss curve"' in report
    assert Image.open(output / "contexts_loss.png").size == (560, 320)
    (summary_file,) = (output / "_summary").glob("*.json")
    record = json.loads(summary_file.read_text())
    assert record["counts"]["points_optimised"] == len(points) and "images_extracted" not in record["counts"]
    assert record["context_cache"] == store.location


def test_a_rerun_adds_nothing_and_another_output_reuses_the_contexts(ldm_run, tmp_path, capsys):
    output, job = ldm_run["output"], ldm_run["job"]
    capsys.readouterr()
    again = run_correspondence(job)
    assert (again.matched, again.already_matched, again.points_optimised) == (0, 4, 0)
    assert "did not write" not in capsys.readouterr().out  # its own metrics, pictures and report are not foreign
    assert len(pd.concat(pd.read_parquet(path) for path in output.glob("matches-*.parquet"))) == 4

    shared = run_correspondence(config(job.model, job.pairs, tmp_path / "other", context_cache=str(output / "_contexts")))
    assert shared.matched == 4 and not shared.errors
    assert shared.points_optimised == 0 and shared.points_reused == ldm_run["summary"].points_optimised
    first = read_matches(str(output)).to_pandas().set_index("pair_id").sort_index()
    second = read_matches(str(tmp_path / "other")).to_pandas().set_index("pair_id").sort_index()
    assert first["settings_hash"].equals(second["settings_hash"])
    for a, b in zip(first.itertuples(), second.itertuples()):  # keyed draws: the same answers from other actors
        assert np.stack(a.predicted_xy).tolist() == np.stack(b.predicted_xy).tolist()
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)


def test_contexts_and_predictions_are_those_of_a_point_handled_alone(ldm_run, tiny):
    """A point optimised with the other points of its image gives the contexts it gets alone with its keyed
    generator; the row's predictions are locate_point's on the stored contexts."""
    job, pairs = ldm_run["job"], ldm_run["pairs"]
    pair = max(pairs.to_pylist(), key=lambda row: len(row["source_points_xy"]))
    assert len(pair["source_points_xy"]) >= 2
    store = ContextStore(str(ldm_run["output"] / "_contexts"), context_settings(job))
    source = load_source(ImageSource(pair["source_uri"]), size=CANVAS)
    pixels = query_pixels(pair["source_points_xy"], source.height, source.width)
    x, y = pixels[-1].tolist()
    alone = optimize_point_contexts(
        tiny, source.pixels, canvas_points([[x, y]], source.height, source.width), num_steps=3, restarts=2,
        image_size=128, generator=[keyed_generator(0, "ldm-contexts", source.content_hash, x, y)],
    )  # fmt: skip
    stored = store.load(context_key(pair["source_uri"], x, y))
    assert stored.point_xy == (x, y) and (stored.height, stored.width) == (source.height, source.width)
    torch.testing.assert_close(stored.contexts, alone.contexts[0], atol=1e-5, rtol=1e-4)

    target = load_source(ImageSource(pair["target_uri"]), size=CANVAS)
    contexts = torch.stack([store.load(context_key(pair["source_uri"], px, py)).contexts for px, py in pixels.tolist()])
    generators = [keyed_generator(0, "ldm-locate", target.content_hash, context_key(pair["source_uri"], px, py))
                  for px, py in pixels.tolist()]
    with torch_threads(1):  # as in the actor: its batching and thread count, so the same rounding
        located = locate_point(
            tiny, target.pixels, contexts, passes=6, image_size=128, generator=generators, max_batch=job.max_batch
        )
    row = read_matches(str(ldm_run["output"])).to_pandas().set_index("pair_id").loc[pair["pair_id"]]
    assert np.stack(row["predicted_xy"]).tolist() == target_pixels(located.canvas_yx, target.height, target.width).tolist()
    np.testing.assert_allclose(row["scores"], located.scores.numpy(), rtol=1e-5)


def test_missing_images_and_points_outside_are_error_rows(ray_session, tiny_model_path, spair, tmp_path):
    rows = build_pairs("spair", str(spair)).to_pylist()
    missing = str(tmp_path / "gone.jpg")
    rows[1]["source_uri"] = missing
    rows[2]["target_uri"] = missing
    outside = rows[3]
    outside["source_points_xy"] = outside["source_points_xy"] + [[outside["source_width"] + 3.0, 1.0]]
    outside["target_points_xy"] = outside["target_points_xy"] + [[1.0, 1.0]]
    for row in rows[1:]:  # sizes the manifest cannot know (and that would refuse the point outside)
        row.update(source_width=None, source_height=None, target_width=None, target_height=None)
    write_pairs(pairs_table(rows, "user"), tmp_path / "pairs.parquet")
    summary = run_correspondence(config(tiny_model_path, tmp_path / "pairs.parquet", tmp_path / "out", max_error_fraction=0.9))

    found = read_matches(str(tmp_path / "out")).to_pandas().set_index("pair_id")
    ids = [row["pair_id"] for row in rows]
    assert found.loc[ids[0], "status"] == "ok"
    assert found.loc[ids[1:], "error_cause"].tolist() == ["not_found", "not_found", "points_outside"]
    assert missing in found.loc[ids[1], "error"] and found.loc[ids[1], "error"].startswith("source image")
    assert found.loc[ids[2], "error"].startswith("target image") and "lies outside" in found.loc[ids[3], "error"]
    assert summary.errors == {"not_found": 2, "points_outside": 1}
    # the point outside is skipped; the other points of its pair are optimised all the same
    sizes = {row["source_uri"]: (row["source_height"], row["source_width"]) for row in build_pairs("spair", str(spair)).to_pylist()}
    decoded = [(row["source_uri"], row["source_points_xy"]) for row in rows[:1] + rows[2:3]] + [
        (outside["source_uri"], outside["source_points_xy"][:-1])
    ]
    pixels = {(uri, x, y) for uri, points in decoded for x, y in query_pixels(points, *sizes[uri]).tolist()}
    assert summary.points_optimised == len(pixels)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(method="sift"), "--method 'sift' is not one of"),
        (dict(num_steps=0), "--num_steps, --restarts and --passes must be at least 1"),
        (dict(passes=0), "--num_steps, --restarts and --passes must be at least 1"),
        (dict(num_tokens=1), "--num_tokens must be more than 1"),
        (dict(lr=0.0), "--lr and --sigma must be positive"),
        (dict(crop_fraction=1.5), "--crop_fraction must lie in (0, 1]"),
        (dict(crop_margin=0.5), "--crop_margin must lie in [0, 0.5)"),
        (dict(noise_level=50), "--noise_level is a DDIM step index, 0..49"),
        (dict(image_size=0), "must be at least 1"),
        (dict(unet_weights="/nowhere/unet.safetensors"), "/nowhere/unet.safetensors"),
    ],
)
def test_bad_ldm_settings_are_refused_on_the_driver(tiny_model_path, spair, tmp_path, refuse_ray, changes, message):
    refuse_ray("skp_ray.correspondence.job")
    write_pairs(build_pairs("spair", str(spair)), tmp_path / "pairs.parquet")
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        run_correspondence(config(tiny_model_path, tmp_path / "pairs.parquet", tmp_path / "out", **changes))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes", [dict(passes=4), dict(published_quirks=False), dict(method="dift", image_size=256)])
def test_an_output_of_other_settings_is_refused(ldm_run, refuse_ray, changes):
    refuse_ray("skp_ray.correspondence.job")
    with pytest.raises(ValueError, match="other settings"):
        run_correspondence(config(ldm_run["job"].model, ldm_run["job"].pairs, ldm_run["output"], **changes))


def test_the_context_store_round_trips_whole_files_and_keys_its_settings(tmp_path):
    contexts = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    store = ContextStore(str(tmp_path), {"num_steps": 129})
    store.prepare()
    key = context_key("/a.jpg", 3, 4)
    store.save(key, contexts, uri="/a.jpg", point_xy=(3, 4), height=40, width=50, content_hash="abc")
    loaded = store.load(key)
    assert torch.equal(loaded.contexts, contexts) and loaded.contexts.dtype == torch.float32
    assert (loaded.uri, loaded.point_xy, loaded.height, loaded.width, loaded.content_hash) == ("/a.jpg", (3, 4), 40, 50, "abc")
    assert store.metadata(key)["width"] == "50" and store.exists(key) and store.cached_keys() == {key}
    assert sorted(p.name for p in Path(store.folder).iterdir()) == [f"{key}.safetensors", "settings.json"]
    assert len({key, context_key("/a.jpg", 4, 3), context_key("/b.jpg", 3, 4)}) == 3
    assert ContextStore(str(tmp_path), {"num_steps": 3}).hash != store.hash
    with pytest.raises(FileNotFoundError, match="no stored contexts at .* \\(point key"):
        store.load(context_key("/a.jpg", 0, 0))


def test_the_context_store_works_on_object_storage(s3_endpoint):
    import fsspec

    fsspec.filesystem("s3").mkdir("contexts")
    store = ContextStore("s3://contexts/run", {"num_steps": 129})
    store.prepare()
    key = context_key("s3://images/a.jpg", 1, 2)
    store.save(key, torch.ones(1, 3, 4), uri="s3://images/a.jpg", point_xy=(1, 2), height=9, width=8, content_hash="abc")
    assert store.cached_keys() == {key} and store.metadata(key)["height"] == "9"
    assert torch.equal(store.load(key).contexts, torch.ones(1, 3, 4))


def test_canvas_points_map_pixel_centres_there_and_back():
    for height, width in ((60, 100), (700, 1000), (512, 512)):
        pixels = np.array([[0, 0], [width - 1, height - 1], [width // 3, height // 2]])
        on_canvas = canvas_points(pixels, height, width)
        assert on_canvas.min() > -0.5 and on_canvas.max() < CANVAS - 0.5  # inside the canvas's pixels
        assert target_pixels(on_canvas, height, width).tolist() == pixels.tolist()
    assert canvas_points([[0, 0]], 256, 128).tolist() == [[0.5, 1.5]]  # centre (0.5, 0.5) -> (1, 2) on the canvas
    assert target_pixels(torch.tensor([[511, 0]]), 256, 128).tolist() == [[0, 255]]


def test_missing_contexts_lists_each_source_point_once_and_leaves_out_stored_ones(spair):
    pairs = build_pairs("spair", str(spair))
    items, images = pair_items(pairs, "")
    work, reused = missing_contexts(items, images, set())
    sources = {row["source_uri"] for row in pairs.to_pylist()}
    assert reused == 0 and sorted(row["uri"] for row in work) == sorted(sources)
    first = work[0]
    points = json.loads(first["points_json"])
    assert len(points) == len({tuple(p) for p in points})
    stored = {context_key(first["uri"], *np.floor(np.array(points[0]) + 0.5).astype(int).tolist())}
    again, reused = missing_contexts(items, images, stored)
    assert reused == 1 and json.loads(next(row for row in again if row["uri"] == first["uri"])["points_json"]) == points[1:]


def test_the_ldm_options_come_from_the_command_line():
    settings = parse_settings(
        CorrespondConfig, ["--pairs", "p.csv", "--output", "out", "--method", "ldm", "--no-published-quirks", "--passes", "4"]
    )
    assert settings == {"pairs": "p.csv", "output": "out", "method": "ldm", "published_quirks": False, "passes": 4}
    defaults = CorrespondConfig(pairs="p.csv", output="out")
    assert defaults.model is None and defaults.image_size is None  # the method's own, resolved on the driver
