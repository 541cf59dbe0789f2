"""The cluster configs users apply elsewhere, checked against what their tools accept."""

from __future__ import annotations

import copy
import subprocess
import sys

import ray
import yaml

from ..conftest import ROOT

RAY = ROOT / "cluster" / "ray"


def test_cluster_launcher_yaml_is_valid_for_ray_up() -> None:
    """Ray's own schema check (what `ray up` runs first) accepts it; every node starts through our make targets
    with the token the login node made."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((RAY / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # defaults filled in, as `ray up` does
    assert config["provider"]["type"] == "local"
    assert config["file_mounts"] == {"~/.adn/ray/auth_token": ".cluster/ray/auth_token"}
    assert any("make ray-head " in c and "RAY_AUTH_TOKEN_PATH=~/.adn/ray/auth_token" in c
               for c in config["head_start_ray_commands"])
    assert any("make ray-worker " in c and "HEAD=$RAY_HEAD_IP:" in c for c in config["worker_start_ray_commands"])


def test_rayjob_runs_the_search_on_the_installed_ray_with_token_auth() -> None:
    job = yaml.safe_load((RAY / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__ and spec["authOptions"] == {"mode": "token"}
    args = job["spec"]["entrypoint"].split()
    assert args[:3] == ["python", "-m", "search.pareto"] and args[args.index("--ray-address") + 1] == "auto"
    worker = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"  # one GPU per trial
    # The entrypoint's flags are the search's own: its parser accepts them (up to the data and the run).
    help_text = subprocess.run([sys.executable, "-m", "search.pareto", "--help"], capture_output=True, text=True,
                               check=True).stdout
    for flag in (a for a in args if a.startswith("--")):
        assert flag in help_text, flag


def test_the_token_command_makes_an_owner_only_token_once(tmp_path) -> None:
    run = [sys.executable, "-m", "cluster.ray_node", "--state-dir", str(tmp_path), "token"]
    first = subprocess.run(run, capture_output=True, text=True, check=True).stdout.strip()
    second = subprocess.run(run, capture_output=True, text=True, check=True).stdout.strip()
    path = tmp_path / "ray" / "auth_token"
    assert first == second == str(path)
    assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_text()) == 64


def test_the_serve_config_and_rayservice_are_valid_for_ray_serve() -> None:
    """Ray Serve's own schema accepts both configs, and their args are settings the application builder takes."""
    from ray.serve.schema import ServeDeploySchema

    from serving.settings import ServeSettings

    local = yaml.safe_load((RAY / "serve.yaml").read_text())
    service = yaml.safe_load((RAY / "rayservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert service["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    for config in (local, yaml.safe_load(service["spec"]["serveConfigV2"])):
        app = ServeDeploySchema.model_validate(config).applications[0]
        assert app.import_path == "serving.app:build"
        ServeSettings(**app.args).check()
    assert local["http_options"]["host"] == "127.0.0.1"
