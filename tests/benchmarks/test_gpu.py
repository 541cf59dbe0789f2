"""benchmarks/gpu.py at tiny sizes on the CPU: every section runs, writes every field, and keeps to its budget."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from search.tables import validate_table

from ..conftest import ROOT, train_env

SCRIPT = str(ROOT / "benchmarks" / "gpu.py")


def _fields() -> dict[str, tuple[str, ...]]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu

        return gpu.FIELDS
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_tiny_run_on_cpu_runs_every_section_and_writes_every_field(tmp_path: Path) -> None:
    began = time.monotonic()
    done = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path), "--device", "cpu", "--tiny"],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.monotonic() - began < 120
    results = json.loads((tmp_path / "gpu.json").read_text())
    sections = results["sections"]
    assert [s["name"] for s in sections if s["status"] != "done"] == []
    fields = _fields()
    assert {s["kind"] for s in sections} == set(fields)
    for s in sections:
        missing = [f for f in fields[s["kind"]] if f not in s]
        assert not missing, (s["name"], missing)
    train = next(s for s in sections if s["name"] == "train resnet_mini")
    assert set(train["img_s"]) == {"plain", "vanilla", "adn"} and train["channels_last"] is True
    assert set(train["ratios"]) == set(train["bounds"]) == set(train["passed"])
    tests = next(s for s in sections if s["kind"] == "tests")
    assert (tests["passed"], tests["failed"], tests["skipped"]) == (0, 0, 4)  # the CUDA-only tests skip here
    for table in (s["table"] for s in sections if s["kind"] == "tables"):
        validate_table(table)
        assert table["method"] == "measured" and {"mape", "max_error"} <= set(table["self_validation"])
    summary = (tmp_path / "gpu.md").read_text()
    assert "no figure here is a GPU figure" in summary and "| adn |" in summary


@pytest.mark.slow
def test_budget_skips_what_does_not_fit_and_sigterm_keeps_the_results(tmp_path: Path) -> None:
    short = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "short"), "--device", "cpu", "--tiny",
                            "--budget-s", "4"], cwd=ROOT, env=train_env(), capture_output=True, text=True,
                           timeout=120)
    assert short.returncode == 0, short.stderr[-2000:]
    sections = json.loads((tmp_path / "short" / "gpu.json").read_text())["sections"]
    assert sections[0]["status"] == "done"
    assert all(s["status"] == "skipped" and s["reason"].startswith("would not fit") for s in sections[2:])

    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, SCRIPT, "--out", str(out), "--device", "cpu", "--tiny"], cwd=ROOT,
                            env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # SIGTERM once the first training section is written
            if (out / "gpu.json").is_file() and "train" in {s["kind"] for s in
                                                            json.loads((out / "gpu.json").read_text())["sections"]}:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    results = json.loads((out / "gpu.json").read_text())
    statuses = {s["name"]: s["status"] for s in results["sections"]}
    assert results["stopped"] and statuses["train resnet_mini"] == "done", statuses
    assert "stopped by SIGTERM" in output
