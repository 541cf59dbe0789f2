"""Where a fine-tune's first weights come from: ``pipeline.train --init-from timm|PATH|mlflow:RUN_ID``.

``resolve`` runs before any rank starts DeepSpeed, so a source that cannot serve this run (no
cached timm file offline, a run of another model or other classes, a file that does not fit) is
one sentence and exit 2, not a stack trace after the loaders and the engine came up.
``build`` then makes the super-net from it: a plain network's norms start both halves of each
switchable pair, so the super-net computes exactly what the plain network did.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adn import create_model
from adn.checkpoint import WEIGHTS_NAME, check_fits, read_metadata
from adn.norms import copy_kept_norms
from adn.pretrained import locate, timm_weights
from adn.registry import load_state_dict_file, map_timm_state_dict

MLFLOW_PREFIX = "mlflow:"


class InitError(ValueError):
    """The source cannot initialise this run; the message says why and what to pass instead."""


@dataclass
class InitSource:
    """A resolved ``--init-from``: what to load and what is known of it before loading."""

    spec: str
    kind: str  # "timm", "file" (a plain or ADN state dict) or "mlflow"
    file: Path | None  # None: timm downloads its weights itself
    meta: dict[str, Any] | None = None  # the ADN metadata of a weights file
    state: dict[str, torch.Tensor] | None = None  # the file's tensors, read and checked against the model
    notes: list[str] = field(default_factory=list)
    _tmp: Path | None = None

    def describe(self) -> str:
        if self.kind == "timm":
            return f"timm's pretrained weights ({self.file or 'downloaded from the hub'})"
        origin = f"MLflow run {self.spec[len(MLFLOW_PREFIX):]}" if self.kind == "mlflow" else str(self.file)
        if self.meta:
            extra = self.meta.get("extra") or {}
            trained = f"{extra['mode']} training, step {extra.get('step', '?')}" if "mode" in extra else "ADN weights"
            return f"{origin} ({self.meta['model']}, {trained})"
        return f"{origin} (a plain state dict)"

    def cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def resolve(spec: str, model: str, classes: list[str], tracking_uri: str | None = None,
            recipe_data: dict[str, Any] | None = None, model_kwargs: dict[str, Any] | None = None) -> InitSource:
    """Find the weights ``spec`` names, read them, and check them against this run's model and classes."""
    if spec == "timm":
        try:
            weights = timm_weights(model)
        except ValueError as err:
            raise InitError(f"--init-from timm: {err}") from err
        source = InitSource(spec, "timm", locate(model))  # PretrainedUnavailable: a FileNotFoundError sentence
        if recipe_data and tuple(recipe_data.get("mean", weights.mean)) != weights.mean:
            source.notes.append(f"timm's {weights.hub_id} was trained on inputs normalised with mean "
                                f"{list(weights.mean)} and std {list(weights.std)}; this recipe normalises with "
                                f"{recipe_data['mean']} and {recipe_data.get('std')}")
        return source
    if spec.startswith(MLFLOW_PREFIX):
        source = _download(spec, tracking_uri)
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / WEIGHTS_NAME
        if not path.is_file():
            raise InitError(f"--init-from {spec!r} is neither 'timm', 'mlflow:RUN_ID' nor an existing file or "
                            f"training output directory holding {WEIGHTS_NAME}.")
        source = InitSource(spec, "file", path)
    assert source.file is not None
    try:
        source.meta = read_metadata(source.file) if source.file.suffix == ".safetensors" else None
    except ValueError:  # a plain safetensors file: no ADN metadata
        source.meta = None
    if source.meta:
        where = source.describe()
        if source.meta["model"] != model:
            source.cleanup()
            raise InitError(f"--init-from {spec}: {where} holds a {source.meta['model']}, and this run trains a "
                            f"{model}; start from weights of the same model.")
        if source.meta["classes"] != classes:
            source.cleanup()
            theirs, ours = source.meta["classes"], classes
            raise InitError(f"--init-from {spec}: {where} was trained on {len(theirs)} classes "
                            f"({_preview(theirs)}), this run's data has {len(ours)} ({_preview(ours)}); start from "
                            "a run on the same classes, or from a plain state dict (its classifier is replaced).")
    try:
        _read(source, model, len(classes), model_kwargs or {})
    except BaseException:
        source.cleanup()
        raise
    return source


def _read(source: InitSource, model_name: str, num_classes: int, model_kwargs: dict[str, Any]) -> None:
    """Read the file's tensors and check that they fit the model (built on the meta device: no memory, no time)."""
    assert source.file is not None
    try:
        source.state = load_state_dict_file(source.file)
    except Exception as err:  # safetensors', zip's and the unpickler's own errors: not a state dict
        raise InitError(f"--init-from {source.spec}: {str(source.file)!r} is not a state dict that torch or "
                        f"safetensors can read ({type(err).__name__}: {_first_line(err)}).") from err
    with torch.device("meta"):
        skeleton = create_model(model_name, num_classes=num_classes, **model_kwargs)
    if source.meta:
        try:
            check_fits(skeleton, source.state, source.describe())
        except ValueError as err:
            raise InitError(f"--init-from: {err}") from err
    else:
        source.notes += plain_state(skeleton, source.state, source.describe())[1]


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]


def _preview(classes: list[str]) -> str:
    return ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")


def _download(spec: str, tracking_uri: str | None) -> InitSource:
    """The run's ``weights.safetensors`` artifact, downloaded into a temporary directory."""
    run_id = spec[len(MLFLOW_PREFIX):]
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from .tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise InitError(f"--init-from {spec}: the MLflow store {uri} has no run {run_id!r} "
                        f"({_first_line(err)}).") from err
    if WEIGHTS_NAME not in {a.path for a in client.list_artifacts(run_id)}:
        raise InitError(f"--init-from {spec}: MLflow run {run_id} ({run.info.run_name}, {run.info.status}) has no "
                        f"{WEIGHTS_NAME} artifact; a training logs it when it finishes.")
    tmp = Path(tempfile.mkdtemp(prefix="adn-init-"))
    try:
        local = Path(client.download_artifacts(run_id, WEIGHTS_NAME, str(tmp)))
    except (MlflowException, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InitError(f"--init-from {spec}: downloading {WEIGHTS_NAME} of run {run_id} from {uri} failed: "
                        f"{_first_line(err)}.") from err
    return InitSource(spec, "mlflow", local, _tmp=tmp)


def build(source: InitSource, model_name: str, num_classes: int, **model_kwargs: Any) -> tuple[nn.Module, list[str]]:
    """The ADN super-net started from ``source``, and what was adapted on the way (for the log)."""
    notes: list[str] = []
    if source.kind == "timm":
        weights = timm_weights(model_name)
        overlay = {"file": str(source.file)} if source.file else {}
        model = create_model(model_name, num_classes=num_classes, pretrained=True,
                             pretrained_cfg_overlay=overlay, **model_kwargs)
        if num_classes != weights.num_classes:
            notes.append(f"classifier {weights.classifier} newly initialised for {num_classes} classes "
                         f"(timm's weights have {weights.num_classes})")
        return model, notes
    assert source.state is not None, "resolve() reads the file"
    model = create_model(model_name, num_classes=num_classes, **model_kwargs)
    if source.meta:  # an ADN training's weights, checked by resolve()
        model.load_state_dict(source.state)
        if source.meta.get("extra", {}).get("mode") == "vanilla":
            copy_kept_norms(model)
            notes.append("a vanilla training never ran its skipped-mode norms: each starts as a copy of its "
                         "kept-mode norm")
        return model, notes
    mapped, _ = plain_state(model, source.state, source.describe())
    model.load_state_dict(mapped)
    return model, notes


def plain_state(model: nn.Module, state: dict[str, torch.Tensor], what: str,
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A plain (or ADN) state dict as ``model`` names it, each norm in both halves; a classifier of another class
    count is replaced by the model's own (newly initialised). Returns it and what was replaced."""
    head = str(getattr(model, "pretrained_cfg", {}).get("classifier", ""))
    own = model.state_dict()
    mapped = map_timm_state_dict(model, state)
    notes = []
    replaced = [k for k in mapped if head and k.startswith(f"{head}.") and k in own and mapped[k].shape != own[k].shape]
    if replaced:
        notes.append(f"classifier {head} newly initialised for {own[replaced[0]].shape[0]} classes (the state dict's "
                     f"has {mapped[replaced[0]].shape[0]})")
        mapped.update({k: v for k, v in own.items() if k.startswith(f"{head}.")})
    try:
        check_fits(model, mapped, what)
    except ValueError as err:
        raise InitError(f"--init-from: {err}") from err
    return mapped, notes
