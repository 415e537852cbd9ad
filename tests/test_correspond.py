"""The correspondence job (jobs/correspond.py --method dift) on Ray, on a miniature SPair-71k layout."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pair_fixtures import make_spair
from skp_ray.correspondence.dift_stage import prompt_for
from skp_ray.correspondence.feature_cache import FeatureCache, image_key
from skp_ray.correspondence.features import dift_features, draw_dift_noise, encode_prompt
from skp_ray.correspondence.job import CorrespondConfig, CorrespondSummary, run_correspondence
from skp_ray.correspondence.match_store import read_matches
from skp_ray.correspondence.matching import match_points
from skp_ray.correspondence.pair_rows import PairError, query_pixels
from skp_ray.correspondence.pairs import PairsError, build_pairs, write_pairs
from skp_ray.correspondence.report import pck_metrics
from skp_ray.images import content_hash, read_image, to_tensor
from skp_ray.plotting import correspondence_pair
from skp_ray.randomness import keyed_generator

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(600)  # a hung Ray run fails here instead of eating CI's budget

# Small enough for CPU tests: 256 px inputs, two noisy copies per image.
FAST = dict(image_size=256, ensemble_size=2, cpus_per_actor=0.5, progress=False, log_every_s=1.0)


@pytest.fixture(scope="module")
def spair(tmp_path_factory) -> Path:
    return make_spair(tmp_path_factory.mktemp("spair") / "SPair-71k", categories=("cat", "dog"), pairs_per_split=2)


def config(tiny21_path, pairs, output, **changes) -> CorrespondConfig:
    return CorrespondConfig(pairs=str(pairs), output=str(output), **{"model": tiny21_path, **FAST, **changes})


def test_the_job_matches_spair_pairs_writes_metrics_and_pictures_and_resumes(ray_session, tiny21_path, spair, tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, "jobs/correspond.py", "--method", "dift", "--pairs", "spair", "--root", str(spair),
               "--output", str(output), "--model", tiny21_path, "--image_size", "256", "--ensemble_size", "2",
               "--cpus_per_actor", "0.5", "--no-progress", "--log_every_s", "1"]  # fmt: skip
    environment = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[correspond] 4 pairs, 0 already matched, 4 to match" in result.stdout
    assert "[correspond] pairs: 4/4 pairs (100.0 %, 0 errors)" in result.stdout
    assert "PCK@0.1 (box):" in result.stdout

    rows = read_matches(str(output)).to_pandas()
    test_pairs = build_pairs("spair", str(spair))  # the published evaluation's split: test
    assert sorted(rows["pair_id"]) == sorted(test_pairs["pair_id"].to_pylist())
    assert (rows["status"] == "ok").all() and (rows["method"] == "dift").all()
    for row in rows.itertuples():
        predicted = np.stack(row.predicted_xy)
        assert predicted.shape == (len(row.source_points_xy), 2) and len(row.scores) == len(predicted)
        assert (predicted >= 0).all() and (predicted[:, 0] < row.target_width).all() and (predicted[:, 1] < row.target_height).all()

    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["reference"] == "box" and "object box" in metrics["reference_description"]
    assert metrics["dataset"] == "spair" and metrics["published_percent"]["pck@0.1"]["per_point"] == 59.5
    assert set(metrics["per_category"]) == {"cat", "dog"} and metrics["overall"]["pairs"] == 4
    for alpha in ("pck@0.05", "pck@0.1"):
        assert 0.0 <= metrics["overall"][alpha]["per_image"] <= 1.0
    # the metrics are what the rows say: recomputed here by hand from the distances
    hits = [np.linalg.norm(np.stack(r.predicted_xy) - np.stack(r.target_points_xy), axis=1)
            <= 0.1 * max(r.target_box_xyxy[2] - r.target_box_xyxy[0], r.target_box_xyxy[3] - r.target_box_xyxy[1])
            for r in rows.itertuples()]  # fmt: skip
    assert metrics["overall"]["pck@0.1"]["per_image"] == pytest.approx(np.mean([h.mean() for h in hits]))
    assert metrics["overall"]["pck@0.1"]["per_point"] == pytest.approx(np.concatenate(hits).mean())

    picture = Image.open(output / "pairs.png")
    assert picture.width > picture.height > 100
    page = (output / "report.html").read_text()
    assert "data:image/png;base64," in page and "PCK@0.1 per image" in page
    (summary_file,) = (output / "_summary").glob("*.json")
    counts = json.loads(summary_file.read_text())["counts"]
    assert counts["matched"] == 4 and counts["errors"] == 0 and counts["images_cached"] == 0

    again = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=500)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[correspond] 4 pairs, 4 already matched, 0 to match" in again.stdout
    assert len(pd.concat(pd.read_parquet(path) for path in output.glob("matches-*.parquet"))) == 4


def test_a_missing_image_is_an_error_row_and_retry_errors_fixes_it(ray_session, tiny21_path, spair, tmp_path):
    pairs = build_pairs("spair", str(spair))
    write_pairs(pairs, tmp_path / "pairs.parquet")
    victim = Path(pairs["target_uri"][0].as_py())
    kept = tmp_path / "kept.jpg"
    shutil.move(victim, kept)
    try:
        summary = run_correspondence(config(tiny21_path, tmp_path / "pairs.parquet", tmp_path / "out"))
    finally:
        shutil.move(kept, victim)
    rows = read_matches(str(tmp_path / "out")).to_pandas().set_index("pair_id")
    broken = [p for p, s, t in zip(pairs["pair_id"].to_pylist(), pairs["source_uri"].to_pylist(), pairs["target_uri"].to_pylist())
              if str(victim) in (s, t)]  # fmt: skip
    assert set(rows.index[rows["status"] == "error"]) == set(broken)
    assert (rows.loc[broken, "error_cause"] == "not_found").all()
    assert all(str(victim) in message for message in rows.loc[broken, "error"])
    assert summary.errors == {"not_found": len(broken)}

    retried = run_correspondence(config(tiny21_path, tmp_path / "pairs.parquet", tmp_path / "out", retry_errors=True))
    assert retried.matched == len(broken) and not retried.errors
    assert retried.images_cached > 0  # the images that did decode were not extracted again
    rows = read_matches(str(tmp_path / "out")).to_pandas()
    assert (rows["status"] == "ok").all() and rows["pair_id"].is_unique


def test_the_features_and_matches_are_those_of_an_image_extracted_alone(ray_session, tiny21, tiny21_path, spair, tmp_path):
    """Images batched three to an actor call give the features dift_features gives each image alone with its
    keyed noise, and the rows hold match_points' answer on them: batching changes nothing."""
    pairs = build_pairs("spair", str(spair))
    write_pairs(pairs, tmp_path / "pairs.parquet")
    job = config(tiny21_path, tmp_path / "pairs.parquet", tmp_path / "out", batch_size=3, seed=7)
    summary = run_correspondence(job)
    assert summary.images_extracted == len(set(pairs["source_uri"].to_pylist() + pairs["target_uri"].to_pylist()))

    pair = pairs.slice(0, 1).to_pylist()[0]
    prompt = prompt_for(job.prompt, pair["category"])
    assert prompt == f"a photo of a {pair['category']}"
    features = {}
    for side in ("source", "target"):
        image = read_image(pair[f"{side}_uri"])
        generator = keyed_generator(7, "dift", content_hash(image))
        latent_noise, noise = draw_dift_noise(tiny21, 1, ensemble_size=2, image_size=256, generator=generator)
        features[side] = dift_features(
            tiny21, to_tensor(image)[None], prompt_embeds=encode_prompt(tiny21, prompt), image_size=256,
            ensemble_size=2, latent_noise=latent_noise, noise=noise,
        )[0]  # fmt: skip
        cache = FeatureCache(str(tmp_path / "out" / "_features"), _feature_settings(job))
        cached = cache.load(image_key(pair[f"{side}_uri"], prompt))
        assert (cached.height, cached.width) == image.shape[:2]
        torch.testing.assert_close(cached.features, features[side], atol=1e-5, rtol=1e-4)

    points = query_pixels(pair["source_points_xy"], pair["source_height"], pair["source_width"])
    predicted, _ = match_points(features["source"], features["target"], points,
                                source_size=(pair["source_height"], pair["source_width"]),
                                target_size=(pair["target_height"], pair["target_width"]))  # fmt: skip
    row = read_matches(str(tmp_path / "out")).to_pandas().set_index("pair_id").loc[pair["pair_id"]]
    assert np.stack(row["predicted_xy"]).tolist() == predicted.tolist()


def _feature_settings(job):
    from skp_ray.correspondence.dift_stage import feature_settings

    return feature_settings(job)


def test_a_second_manifest_sharing_images_extracts_only_the_new_ones(ray_session, tiny21_path, spair, tmp_path):
    pairs = build_pairs("spair", str(spair))
    first, rest = pairs.slice(0, 2), pairs.slice(2)
    write_pairs(first, tmp_path / "first.parquet")
    write_pairs(pairs, tmp_path / "all.parquet")
    cache = str(tmp_path / "features")
    run_correspondence(config(tiny21_path, tmp_path / "first.parquet", tmp_path / "out", feature_cache=cache))
    summary = run_correspondence(config(tiny21_path, tmp_path / "all.parquet", tmp_path / "out", feature_cache=cache))
    uris = lambda table: set(table["source_uri"].to_pylist() + table["target_uri"].to_pylist())  # noqa: E731
    assert summary.already_matched == 2 and summary.matched == 2
    assert summary.images_extracted == len(uris(rest) - uris(first))
    assert summary.images_cached == len(uris(rest) & uris(first))
    rows = read_matches(str(tmp_path / "out")).to_pandas()
    assert sorted(rows["pair_id"]) == sorted(pairs["pair_id"].to_pylist())


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(method="sift"), "--method 'sift' is not one of"),
        (dict(pck_reference="bbox"), "--pck_reference 'bbox'"),
        (dict(feature_dtype="int8"), "--feature_dtype 'int8'"),
        (dict(prompt="a {thing}"), "only placeholder allowed is {category}"),
        (dict(ensemble_size=0), "must be at least 1"),
        (dict(unet_weights="/nowhere/unet.safetensors"), "/nowhere/unet.safetensors"),
        (dict(model="/nowhere/model"), "/nowhere/model"),
    ],
)
def test_bad_settings_are_refused_on_the_driver(tiny21_path, spair, tmp_path, refuse_ray, changes, message):
    refuse_ray("skp_ray.correspondence.job")
    write_pairs(build_pairs("spair", str(spair)), tmp_path / "pairs.parquet")
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("{", "\\{").replace("(", "\\(")):
        run_correspondence(config(tiny21_path, tmp_path / "pairs.parquet", tmp_path / "out", **changes))
    assert not (tmp_path / "out").exists()


def test_a_bad_pairs_manifest_is_refused_on_the_driver_naming_the_row(tiny21_path, tmp_path, refuse_ray, photos):
    refuse_ray("skp_ray.correspondence.job")
    image = sorted(photos.glob("*.jpg"))[0]
    (tmp_path / "pairs.csv").write_text(
        "pair_id,source_uri,target_uri,source_points_xy\n"
        f'good,{image},{image},"[[1, 2]]"\n'
        f'empty,{image},{image},"[]"\n'
    )
    with pytest.raises(PairsError, match="pairs.csv.*empty"):
        run_correspondence(config(tiny21_path, tmp_path / "pairs.csv", tmp_path / "out"))


def test_an_output_of_other_settings_is_refused(ray_session, tiny21_path, spair, tmp_path, refuse_ray):
    pairs = build_pairs("spair", str(spair)).slice(0, 1)
    write_pairs(pairs, tmp_path / "pairs.parquet")
    run_correspondence(config(tiny21_path, tmp_path / "pairs.parquet", tmp_path / "out"))
    refuse_ray("skp_ray.correspondence.job")
    with pytest.raises(ValueError, match="other settings"):
        run_correspondence(config(tiny21_path, tmp_path / "pairs.parquet", tmp_path / "out", timestep=100))


def test_query_pixels_round_to_the_nearest_pixel_and_refuse_points_outside():
    assert query_pixels([[0.4, 0.5], [9.6, 4.49], [9.9, 0]], 5, 10).tolist() == [[0, 1], [9, 4], [9, 0]]
    with pytest.raises(PairError, match=r"\(10, 2\) lies outside the 10 x 5 source image"):
        query_pixels([[10, 2]], 5, 10)


def _row(category, predicted, truth, box, status="ok", size=(100, 200)):
    return dict(category=category, predicted_xy=predicted, target_points_xy=truth, target_box_xyxy=box,
                status=status, target_height=size[0], target_width=size[1])  # fmt: skip


def test_pck_metrics_by_hand():
    # box 50 x 30: PCK@0.1 threshold 5 px, PCK@0.05 2.5 px; the image 200 x 100: 20 px and 10 px.
    rows = [
        _row("cat", [[0, 0], [10, 10]], [[3, 4], [10, 16]], [0, 0, 50, 30]),  # distances 5 (on the threshold), 6
        _row("dog", [[0, 0]], [[0, 2]], [10, 10, 60, 40]),  # distance 2
        _row("dog", [[0, 0]], None, None),  # no ground truth
        _row("dog", [[0, 0]], [[1, 1]], None),  # no box
        _row("cat", None, [[1, 1]], [0, 0, 50, 30], status="error"),
    ]
    metrics = pck_metrics(rows)
    assert metrics["unscored"] == {"error": 1, "no_ground_truth": 1, "no_reference_box": 1}
    assert metrics["overall"]["pck@0.1"] == {"per_image": pytest.approx((0.5 + 1) / 2), "per_point": pytest.approx(2 / 3)}
    assert metrics["overall"]["pck@0.05"] == {"per_image": pytest.approx(0.5), "per_point": pytest.approx(1 / 3)}
    assert metrics["per_category"]["cat"]["pck@0.1"]["per_image"] == pytest.approx(0.5)
    by_image = pck_metrics(rows, reference="image")
    assert by_image["unscored"]["no_reference_box"] == 0  # the image size is always known
    assert by_image["overall"]["pck@0.05"]["per_point"] == pytest.approx(1.0)  # all within 10 px


def test_the_pair_picture_puts_points_where_they_are():
    source = np.zeros((50, 100, 3), dtype=np.uint8)
    target = np.zeros((100, 100, 3), dtype=np.uint8)
    picture = correspondence_pair(source, target, np.array([[10, 40]]), np.array([[90, 20]]), height=100, gap=10)
    assert picture.size == (200 + 10 + 100, 100)
    red = (230, 25, 75)  # keypoint colour 0
    assert picture.getpixel((21, 81)) == red  # the source point, scaled by 2 (pixel centre 10.5 -> 21)
    assert picture.getpixel((200 + 10 + 90, 20)) == red  # the predicted target point


def test_prompts_read_dataset_categories_as_words():
    template = "a photo of a {category}"
    assert prompt_for(template, "aeroplane") == "a photo of a aeroplane"  # as the published code writes it
    assert prompt_for(template, "car(G)") == "a photo of a car"
    assert prompt_for(template, "001.Black_footed_Albatross") == "a photo of a Black footed Albatross"
    assert prompt_for(template, "") == ""


def test_the_feature_cache_round_trips_whole_files_and_keys_its_settings(tmp_path):
    features = torch.randn(6, 4, 5, generator=torch.Generator().manual_seed(0))
    cache = FeatureCache(str(tmp_path), {"timestep": 261}, storage_dtype="float16")
    cache.prepare()
    cache.save("k1", features, uri="/a.jpg", prompt="p", height=40, width=50, content_hash="abc")
    loaded = cache.load("k1")
    assert loaded.features.dtype == torch.float16 and (loaded.uri, loaded.height, loaded.width) == ("/a.jpg", 40, 50)
    assert torch.equal(loaded.features, features.half())
    assert cache.cached_keys() == {"k1"}
    assert sorted(p.name for p in Path(cache.folder).iterdir()) == ["k1.safetensors", "settings.json"]  # no temp file
    assert FeatureCache(str(tmp_path), {"timestep": 261}).hash != cache.hash  # float32 storage: another folder
    assert FeatureCache(str(tmp_path), {"timestep": 100}, storage_dtype="float16").hash != cache.hash
    with pytest.raises(FileNotFoundError, match="no cached features"):
        cache.load("k2")


def test_rows_and_features_can_live_on_object_storage(ray_session, s3_endpoint, tiny21_path, spair, tmp_path):
    import fsspec

    fsspec.filesystem("s3").mkdir("matches")
    write_pairs(build_pairs("spair", str(spair)).slice(0, 1), tmp_path / "pairs.parquet")
    summary = run_correspondence(config(tiny21_path, tmp_path / "pairs.parquet", "s3://matches/run"))
    assert summary.matched == 1 and not summary.errors
    assert read_matches("s3://matches/run")["status"].to_pylist() == ["ok"]
    again = run_correspondence(config(tiny21_path, tmp_path / "pairs.parquet", "s3://matches/run", retry_errors=True))
    assert again.matched == 0


def test_the_summary_fails_a_run_past_the_error_fraction_and_names_the_first_failures():
    def summary(matched: int, errors: int) -> CorrespondSummary:
        failures = [{"pair_id": f"p{i}", "cause": "not_found", "error": "gone"} for i in range(errors)]
        work = {"images_extracted": 3, "images_cached": 1}
        return CorrespondSummary("out", "run", matched, 0, matched, {"not_found": errors} if errors else {}, failures, work, 1.0)

    assert summary(4, 2).failure(0.5) is None  # exactly the fraction is allowed
    assert summary(4, 3).failure(0.5) == "3 of 4 pairs failed, more than --max_error_fraction 0.5"
    assert summary(2, 2).failure(1.0) == "every one of the 2 pairs matched failed"
    assert summary(0, 0).failure(0.0) is None
    lines = summary(12, 12).describe().splitlines()
    assert lines[0].startswith("[correspond] done: 12 pairs matched (0 ok, 12 errors: not_found 12)")
    assert "3 images extracted, 1 from the feature cache" in lines[0]
    assert lines[1] == "[correspond]   failed: pair p0 (not_found): gone"
    assert lines[11] == "[correspond]   ... and 2 more (see the summary file)"  # ten named, then the rest counted
