import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from skp_ray.diffusion import default_tiny_model

REPO = Path(__file__).resolve().parents[1]


def test_default_tiny_model_is_built_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SKP_RAY_CACHE", str(tmp_path))
    folder = default_tiny_model()
    stamp = os.stat(Path(folder) / "unet" / "config.json").st_mtime_ns
    assert default_tiny_model() == folder
    assert os.stat(Path(folder) / "unet" / "config.json").st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-sd15-v1"]  # no staging folders left


def test_demo_job_runs_on_the_embedded_default(tmp_path):
    environment = dict(os.environ, SKP_RAY_CACHE=str(tmp_path / "cache"))
    command = [sys.executable, "jobs/demo.py", "--output", str(tmp_path / "out"), "--num_images", "3",
               "--num_tokens", "8", "--num_steps", "2", "--batch_size", "2", "--top_k", "3",
               "--furthest_point_num_samples", "5", "--augmentation_iterations", "2"]
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2: loss" in result.stdout
    (run,) = (tmp_path / "out").iterdir()
    record = json.loads((run / "keypoints.json").read_text())
    assert len(record["images"]) == 3 and len(record["token_indices"]) == 3
    for image in record["images"]:
        assert len(image["keypoints_yx"]) == 3
        assert all(0 <= value <= 1 for point in image["keypoints_yx"] for value in point)
    assert f"picture in {run / 'keypoints.png'}" in result.stdout
    picture = Image.open(run / "keypoints.png")
    assert picture.width > 3 * 256 and picture.height > 2 * 256
