import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from skp_ray.config import checked, parse_settings, refusals_as_messages
from skp_ray.discovery import EMBEDDED_DEFAULT, DiscoveryConfig, discovery_config
from skp_ray.lease import LeaseHeldError


@dataclass
class Example:
    num_steps: int = 500
    lr: float = 5e-3
    name: str | None = None
    use_gpu: bool = False
    layers: tuple[int, ...] = (0, 1, 2, 3)
    augment_scale: tuple[float, float] = (0.8, 1.0)


def test_only_given_settings_are_returned_with_their_types():
    settings = parse_settings(
        Example, ["--num_steps", "7", "--use-gpu", "--layers", "1", "3", "--augment_scale", "0.5", "1"]
    )
    assert settings == {"num_steps": 7, "use_gpu": True, "layers": (1, 3), "augment_scale": (0.5, 1.0)}
    assert parse_settings(Example, []) == {}
    assert parse_settings(Example, ["--no-use-gpu", "--name", "run"]) == {"use_gpu": False, "name": "run"}


def test_flags_override_the_yaml_file(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("num_steps: 20\nlr: 0.1\nnum-steps: 30\nlayers: [2]\n")
    settings = parse_settings(Example, ["--config", str(config), "--lr", "0.5"])
    assert settings == {"num_steps": 30, "lr": 0.5, "layers": (2,)}  # hyphenated keys are the same option


@pytest.mark.parametrize(
    "text, message",
    [
        ("num_step: 3\n", r"unknown option\(s\) \['num_step'\]"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("a: [\n", "not valid YAML"),
        ("lr: fast\n", "lr: expected a number, got 'fast'"),
        ("layers: 0 one 2\n", "layers: expected a whole number, got 'one'"),
        ("augment_scale: 0.8\n", "augment_scale: expected 2 values"),
        ("use_gpu: maybe\n", "use_gpu: expected true or false"),
        ("num_steps: 2.5\n", "num_steps: expected a whole number"),
    ],
)
def test_a_bad_yaml_file_is_named_in_the_error(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        parse_settings(Example, ["--config", str(config)])
    assert str(config) in str(error.value)


def test_a_missing_yaml_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        parse_settings(Example, ["--config", str(tmp_path / "nope.yaml")])


def test_a_bad_flag_value_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        parse_settings(Example, ["--num_steps", "many"])
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_the_embedded_default_applies_only_without_a_model():
    tiny = discovery_config({"num_steps": 3})
    assert tiny.num_steps == 3 and tiny.num_tokens == EMBEDDED_DEFAULT["num_tokens"]
    real = discovery_config({"model": "stable-diffusion-v1-5/stable-diffusion-v1-5"})
    published = DiscoveryConfig()
    assert (real.num_steps, real.num_tokens, real.top_k, real.furthest_point_num_samples) == (500, 500, 10, 25)
    assert (real.lr, real.batch_size, real.num_indices, real.sigma) == (published.lr, 4, 100, 2.0)
    assert (real.sharpening_loss_weight, real.equivariance_attn_loss_weight) == (100.0, 1000.0)


def test_required_settings_may_come_from_flags_or_the_file(tmp_path, capsys):
    from skp_ray.labelling import LabelConfig

    with pytest.raises(SystemExit):
        parse_settings(LabelConfig, ["--input", "images/"])
    assert "--artifact, --output required" in capsys.readouterr().err
    config = tmp_path / "label.yaml"
    config.write_text("artifact: outputs/run\noutput: labels/\n")
    settings = parse_settings(LabelConfig, ["--config", str(config), "--input", "images/"])
    assert LabelConfig(**settings).artifact == "outputs/run"


def test_yaml_strings_are_typed_on_the_driver(tmp_path):
    """PyYAML reads 5e-3 and "0 1 2" as strings: both are accepted as what the option means."""
    config = tmp_path / "discover.yaml"
    config.write_text("lr: 5e-3\nlayers: 0 1 2\nnum_steps: '20'\naugment_scale: [0.7, '1']\nuse_gpu: 'no'\n")
    settings = parse_settings(DiscoveryConfig, ["--config", str(config)])
    assert settings["lr"] == 0.005 and isinstance(settings["lr"], float)
    assert settings["layers"] == (0, 1, 2) and settings["num_steps"] == 20
    assert settings["augment_scale"] == (0.7, 1.0) and settings["use_gpu"] is False


def test_a_config_built_in_python_is_typed_too():
    config = checked(DiscoveryConfig(lr="5e-3", layers="0 1"))
    assert (config.lr, config.layers) == (0.005, (0, 1))
    with pytest.raises(ValueError, match="num_tokens: expected a whole number"):
        checked(DiscoveryConfig(num_tokens="many"))


@pytest.mark.parametrize(
    "job, config_class",
    [
        ("jobs/discover.py", "skp_ray.discovery:DiscoveryConfig"),
        ("jobs/label.py", "skp_ray.labelling:LabelConfig"),
        ("jobs/evaluate.py", "skp_ray.evaluation:EvaluateConfig"),
        ("jobs/manifest.py", "skp_ray.datasets:ManifestConfig"),
        ("jobs/correspond.py", "skp_ray.correspondence.job:CorrespondConfig"),
        ("jobs/serve.py", "skp_ray.serving:ServeConfig"),
    ],
)
def test_help_describes_every_option(job, config_class):
    import dataclasses
    import importlib
    import re

    module, name = config_class.split(":")
    fields = dataclasses.fields(getattr(importlib.import_module(module), name))
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, job, "--help"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    packed = "".join(result.stdout.split())  # argparse wraps the help text, at spaces and at hyphens
    for field in fields:
        description = "".join(field.metadata.get("help", "").split())
        assert description, f"{job}: --{field.name} has no help text"
        assert re.search(rf"--{field.name}\b", result.stdout) and description in packed, f"{job}: --{field.name}"


@pytest.mark.parametrize("error", [ValueError("--x must be positive"), FileNotFoundError("no such folder /in"),
                                   LeaseHeldError("another run holds /out")])  # fmt: skip
def test_a_refusal_before_ray_starts_is_its_message_alone(monkeypatch, error):
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: False))
    with pytest.raises(SystemExit) as exit_info:
        with refusals_as_messages("label", resume="rerun"):
            raise error
    assert exit_info.value.code == f"[label] {error}"


def test_errors_once_ray_is_up_and_other_errors_keep_their_traceback(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: True))
    with pytest.raises(ValueError, match="inside the pipeline"):
        with refusals_as_messages("label", resume="rerun"):
            raise ValueError("inside the pipeline")
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: False))
    with pytest.raises(KeyError):
        with refusals_as_messages("label", resume="rerun"):
            raise KeyError("a bug, not a refusal")


def test_a_ctrl_c_says_how_to_resume_and_exits_as_shells_do(capsys):
    with pytest.raises(SystemExit) as exit_info:
        with refusals_as_messages("label", resume="rerun the same command"):
            raise KeyboardInterrupt
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "[label] interrupted: rerun the same command\n"


def test_the_label_job_refuses_a_bad_setting_in_one_line(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "jobs/label.py", "--artifact", str(tmp_path / "none"), "--input", str(tmp_path),
               "--output", str(tmp_path / "out"), "--batch_size", "0"]  # fmt: skip
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == "[label] invalid labelling settings: --batch-size and --augmentation_iterations must be at least 1"
    assert not (tmp_path / "out").exists()
