"""Register a trained ADN in the MLflow Model Registry as a ``pyfunc`` model, with every front searched for it.

  python -m serving.register --checkpoint runs/demo              # fronts: every pareto-*/ beside it
  python -m serving.register --checkpoint runs/demo --pareto runs/demo/pareto-cpu --name adn-digits

Each call logs a run (experiment adn-registry) holding the weights, classes, recipe and fronts, linked to the
training run and the search runs, and registers it as a new version of NAME (default adn-MODEL). Serve it with
``python -m serving --model-uri models:/NAME/VERSION`` or ``mlflow models serve -m models:/NAME/VERSION``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.register", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a training output directory (or its weights.safetensors)")
    p.add_argument("--pareto", nargs="+", help="fronts (pareto.json or their directories); default: every "
                                               "pareto-*/pareto.json beside the checkpoint")
    p.add_argument("--name", help="registered model name (default: adn-MODEL)")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--experiment", default="adn-registry", help="experiment of the registering run")
    return p


def gather(checkpoint: str, paretos: list[str] | None) -> tuple[Path, dict[str, Any], dict[str, Path]]:
    """The weights, their metadata and the fronts by target, each checked against the checkpoint's model."""
    from adn.checkpoint import read_metadata, resolve_weights

    from .model import read_front

    weights = resolve_weights(checkpoint)
    meta = read_metadata(weights)
    found = [Path(p) for p in paretos] if paretos else sorted(weights.parent.glob("pareto-*"))
    if not found:
        raise FileNotFoundError(f"no Pareto front beside {str(weights)!r}; run python -m search.pareto first or "
                                "pass --pareto.")
    fronts: dict[str, Path] = {}
    for path in found:
        path = path / "pareto.json" if path.is_dir() else path
        target = read_front(path, meta["model"], None).target
        if target in fronts:
            raise ValueError(f"two fronts for target {target!r} ({fronts[target]} and {path}); pass one.")
        fronts[target] = path
    return weights, meta, fronts


def links(weights: Path, fronts: dict[str, Path]) -> dict[str, str]:
    """Tags that link the registered version to its training run and search runs, where they were tracked."""
    tags = {}
    run_file = weights.parent / "run.json"
    if run_file.is_file():
        run_id = json.loads(run_file.read_text()).get("mlflow_run_id")
        if run_id:
            tags["adn.training_run"] = run_id
    for target, path in fronts.items():
        parent = json.loads(path.read_text()).get("mlflow_parent")
        if parent:
            tags[f"adn.search_run.{target}"] = parent
    return tags


def register(args: argparse.Namespace) -> tuple[str, str]:
    """Log the pyfunc model and register it; returns (name, version)."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from pipeline.tracking import check_reachable, ensure_experiment, resolve_tracking_uri

    weights, meta, fronts = gather(args.checkpoint, args.pareto)
    name = args.name or f"adn-{meta['model']}"
    uri = resolve_tracking_uri(args.tracking_uri)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment = ensure_experiment(client, args.experiment, uri)
    tags = {"adn.model": meta["model"], "adn.targets": ",".join(fronts), **links(weights, fronts)}
    signature = infer_signature(
        pd.DataFrame({"image": ["<base64 of a JPEG or PNG>"]}),
        pd.DataFrame({"mask": ["FFFF"], "classes": [[0]], "names": [["0"]], "probs": [[1.0]]}),
        params={"mask": "", "budget_ms": 0.0, "target": ""})
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "fronts"
        staged.mkdir()
        for target, path in fronts.items():
            shutil.copy(path, staged / f"pareto-{target}.json")
        with mlflow.start_run(experiment_id=experiment, run_name=f"{name}-register", tags=tags) as run:
            mlflow.log_params({"model": meta["model"], "classes": len(meta["classes"]),
                               "resolution": meta["resolution"], "weights": str(weights)})
            mlflow.log_dict({"classes": meta["classes"], "recipe": meta["recipe"]}, "adn.json")
            info = mlflow.pyfunc.log_model(name="adn", python_model=str(PYFUNC_CODE),
                                           artifacts={"weights": str(weights), "fronts": str(staged)},
                                           signature=signature, registered_model_name=name)
    version = str(info.registered_model_version)
    for key, value in {**tags, "adn.register_run": run.info.run_id}.items():
        client.set_model_version_tag(name, version, key, value)
    return name, version


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipeline.tracking import TrackingError

    try:
        name, version = register(args)
    except (ValueError, FileNotFoundError, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"registered models:/{name}/{version}\n"
          f"  serve: python -m serving --model-uri models:/{name}/{version}\n"
          f"         mlflow models serve -m models:/{name}/{version} --env-manager local")
    return 0


if __name__ == "__main__":
    sys.exit(main())
