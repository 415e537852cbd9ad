"""Running on a cluster: the launcher configs and KubeRay manifests, and both jobs through `ray job submit`."""

import importlib.resources
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pandas as pd
import pytest
import yaml

from skp_ray.artifact import load_artifact

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


@pytest.fixture(scope="module")
def launcher_schema() -> dict:
    return json.loads((importlib.resources.files("ray.autoscaler") / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs_validate_against_rays_schema(launcher_schema, name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(config, launcher_schema)
    head, worker = config["available_node_types"]["head"], config["available_node_types"]["gpu_worker"]
    assert config["head_node_type"] == "head" and head["resources"] == {"CPU": 0}  # the head runs no work
    assert worker["min_workers"] == 0 and worker["max_workers"] >= 1
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "RAY_AUTH_MODE=token" in start
    assert "HF_TOKEN=" not in yaml.safe_dump(config)  # the token is read from a secret store, never written here
    spot = json.dumps(worker["node_config"])
    assert '"MarketType": "spot"' in spot or '"provisioningModel": "SPOT"' in spot


def test_the_schema_check_would_catch_a_broken_config(launcher_schema):
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["max_workers"] = "eight"
    with pytest.raises(jsonschema.ValidationError, match="'eight' is not of type 'integer'"):
        jsonschema.validate(config, launcher_schema)


def kuberay(name: str) -> dict:
    return yaml.safe_load((CLUSTER / "kuberay" / name).read_text())


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def secret_env(container: dict) -> dict:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "valueFrom" in e}


def test_the_raycluster_holds_what_the_operator_requires():
    cluster = kuberay("raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster") and cluster["metadata"]["name"]
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # dashboard and job API not exposed outside the cluster
    assert head["rayStartParams"]["num-cpus"] == "0"
    (head_container,) = containers(head["template"])
    assert head_container["image"] and head_container["name"]
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["groupName"] and gpu["minReplicas"] == 0 < gpu["maxReplicas"] and "rayStartParams" in gpu
    (worker,) = containers(gpu["template"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    for container in (head_container, worker):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAY_AUTH_MODE"] == "token"
        assert set(secret_env(container)) == {"RAY_AUTH_TOKEN", "HF_TOKEN"}  # secrets only by reference


@pytest.mark.parametrize(
    "name, job", [("rayjob-discover.yaml", "jobs/discover.py"), ("rayjob-label.yaml", "jobs/label.py")]
)
def test_the_rayjobs_run_the_jobs_on_the_cluster(name, job):
    manifest = kuberay(name)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["entrypoint"].startswith(f"python {job} ")
    assert spec["clusterSelector"] == {"ray.io/cluster": kuberay("raycluster.yaml")["metadata"]["name"]}
    (submitter,) = containers(spec["submitterPodTemplate"])
    assert "RAY_AUTH_TOKEN" in secret_env(submitter)


def test_the_nightly_labelling_is_a_cronjob_submitting_the_label_job():
    cron = kuberay("nightly-label.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("batch/v1", "CronJob")
    assert len(cron["spec"]["schedule"].split()) == 5 and cron["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = containers(cron["spec"]["jobTemplate"]["spec"]["template"])
    command = container["command"]
    assert command[:3] == ["ray", "job", "submit"] and "jobs/label.py" in command
    assert f"http://{kuberay('raycluster.yaml')['metadata']['name']}-head-svc:8265" in command
    assert "RAY_AUTH_TOKEN" in secret_env(container)


# --- a real Ray head, jobs submitted to it ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_head():
    """`ray start --head` on free ports with its own temp dir, in its own process group, which the
    test stops by that group's id (never `ray stop`, which would stop every Ray on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="skprh", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    environment = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled")
    environment.pop("RAY_ADDRESS", None)
    command = ["ray", "start", "--head", f"--port={free_port()}", f"--dashboard-port={dashboard}",
               "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--num-cpus=4", "--block",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--metrics-export-port={free_port()}"]  # fmt: skip
    head = subprocess.Popen(command, env=environment, start_new_session=True, stdout=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_until_up(address, head)
        yield address, environment
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)


def wait_until_up(address: str, head: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited early"
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the Ray head at {address} did not come up within 120 s")


def submit(address: str, environment: dict, *job: str) -> subprocess.CompletedProcess:
    command = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--", "python", *job]
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(900)
def test_both_jobs_run_unchanged_through_ray_job_submit(ray_head, tmp_path):
    address, environment = ray_head
    output = tmp_path / "out"
    discovered = submit(address, environment, "jobs/discover.py", "--output", str(output), "--name", "submitted",
                        "--num_steps", "2", "--num_tokens", "16", "--top_k", "3", "--furthest_point_num_samples", "6",
                        "--num_indices", "4", "--image_size", "128", "--feature_upsample_res", "32",
                        "--augmentation_iterations", "2", "--preview_images", "1", "--cpus_per_worker", "0.5")  # fmt: skip
    assert discovered.returncode == 0, discovered.stdout[-3000:] + discovered.stderr[-3000:]
    assert f"[discover] artifact: {output / 'submitted'}" in discovered.stdout
    artifact = load_artifact(str(output / "submitted"))

    labelled = submit(address, environment, "jobs/label.py", "--artifact", str(output / "submitted"),
                      "--input", str(output / "sample-images"), "--output", str(tmp_path / "labels"),
                      "--augmentation_iterations", "2", "--cpus_per_actor", "0.5", "--no-progress")  # fmt: skip
    assert labelled.returncode == 0, labelled.stdout[-3000:] + labelled.stderr[-3000:]
    assert "[label] done: 8 images labelled (8 ok, 0 errors)" in labelled.stdout
    rows = pd.read_parquet(tmp_path / "labels")
    assert len(rows) == 8 and (rows["artifact_id"] == artifact.id).all() and (rows["status"] == "ok").all()


def test_jobs_use_the_gpus_the_cluster_has_unless_told(ray_session):
    from skp_ray.ray_cluster import use_gpus

    assert use_gpus(None) is (ray_session.cluster_resources().get("GPU", 0) > 0)
    assert use_gpus(True) is True and use_gpus(False) is False


def test_a_jobs_own_ray_has_a_dashboard_only_when_asked(monkeypatch):
    import ray

    from skp_ray import ray_cluster

    assert not ray_cluster.dashboard_wanted({}) and not ray_cluster.dashboard_wanted({"SKP_RAY_DASHBOARD": "0"})
    assert ray_cluster.dashboard_wanted({"SKP_RAY_DASHBOARD": "1"})
    assert ray_cluster.dashboard_wanted({"SKP_RAY_DASHBOARD": " True "})

    asked = []

    def init(**options):
        asked.append(options)
        return SimpleNamespace(dashboard_url="127.0.0.1:8265" if options["include_dashboard"] else None)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("SKP_RAY_DASHBOARD", raising=False)
    ray_cluster.connect()
    ray_cluster.connect(dashboard=True)
    assert [options["include_dashboard"] for options in asked] == [False, True]


def test_discovery_starts_its_own_ray_with_the_dashboard_ray_train_needs(tmp_path, monkeypatch):
    """Ray Train's placement-group cleaner asks the dashboard's state API about its controller: without a
    dashboard it warns every few seconds of the run."""
    from skp_ray import discovery

    class Reached(Exception):
        pass

    def connect(**options):
        raise Reached(options)

    monkeypatch.setattr(discovery, "connect", connect)
    with pytest.raises(Reached) as reached:
        discovery.run_discovery(discovery.DiscoveryConfig(output=str(tmp_path), num_steps=1))
    assert reached.value.args[0] == {"dashboard": True}
