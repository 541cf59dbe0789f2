"""The ADN as an MLflow ``pyfunc`` model (logged as code, so loading it unpickles nothing).

``predict`` takes a DataFrame with an ``image`` column (base64 of JPEG or PNG bytes) and
``params={"mask": "TTFF"}`` or ``params={"budget_ms": 5, "target": "cpu"}`` (the most accurate front mask within
the budget); with neither it runs the front's most accurate mask. Each row of the answer holds the mask that ran,
the top-5 class indices, their names and probabilities.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch

from serving.model import ServedModel, read_front


class ADNPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the weights and fronts from the model's artifacts; one ``ServedModel`` per front target."""

    def load_context(self, context: Any) -> None:
        weights = Path(context.artifacts["weights"])
        fronts = sorted((Path(context.artifacts["fronts"])).glob("pareto-*.json"))
        if not fronts:
            raise ValueError("the registered ADN holds no Pareto front.")
        self.targets = {p.stem.removeprefix("pareto-"): p for p in fronts}
        self.default_target = next(iter(self.targets))
        self.served = ServedModel(weights, self.targets[self.default_target], self.default_target)
        self.fronts = {t: read_front(p, self.served.name, t) for t, p in self.targets.items()}

    def _mask(self, params: dict[str, Any]) -> str:
        mask, budget = params.get("mask") or "", float(params.get("budget_ms") or 0.0)
        if mask:
            return str(self.served.model.parse_mask(mask))
        target = params.get("target") or self.default_target
        if target not in self.fronts:
            raise ValueError(f"no front for target {target!r}; this model has {', '.join(self.fronts)}.")
        selector = self.fronts[target]
        if budget > 0:
            return selector.select(budget)
        return selector.select(math.inf)  # the most accurate mask of the front

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        mask = self._mask(params or {})
        images = [self.served.preprocess(base64.b64decode(v) if isinstance(v, str) else bytes(v))
                  for v in model_input["image"]]
        probs = self.served.probabilities(torch.stack(images), mask)
        rows = self.served.top(probs)
        return pd.DataFrame({"mask": [mask] * len(rows),
                             "classes": [[c["class"] for c in r] for r in rows],
                             "names": [[c["name"] for c in r] for r in rows],
                             "probs": [[c["prob"] for c in r] for r in rows]})


mlflow.models.set_model(ADNPyfunc())
