"""MLflow tracking for training and search: one run per job, written by rank 0 only, never in the way.

The store is ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite file ``mlflow.db`` in
the working directory (a database store, as MLflow recommends; ``mlflow ui --backend-store-uri
sqlite:///mlflow.db`` shows it). The team's server is ``make mlflow-server`` (``cluster.mlflow_server``).

A store that cannot be reached at start is an error before any training. After that, the
training loop only queues: a background thread sends what is queued, all metrics queued since its
last request in one ``log_batch`` (at most 1,000 values, MLflow's limit per request), so a step
never waits for the network. When the server goes away the queue is kept and retried with backoff
(up to ``max_buffered`` metric values, oldest dropped beyond that), and when it answers again the
log states how long it was gone, what was sent late and what, if anything, was dropped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

# MLflow's own HTTP client retries for minutes by default; our sender retries instead, in the background.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# MLflow prints two links per ended run (16 children: 32 lines) without the UI mode; we print ours once.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

#: Tells MLflow 3's UI that an experiment holds model-training runs, so it opens on the runs table
#: (without a choice, the UI opens the GenAI overview: "No data available").
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
#: MLflow 3.17's UI ignores that tag and shows the GenAI views unless the user picked "Model training" in the
#: sidebar or the address says so: every link we print carries this query.
UI_MODEL_TRAINING = "workflowType=machine_learning"
MAX_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_REQUEST = 100


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
        from_env = os.environ.get("MLFLOW_TRACKING_URI", "").rstrip("/") == uri.rstrip("/")
        other = ("unset MLFLOW_TRACKING_URI to use a local SQLite store" if from_env else
                 "leave out --tracking-uri to use a local SQLite store")
        raise TrackingError(f"the MLflow tracking server at {uri} is unreachable ({type(err).__name__}); start it "
                            f"(make mlflow-server), {other}, or pass --no-tracking.") from err


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


def artifact_root(uri: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: beside the database file (MLflow would
    use ./mlruns of whatever directory the command runs in); None for other stores, which decide."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


def ensure_experiment(client: Any, name: str, uri: str = "") -> str:
    """The experiment's id, created if needed (artifacts per ``artifact_root``), marked as model training."""
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, artifact_location=artifact_root(uri), tags=EXPERIMENT_KIND)
    for key, value in EXPERIMENT_KIND.items():
        if found.tags.get(key) != value:
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def _permanent(err: Exception) -> bool:
    """A request the server understood and refused (4xx): retrying cannot help."""
    from mlflow.exceptions import RestException

    if isinstance(err, RestException):
        code = err.get_http_status_code()
        return 400 <= code < 500 and code not in (408, 429)
    return False


@dataclass
class _Op:
    kind: str  # metrics | params | tags | artifact | terminate
    payload: Any
    step: int | None = None
    size: int = 1


@dataclass
class _Outage:
    since: float
    reason: str
    first_step: int | None = None
    sent_late: int = 0
    dropped: list[tuple[str, int | None]] = field(default_factory=list)


class Tracker:
    """An MLflow run that never takes training down, nor slows it, after it has started.

    Rank != 0 gets a tracker whose methods do nothing, so callers need no rank checks.
    """

    def __init__(self, uri: str | None, experiment: str, run_name: str, *, enabled: bool = True,
                 run_id: str | None = None, tags: Mapping[str, str] | None = None, backoff_s: float = 0.5,
                 max_backoff_s: float = 5.0, max_buffered: int = 100_000) -> None:
        self.enabled = enabled
        self.uri = resolve_tracking_uri(uri)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.backoff_s, self.max_backoff_s, self.max_buffered = backoff_s, max_backoff_s, max_buffered
        self.dropped = 0  # metric values and other calls given up on
        self.sender_cpu_s = 0.0  # CPU time the background sender spent on requests (it holds the GIL part of it)
        self._queue: deque[_Op] = deque()
        self._cv = threading.Condition()
        self._buffered = 0
        self._busy = False
        self._outage: _Outage | None = None
        self._thread: threading.Thread | None = None
        self.finished = False
        if not enabled:
            return
        check_reachable(self.uri)
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        try:
            if run_id is not None:
                run = self.client.get_run(run_id)
                self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.experiment_id = ensure_experiment(self.client, experiment, self.uri)
                self.run_id = self.client.create_run(self.experiment_id, run_name=run_name,
                                                     tags=dict(tags or {})).info.run_id
        except Exception as err:  # the store itself is broken: fail at start, with what was tried
            raise TrackingError(f"cannot start an MLflow run in {self.uri}: {err}") from err

    def where(self, run_id: str | None = None) -> str:
        """Where a person sees the run: its page on a tracking server, else the ``mlflow ui`` command."""
        if urlparse(self.uri).scheme in ("http", "https"):
            return (f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id or self.run_id}"
                    f"?{UI_MODEL_TRAINING}")
        return f"in {self.uri} (mlflow ui --backend-store-uri {self.uri})"

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: Any) -> None:
        """A block that raised leaves its run FAILED, or KILLED when interrupted (Ctrl-C, SIGTERM), not RUNNING."""
        if err is not None and not self.finished:
            self.finish("FAILED" if isinstance(err, Exception) else "KILLED", timeout_s=10)

    # -- what callers use: each queues and returns at once ---------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), MAX_PARAMS_PER_REQUEST):
            self._submit(_Op("params", items[i: i + MAX_PARAMS_PER_REQUEST]))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), MAX_METRICS_PER_REQUEST):  # e.g. val_acc1/acc5 of every block mask
            chunk = items[i: i + MAX_METRICS_PER_REQUEST]
            self._submit(_Op("metrics", chunk, step, len(chunk)))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        self._submit(_Op("artifact", (os.fspath(path), artifact_path)))

    def log_child(self, run_name: str, metrics: Mapping[str, float], params: Mapping[str, Any],
                  tags: Mapping[str, str] | None = None) -> str | None:
        """A finished child run of this one (tagged ``mlflow.parentRunId``), sent now rather than queued; its id."""
        if not self.enabled:
            return None
        from mlflow.entities import Metric, Param

        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={"mlflow.parentRunId": self.run_id, **(tags or {})})
        now = int(time.time() * 1000)
        self.client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                              params=[Param(k, str(v)) for k, v in params.items()])
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    def flush(self, timeout_s: float = 120.0) -> bool:
        """Wait until everything queued was sent (or given up on); False if ``timeout_s`` passed first."""
        if not self.enabled:
            return True
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(timeout=min(left, 0.5))
        return True

    def finish(self, status: str = "FINISHED", timeout_s: float = 120.0) -> None:
        """End the run: send what is queued (waiting up to ``timeout_s`` for a server that is down)."""
        if not self.enabled or self.finished:
            return
        self.finished = True
        self._submit(_Op("terminate", status))
        if self._outage is not None:
            log.warning("MLflow: waiting up to %.0f s for the server at %s to take %d queued calls.", timeout_s,
                        self.uri, len(self._queue))
        if not self.flush(timeout_s):
            with self._cv:
                left = list(self._queue)
                self._queue.clear()
                self._buffered = 0
            if self._outage is None:
                self._outage = _Outage(time.monotonic() - timeout_s, f"no answer within {timeout_s:.0f} s")
            self._record_drop(left)
            self._report(final=True)

    # -- the sender thread --------------------------------------------------------------------------
    def _submit(self, op: _Op) -> None:
        with self._cv:
            self._queue.append(op)
            if op.kind == "metrics":
                self._buffered += op.size
            if self._thread is None:
                self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def _next(self) -> list[_Op]:
        """The head of the queue: one call's worth (metrics queued back to back go in one request)."""
        head = self._queue[0]
        if head.kind != "metrics":
            return [head]
        group, size = [], 0
        for op in self._queue:
            if op.kind != "metrics" or size + op.size > MAX_METRICS_PER_REQUEST:
                break
            group.append(op)
            size += op.size
        return group or [head]

    def _send(self, group: list[_Op]) -> None:
        head = group[0]
        if head.kind == "metrics":
            self.client.log_batch(self.run_id, metrics=[m for op in group for m in op.payload])
        elif head.kind == "params":
            self.client.log_batch(self.run_id, params=head.payload)
        elif head.kind == "tags":
            self.client.log_batch(self.run_id, tags=head.payload)
        elif head.kind == "artifact":
            self.client.log_artifact(self.run_id, *head.payload)
        else:
            self.client.set_terminated(self.run_id, head.payload)

    def _send_loop(self) -> None:
        attempt = 0
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                group = self._next()
                self._busy = True
            cpu_start = time.thread_time()
            try:
                self._send(group)
                err = None
            except Exception as caught:  # transport or server error: keep the queue, retry below
                err = caught
            self.sender_cpu_s += time.thread_time() - cpu_start
            with self._cv:
                if err is None or _permanent(err):
                    for op in group:
                        if self._queue and self._queue[0] is op:  # finish() may have given up on it meanwhile
                            self._queue.popleft()
                            self._buffered -= op.size if op.kind == "metrics" else 0
                    if self._outage is not None and err is None:
                        self._outage.sent_late += sum(op.size for op in group if op.kind == "metrics")
                self._busy = False
                self._cv.notify_all()
            if err is None:
                attempt = 0
                if self._outage is not None:
                    with self._cv:
                        caught_up = not self._queue or self._queue[0].kind == "terminate"
                    if caught_up:
                        self._report()
                continue
            if _permanent(err):
                self._record_drop(group)
                log.warning("MLflow refused %s (%s); dropped it, training goes on.", _describe(group), err)
                continue
            if self._outage is None:
                self._outage = _Outage(time.monotonic(), f"{type(err).__name__}: {str(err).splitlines()[0][:200]}",
                                       group[0].step)
                log.warning("MLflow server at %s unreachable (%s); queuing what training logs (up to %d metric "
                            "values) and retrying, training goes on.", self.uri, self._outage.reason,
                            self.max_buffered)
            self._trim()
            time.sleep(min(self.backoff_s * 2**attempt, self.max_backoff_s))
            attempt += 1

    def _trim(self) -> None:
        """Drop the oldest metrics beyond ``max_buffered`` (during a long outage)."""
        dropped = []
        with self._cv:
            while self._buffered > self.max_buffered:
                index = next(i for i, op in enumerate(self._queue) if op.kind == "metrics")
                op = self._queue[index]
                del self._queue[index]
                self._buffered -= op.size
                dropped.append(op)
        self._record_drop(dropped)

    def _record_drop(self, ops: list[_Op]) -> None:
        for op in ops:
            if op.kind == "terminate":
                continue
            self.dropped += op.size if op.kind == "metrics" else 1
            if self._outage is not None:
                self._outage.dropped.append((op.kind if op.kind != "artifact" else f"artifact {op.payload[0]}",
                                             op.step))
            elif op.kind != "metrics":
                log.warning("MLflow: dropped %s.", _describe([op]))

    def _report(self, final: bool = False) -> None:
        """One warning that closes an outage: how long, what was sent late, what was dropped."""
        outage, self._outage = self._outage, None
        if outage is None:
            return
        gone = time.monotonic() - outage.since
        steps = [s for kind, s in outage.dropped if kind == "metrics" and s is not None]
        others = [kind for kind, _ in outage.dropped if kind != "metrics"]
        if not outage.dropped:
            lost = "nothing was dropped"
        else:
            parts = []
            if steps:
                parts.append(f"metrics of {len(steps)} logging steps ({min(steps)}-{max(steps)})")
            parts += others
            lost = "dropped " + ", ".join(parts)
        since = f" from step {outage.first_step}" if outage.first_step is not None else ""
        if final:
            log.warning("MLflow server at %s still unreachable at the end (%s, for %.1f s%s); %s.", self.uri,
                        outage.reason, gone, since, lost)
        else:
            log.warning("MLflow server at %s answered again after %.1f s%s; sent %d queued metric values late, %s.",
                        self.uri, gone, since, outage.sent_late, lost)


def _describe(group: list[_Op]) -> str:
    head = group[0]
    if head.kind == "metrics":
        steps = [op.step for op in group]
        return f"metrics of steps {min(steps)}-{max(steps)}"
    if head.kind == "artifact":
        return f"artifact {head.payload[0]}"
    return head.kind
