"""MLflow tracking for training: one run per training, written by rank 0 only.

The store is ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite file ``mlflow.db`` in
the working directory (a database store, as MLflow recommends; ``mlflow ui --backend-store-uri
sqlite:///mlflow.db`` shows it). A tracking server that cannot be reached at start is an error
before any training; an outage later never stops training: each call is retried, then dropped
with a warning.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

# MLflow's own HTTP client retries for minutes by default; we retry per call and move on instead.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class TrackingError(RuntimeError):
    """The tracking store cannot be used at all (raised at start, never mid-run)."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The flag, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if "://" not in uri and not uri.startswith("databricks"):
        return Path(uri).resolve().as_uri()  # a bare directory means a file store there
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with one sentence when an HTTP tracking server does not answer its health check."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    import requests

    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as err:
        raise TrackingError(
            f"the MLflow tracking server at {uri} is unreachable ({type(err).__name__}); start it "
            "(make mlflow-server) or unset MLFLOW_TRACKING_URI to use a local SQLite store.") from err


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params ``a.b = value`` (values truncated to MLflow's 6000-char limit)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:6000]
    return out


class Tracker:
    """An MLflow run that never takes training down after it has started.

    Rank != 0 gets a tracker whose methods do nothing, so callers need no rank checks.
    """

    def __init__(self, uri: str | None, experiment: str, run_name: str, *, enabled: bool = True,
                 run_id: str | None = None, retries: int = 3, backoff_s: float = 1.0) -> None:
        self.enabled = enabled
        self.uri = resolve_tracking_uri(uri)
        self.run_id: str | None = None
        self.retries, self.backoff_s = retries, backoff_s
        self.dropped = 0
        if not enabled:
            return
        check_reachable(self.uri)
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        try:
            if run_id is not None:
                self.run_id = self.client.get_run(run_id).info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                found = self.client.get_experiment_by_name(experiment)
                exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
                self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        except Exception as err:  # the store itself is broken: fail at start, with what was tried
            raise TrackingError(f"cannot start an MLflow run in {self.uri}: {err}") from err

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        for attempt in range(self.retries):
            try:
                fn(*args, **kwargs)
                return
            except Exception as err:  # any transport or server error: retry, then drop
                if attempt + 1 == self.retries:
                    self.dropped += 1
                    log.warning("MLflow %s failed %d times, dropped (training goes on): %s", what, self.retries, err)
                    return
                time.sleep(self.backoff_s * 2**attempt)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow's per-request limit
            self._call("log params", self.client.log_batch, self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._call("log metrics", self.client.log_batch, self.run_id, metrics=items)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        self._call("log artifact", self.client.log_artifact, self.run_id, os.fspath(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.enabled:
            return
        for k, v in tags.items():
            self._call("set tag", self.client.set_tag, self.run_id, k, v)

    def finish(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self._call("end run", self.client.set_terminated, self.run_id, status)
