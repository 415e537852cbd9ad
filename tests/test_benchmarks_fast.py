"""Each issue-16 benchmark's smallest setting on the tiny model: it runs and writes its JSON keys.

No timing is asserted. The discovery benchmark's Ray Train scaling part is left out here (``--workers``
with no value): starting Ray Train twice alone takes longer than this file's budget.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

pytestmark = pytest.mark.timeout(300)

SMALL = ["--model", "tiny", "--image_size", "64", "--repeats", "1", "--no_warm_up", "--threads", "1", "--no_results"]


def run_benchmark(module_name: str, tmp_path: Path, *options: str) -> dict:
    module = __import__(module_name)
    output = tmp_path / f"{module_name}.json"
    module.main([*SMALL, *options, "--output", str(output)])
    return json.loads(output.read_text())


def test_detection_speed(tmp_path):
    result = run_benchmark("detection_speed", tmp_path, "--images", "1", "--augmentations", "2", "--tta_latent")
    assert {"baseline", "skp_ray", "unavoidable", "capture_alone", "tta_latent"} <= set(result["figures"])
    for key in ("speedup_vs_baseline", "detection_vs_unavoidable", "capture_share", "tta_latent_vs_baseline",
                "tta_latent_within_2px_of_exact", "tta_latent_median_px_diff_vs_exact"):  # fmt: skip
        assert result[key] is not None, key
    # The same thetas and noise, float32 both: the fast path lands on the published keypoints.
    assert result["keypoints_max_px_diff_vs_baseline"] <= 1.5


def test_discovery_speed(tmp_path):
    result = run_benchmark("discovery_speed", tmp_path, "--batch_size", "2", "--workers")
    assert set(result["figures"]) == {"reference", "skp_ray"}
    assert result["speedup_vs_reference"] > 0 and result["scaling"] is None
    assert result["loss_abs_diff"] <= 1e-3 * abs(result["loss_reference"])
    assert result["grad_max_abs_diff"] <= 1e-3 * result["grad_max_abs"]


def test_flops(tmp_path):
    result = run_benchmark("flops", tmp_path, "--augmentations", "2", "--batch_size", "2", "--peak_side", "512")
    image = result["flops_per_image"]
    assert image["vae_encode"] > 0 and image["unet_to_last_captured_layer"] > 0 and image["capture_counted"] > 0
    assert image["total"] == image["detect_with_confidence_counted"] + image["capture_softmax_analytic"]
    assert result["flops_per_step"]["total"] > result["flops_per_step"]["step_counted"] > 0
    assert 0 < result["fraction_of_peak"]["detection"] and 0 < result["fraction_of_peak"]["discovery"]


def test_pipeline_efficiency(tmp_path, monkeypatch):
    monkeypatch.delenv("SKP_RAY_DASHBOARD", raising=False)
    result = run_benchmark(
        "pipeline_efficiency", tmp_path, "--images", "16", "--batch_size", "4", "--augmentations", "1",
        "--workdir", str(tmp_path),
    )  # fmt: skip
    runs = result["runs"]
    assert runs["own"][0]["rows"] == runs["running"][0]["rows"] == runs["direct"][0]["rows"] == 16
    assert result["efficiency"]["own"] > 0 and result["efficiency"]["running"] > 0
    assert result["startup_s"]["running"] > 0 and result["startup_s"]["own"] > 0
    assert runs["own"][0]["dashboard"] is False  # a job's own Ray starts without one


def test_gpu_suite_smoke_runs_every_step(tmp_path):
    """The GPU machine's one prepared script, with --smoke on this CPU: every step runs and leaves its JSON."""
    environment = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh"), str(tmp_path), "--smoke"], env=environment, check=True,
                   capture_output=True, timeout=280)  # fmt: skip
    statuses = dict(line.split(": exit ") for line in (tmp_path / "summary.txt").read_text().splitlines())
    assert list(statuses) == [
        "device", "cuda_tests", "detection_float32", "discovery_float32", "flops", "detection_bfloat16", "ldm_correspondence"
    ]  # fmt: skip
    assert all(status.startswith("0 ") for status in statuses.values()), statuses
    assert json.loads((tmp_path / "flops.json").read_text())["fraction_of_peak"]["detection"] > 0
    assert json.loads((tmp_path / "detection_bfloat16.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "RESULTS-new.md").read_text() == ""  # smoke runs append nothing to RESULTS.md
