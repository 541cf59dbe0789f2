"""The served ADN: weights and the Pareto front of one target, from a training directory or the MLflow Model
Registry, with the recipe's validation transforms and a latency model measured on this replica's device."""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from adn.checkpoint import load_trained, read_metadata, resolve_weights
from adn.runtime import DepthSelector
from pipeline.data.loader import decode_image
from pipeline.data.transforms import Normalize, val_transform

from .deadline import BadInput
from .policy import LatencyModel

REGISTRY_SCHEME = "models:/"
FRONTS_DIR = "fronts"  # inside a registered model's artifacts: one pareto-<target>.json per searched target


def read_front(path: str | os.PathLike[str], model: str, target: str | None) -> DepthSelector:
    """The front of a ``pareto.json`` (or the directory holding it), checked to be searched for ``model`` on
    ``target`` (any target when None)."""
    selector = DepthSelector.from_file(path)
    if selector.model != model:
        raise ValueError(f"the front {str(path)!r} was searched for {selector.model}, the checkpoint is {model}; "
                         "pass the front of this checkpoint.")
    if target is not None and selector.target != target:
        raise ValueError(f"the front {str(path)!r} was searched for target {selector.target!r}, this server "
                         f"serves {target!r}; pass --target {selector.target} or the front of {target}.")
    return selector


def fetch_registered(uri: str, tracking_uri: str | None) -> Path:
    """Download a registered version (``models:/NAME/VERSION``) and return the directory of its artifacts."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    quiet = logging.getLogger("mlflow")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # a new SQLite store logs its table creation at INFO
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as err:
        raise ValueError(f"the registry has no model {uri!r} ({err.message.splitlines()[0]}); list them with "
                         "the MLflow UI's Models page or register one with python -m serving.register.") from None
    finally:
        quiet.setLevel(level)
    artifacts = local / "artifacts"
    if not (artifacts / "weights.safetensors").is_file():
        raise ValueError(f"{uri!r} is not an ADN registered by python -m serving.register (no weights in it).")
    return artifacts


def locate(checkpoint: str | None, pareto: str | None, model_uri: str | None, target: str | None,
           tracking_uri: str | None = None) -> tuple[Path, Path]:
    """The weights file and front file to serve, from a training directory and a front, or a registered model."""
    if model_uri:
        if not model_uri.startswith(REGISTRY_SCHEME):
            raise ValueError(f"--model-uri must be models:/NAME/VERSION, got {model_uri!r}.")
        artifacts = fetch_registered(model_uri, tracking_uri)
        fronts = sorted((artifacts / FRONTS_DIR).glob("pareto-*.json"))
        if pareto:
            front = Path(pareto)
        elif target is not None and (artifacts / FRONTS_DIR / f"pareto-{target}.json").is_file():
            front = artifacts / FRONTS_DIR / f"pareto-{target}.json"
        elif target is None and fronts:
            front = fronts[0]
        else:
            have = ", ".join(p.stem.removeprefix("pareto-") for p in fronts) or "none"
            raise ValueError(f"{model_uri!r} holds no front for target {target!r} (it has: {have}); "
                             "register one with python -m serving.register --pareto.")
        return artifacts / "weights.safetensors", front
    if not checkpoint:
        raise ValueError("pass --checkpoint (a training output directory) or --model-uri models:/NAME/VERSION.")
    weights = resolve_weights(checkpoint)
    if pareto is None:
        found = sorted(weights.parent.glob("pareto-*/pareto.json"))
        if not found:
            raise FileNotFoundError(f"no Pareto front beside {str(weights)!r}; pass --pareto or run "
                                    "python -m search.pareto first.")
        pareto = str(found[0])
    return weights, Path(pareto)


class ServedModel:
    """The model, its classes and front, and the recipe's validation preprocessing, on one device."""

    def __init__(self, weights: Path, front_path: Path, target: str | None, device: str = "cpu",
                 fixed_mask: str | None = None) -> None:
        meta = read_metadata(weights)
        selector = read_front(front_path, meta["model"], target)
        self.front, self.target = selector.front, selector.target
        self.model, self.meta = load_trained(weights, map_location=device)
        self.device = torch.device(device)
        self.name: str = meta["model"]
        self.classes: list[str] = meta["classes"]
        data = (meta.get("recipe") or {}).get("data")
        if not data:
            raise ValueError(f"{str(weights)!r} carries no recipe data section; it was not written by "
                             "pipeline.train.")
        self._transform = val_transform(data)
        self._normalize = Normalize(data, train=False)
        self.resolution = int(data["val_crop"])
        self.fixed_mask = str(self.model.parse_mask(fixed_mask)) if fixed_mask else None
        for point in self.front:
            self.model.parse_mask(point.mask)  # a front of another depth layout fails here, not per request

    @property
    def masks(self) -> list[str]:
        """The masks this server may run: the front's, or the one fixed mask."""
        return [self.fixed_mask] if self.fixed_mask else [p.mask for p in self.front]

    def preprocess(self, body: bytes) -> torch.Tensor:
        """Encoded image bytes -> the uint8 CHW tensor the loader's validation transforms make."""
        try:
            image = decode_image(body)
        except Exception as err:  # noqa: BLE001 - Pillow raises many kinds for a body that is not an image
            raise BadInput(f"the body is not a JPEG or PNG image ({type(err).__name__}: {err}).") from None
        return self._transform(image)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor, mask: str) -> torch.Tensor:
        """Softmax over the classes for a uint8 batch under ``mask`` (float32, on the CPU)."""
        x = self._normalize(images.to(self.device, non_blocking=True))
        return torch.softmax(self.model(x, skip=mask).float(), dim=1).cpu()

    def top(self, probs: torch.Tensor, k: int = 5) -> list[list[dict[str, Any]]]:
        """Per row, the ``k`` most probable classes with their names and probabilities."""
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[{"class": int(i), "name": self.classes[int(i)], "prob": float(v)} for v, i in zip(vs, ix, strict=True)]
                for vs, ix in zip(values.tolist(), indices.tolist(), strict=True)]

    def measure_latency(self, max_batch: int, budget_s: float = 20.0, repeats: int = 5) -> LatencyModel:
        """Milliseconds per batch of every servable mask at batch sizes 1, 2, 4, ... up to ``max_batch``.

        Sizes go up while the time budget lasts; batch size 1 is always measured. Each figure is the
        median of ``repeats`` timed runs after one warm-up run; the masks take turns within each repeat, so
        that the machine slowing down or speeding up meanwhile falls on all of them alike.
        """
        sizes = sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)})
        table: dict[str, dict[int, float]] = {m: {} for m in self.masks}
        start = time.perf_counter()
        for size in sizes:
            if size > 1 and time.perf_counter() - start > budget_s:
                break
            x = torch.randint(0, 256, (size, 3, self.resolution, self.resolution), dtype=torch.uint8)
            runs: dict[str, list[float]] = {mask: [] for mask in self.masks}
            for mask in self.masks:
                self.probabilities(x, mask)
            for _ in range(repeats):
                for mask in self.masks:
                    t = time.perf_counter()
                    self.probabilities(x, mask)
                    runs[mask].append((time.perf_counter() - t) * 1e3)
            for mask, times in runs.items():
                table[mask][size] = statistics.median(times)
        return LatencyModel(table)
