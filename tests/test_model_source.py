"""The model check that jobs' drivers run before Ray starts: what it refuses, and what the drivers' modules
leave to the workers (labelling's, correspondence's, evaluation's, serving's and the manifest and show jobs'
import no torch, discovery's no diffusers)."""

import shutil
import subprocess
import sys

import pytest

from skp_ray.model_source import ModelNotFoundError, check_model


def test_a_complete_pipeline_folder_passes(tiny_model_path):
    check_model(tiny_model_path)


@pytest.mark.parametrize("damage", ["no scheduler config", "vae config not JSON", "no unet weights"])
def test_a_damaged_pipeline_folder_is_refused_naming_what_is_wrong(tiny_model_path, tmp_path, damage):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_path, folder)
    if damage == "no scheduler config":
        (folder / "scheduler" / "scheduler_config.json").unlink()
        cause = "scheduler/scheduler_config.json is missing"
    elif damage == "vae config not JSON":
        (folder / "vae" / "config.json").write_text("{not json")
        cause = "vae/config.json is not JSON"
    else:
        for weights in (folder / "unet").glob("diffusion_pytorch_model*"):
            weights.unlink()
        cause = "unet/ holds no diffusion_pytorch_model weights"
    with pytest.raises(ModelNotFoundError, match="must hold model_index.json") as error:
        check_model(folder)
    assert cause in str(error.value)


def test_the_configs_are_returned_as_read(tiny_model_path):
    configs = check_model(tiny_model_path)
    assert configs["unet"]["cross_attention_dim"] == 32 and configs["vae"]["latent_channels"] == 4
    assert configs[""]["_class_name"] == "StableDiffusionPipeline"


def test_a_model_index_is_read_as_json(tiny_model_path, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_path, folder)
    (folder / "model_index.json").write_text("")
    with pytest.raises(ModelNotFoundError, match="model_index.json is not JSON"):
        check_model(folder)


def test_the_labelling_driver_checks_everything_without_torch_or_diffusers(tiny_model_path, tmp_path):
    """The driver's start-up: its modules, the artifact check and the model check, none importing torch."""
    import torch

    from skp_ray.artifact import KeypointArtifact, save_artifact

    save_artifact(KeypointArtifact(torch.zeros(4, 32), [1], model=str(tiny_model_path)), str(tmp_path / "artifact"))
    script = (
        "import sys\n"
        "import skp_ray.labelling, skp_ray.config\n"
        "from skp_ray.artifact import check_artifact\n"
        "from skp_ray.model_source import check_artifact_model\n"
        f"artifact = check_artifact({str(tmp_path / 'artifact')!r})\n"
        "check_artifact_model(artifact)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "[]"


MODEL_LIBRARIES = ("torch", "diffusers", "transformers")


@pytest.mark.parametrize(
    "driver, left_to_workers",
    [
        ("skp_ray.discovery", ("diffusers", "transformers")),  # Ray Train's TorchTrainer itself needs torch
        ("skp_ray.evaluation", MODEL_LIBRARIES),  # the report, drawn last, imports them
        ("skp_ray.correspondence.job", MODEL_LIBRARIES),
        ("skp_ray.datasets", MODEL_LIBRARIES),  # jobs/manifest.py
        ("skp_ray.label_pictures", MODEL_LIBRARIES),  # jobs/show.py
        ("skp_ray.serving", MODEL_LIBRARIES),  # the replicas import them (skp_ray.serving_detector)
    ],
)
def test_the_drivers_modules_leave_the_model_libraries_to_the_workers(driver, left_to_workers):
    """A job's ``--help`` and its refusal of a bad setting answer in seconds: its driver's modules do not
    import what only the workers that hold the model need (about 5 s on 2 cores)."""
    script = f"import sys\nimport {driver}\nprint(sorted(m for m in {left_to_workers!r} if m in sys.modules))\n"
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "[]"


@pytest.mark.parametrize("method", ["dift", "ldm"])
def test_the_correspondence_driver_runs_up_to_ray_without_torch(tiny_model_path, tiny21_path, tmp_path, method):
    """Everything the correspondence job's driver does before Ray starts (settings, the model, the pairs, the
    feature cache or context store, the lease, the rows already there) runs without the model libraries."""
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30), "gray").save(tmp_path / name)
    (tmp_path / "pairs.csv").write_text(
        "pair_id,source_uri,target_uri,source_points_xy\n"
        f'one,{tmp_path / "a.png"},{tmp_path / "b.png"},"[[1, 2]]"\n'
    )
    model = tiny21_path if method == "dift" else tiny_model_path
    script = (
        "import sys\n"
        "import skp_ray.correspondence.job as job\n"
        "def reached():\n"
        f"    print(sorted(m for m in {MODEL_LIBRARIES!r} if m in sys.modules))\n"
        "    raise SystemExit(0)\n"
        "job.connect = reached\n"
        f"job.run_correspondence(job.CorrespondConfig(pairs={str(tmp_path / 'pairs.csv')!r}, "
        f"output={str(tmp_path / 'out')!r}, model={model!r}, method={method!r}))\n"
        "print('Ray was never reached')\n"
    )
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip().splitlines()[-1] == "[]"
