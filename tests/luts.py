"""Latency tables for the tests of caching, overrides, locking and the search's logic, not of measurement.

Each model's table is timed once per test run without the quality checks (``measured_tables`` in
``tests/conftest.py``) and then made exact: its remainder at least 0, its rounds agreeing, its
validation equal to its predictions. The code under test gets it in place of a fresh measurement
(``search.profile.measure_table`` replaced, in this process or in a subprocess through
``python -m tests.luts``), so a machine busy with other work cannot make it refuse the table. The
quality of real measurements is ``benchmarks/latency_tables.py``'s and one test's concern.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def measure(models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each model's table at batch 1, timed here in 3 rounds, unchecked."""
    from adn import SkipMask
    from search.parts import skeleton
    from search.profile import measure_table

    return {m: measure_table(m, "cpu", 1, None, rounds=3, validate_masks=list(SkipMask.all(skeleton(m).num_stages)))
            for m in models}


def exact(table: dict[str, Any]) -> dict[str, Any]:
    """A copy that passes every self-check (remainder >= 0, no spread, validation equal to the predictions) in
    which skipping one more block always saves time: every skippable block costs something (one timed under load
    can come out 0 ms) and a block costs the same with either set of norms (the same computation)."""
    from search.tables import predict

    out = copy.deepcopy(table)
    out["remainder_ms"] = max(out["remainder_ms"], 0.0)
    for part in out["parts"]:
        if part["skip_bit"] is not None:
            part["ms"] = max(part["ms"], 0.01)
        if "ms_norm_skipped" in part:
            part["ms_norm_skipped"] = part["ms"]
    out["round_spread"] = 0.0
    out["validation_ms"] = {m: predict(out, m) for m in out["validation_ms"]}
    return out


def fake_measure(tables: dict[str, dict[str, Any]], delay_s: float = 0.0) -> Callable[..., dict[str, Any]]:
    """A stand-in for ``search.profile.measure_table`` that returns ``tables[name]`` as measured in this process
    (its device, threads and torch version; the class count asked), after ``delay_s``."""
    import torch

    from search.profile import device_name

    def measure_table(name: str, device: str = "cpu", batch_size: int = 1, resolution: int | None = None,
                      dtype: str = "fp32", rounds: int = 15, num_classes: int = 1000,
                      validate_masks: Sequence[Any] = ()) -> dict[str, Any]:
        if name not in tables or batch_size != 1 or dtype != "fp32":
            raise AssertionError(f"no injected table for {name} batch {batch_size} {dtype}")
        time.sleep(delay_s)
        table = exact(tables[name])
        table.update(num_classes=num_classes, device=device_name(torch.device("cpu")),
                     threads=torch.get_num_threads(), torch=torch.__version__, rounds=rounds)
        return table

    return measure_table


def install(path: Path, delay_s: float = 0.0) -> None:
    """In this process, every table measurement returns the injected table of ``path`` instead."""
    from search import profile

    profile.measure_table = fake_measure(json.loads(Path(path).read_text()), delay_s)


def run_with_tables(path: Path, module: str, argv: list[str], delay_s: float = 0.0, **kwargs: Any
                    ) -> subprocess.CompletedProcess | subprocess.Popen:
    """``python -m module argv`` with the tables of ``path`` injected (``Popen`` with ``popen=True``)."""
    cmd = [sys.executable, "-m", "tests.luts", str(path), str(delay_s), module, *argv]
    env = {**kwargs.pop("env", os.environ), "PYTHONPATH": str(ROOT)}
    if kwargs.pop("popen", False):
        return subprocess.Popen(cmd, env=env, **kwargs)
    return subprocess.run(cmd, env=env, **kwargs)


def seed(path: Path, env: dict[str, str], entries: Sequence[tuple[str, int]]) -> None:
    """Put the injected tables of ``(model, classes)`` into the cache that ``env``'s ``--target cpu`` reads."""
    code = ("import sys; from tests.luts import install; install(sys.argv[1]); from search.profile import local_table; "
            "[local_table(m, 1, None, num_classes=int(c)) for m, c in zip(sys.argv[2::2], sys.argv[3::2])]")
    args = [str(a) for entry in entries for a in entry]
    done = subprocess.run([sys.executable, "-c", code, str(path), *args], env={**env, "PYTHONPATH": str(ROOT)},
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


if __name__ == "__main__":  # python -m tests.luts TABLES DELAY MODULE ARGS...: MODULE's main() with the tables injected
    import importlib

    install(Path(sys.argv[1]), float(sys.argv[2]))
    module = sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    # main() of the imported module, not a fresh run of its source: that would define measure_table anew.
    sys.exit(importlib.import_module(module).main())
