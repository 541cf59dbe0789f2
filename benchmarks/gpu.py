"""The GPU check in one command: training throughput, the loader, measured latency tables, the roofline's calibration.

On a GPU machine:  python benchmarks/gpu.py --out DIR [--budget-s 480]
The same code paths at tiny sizes on a CPU (a test runs this):  python benchmarks/gpu.py --out DIR --device cpu --tiny

Sections run in the order of their value. One that would not fit in what is left of ``--budget-s`` is
skipped and says so; the results are written after each section (DIR/gpu.json and DIR/gpu.md), and a
SIGTERM or an error ends the section it hits, so the command exits 0 with what it measured.

1. device: ``nvidia-smi -L``, torch, CUDA and cuDNN versions.
2. shards: synthetic JPEG shards (photographs cut and resized to ImageNet's typical sizes, quality 90).
3. train resnet50 (224, batch 256, bf16, channels-last): a plain PyTorch loop of timm's resnet50
   (``torch.autocast`` bf16, channels-last, the recipe's optimizer and label smoothing) against our
   vanilla step and our ADN step on a DeepSpeed engine in the same precision and layout, on the same
   device-resident batches from the shards; alternating rounds, medians: images/s, peak step memory,
   and the bounds (vanilla >= 0.95 x plain; ADN / vanilla time <= 1.05 x (1 + GFLOPs(base) / GFLOPs(super));
   ADN / vanilla peak memory <= 1.10).
4. loader: ``make_loader`` on the shards with every core as a worker, JPEGs decoded in the workers and
   on the device, against the ADN step's demand; nvJPEG's largest pixel difference from libjpeg-turbo.
5. tables: ``search.profile``'s measured tables (bf16) of resnet50 and vit_b16 at batch 1 and 64, each
   with its MAPE and worst mask against whole-network timings of every mask; a table whose sum of parts
   misses (MAPE above 5 % or a mask off by more than 10 %) also carries each mask's measured time (mask_ms).
6. calibration: ``search.roofline.calibrate`` on those timings: the H200's fitted efficiencies and launch
   cost, and the estimate's error per model and batch before and after.
7. Then, while time remains: our vanilla step in DeepSpeed's bf16 mode; vit_b16's training; tables of
   mobilenet_v2 and swin_t; ``torch.compile`` of the plain loop and of our steps.

``--tiny`` uses resnet_mini and vit_mini at 32 px, batch 8, fp32 tables and the eager compile backend (TorchDynamo's
capture without code generation).
``--install-tables DIR/gpu.json`` writes the measured tables of a finished run to ``search/luts/h200/``.

The GPU machine has torch, torchvision, timm, numpy and Pillow but not DeepSpeed, WebDataset or simplejpeg:
``make gpu-wheels`` builds or downloads the cp312 wheels they need into ``.whl/`` (deepspeed, hjson,
pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions, webdataset, braceexpand,
simplejpeg; about 4 MB) and checks they install offline into a clean Python 3.12 environment. There:
``python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site
python3 benchmarks/gpu.py --out $OUT``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Every field each section writes when it runs (the CPU test checks the tiny run writes them all).
FIELDS: dict[str, tuple[str, ...]] = {
    "device": ("device", "torch", "cuda", "cudnn", "python", "cpus"),
    "shards": ("images", "classes", "mean_bytes", "seconds"),
    "train": ("model", "batch_size", "resolution", "precision", "channels_last", "rounds", "steps_per_round",
              "img_s", "peak_mib", "gflops", "ratios", "bounds", "passed"),
    "loader": ("workers", "batch_size", "img_s", "demand_img_s", "keeps_up", "decode_max_abs_diff",
               "decode_mean_abs_diff"),
    "tables": ("model", "batch_size", "dtype", "mape", "max_error", "additive_holds", "mask_ms", "table"),
    "calibration": ("target", "compute_efficiency", "memory_efficiency", "launch_us", "shipped", "entries",
                    "mape_shipped", "mape_fitted", "at_edge"),
    "compile": ("backend", "img_s", "speedup", "compile_s"),
    "tests": ("passed", "failed", "skipped", "returncode", "output"),
}


class Stopped(Exception):
    """SIGTERM arrived: the current section ends and the results so far are written."""


class Run:
    """The results, the budget and the output files of one run."""

    def __init__(self, out: Path, budget_s: float, device: str, tiny: bool) -> None:
        self.out, self.device, self.tiny = out, device, tiny
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.results: dict[str, Any] = {"budget_s": budget_s, "tiny": tiny, "sections": []}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, name: str, kind: str, estimate_s: float, fn: Callable[[], dict[str, Any]]) -> dict | None:
        """Run ``fn`` if its estimate fits in what is left; record what it returned, or why it did not run."""
        entry: dict[str, Any] = {"name": name, "kind": kind}
        if self.left() < estimate_s:
            entry.update(status="skipped", reason=f"would not fit: {self.left():.0f} s left, needs about "
                                                  f"{estimate_s:.0f} s")
        else:
            began = time.monotonic()
            print(f"== {name} ({self.left():.0f} s left)", flush=True)
            try:
                entry.update(status="done", **fn())
            except Stopped:
                entry.update(status="stopped", reason="SIGTERM")
                self.results["stopped"] = True
            except Exception as err:  # noqa: BLE001 - a failed section is recorded and the next one runs
                entry.update(status="failed", reason=f"{type(err).__name__}: {err}")
            entry["seconds"] = round(time.monotonic() - began, 1)
        print(f"   {name}: {entry['status']}" + (f" ({entry['reason']})" if "reason" in entry else ""), flush=True)
        self.results["sections"].append(entry)
        self.write()
        if entry["status"] == "stopped":
            raise Stopped
        return entry if entry["status"] == "done" else None

    def write(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        (self.out / "gpu.json").write_text(json.dumps(self.results, indent=1))
        (self.out / "gpu.md").write_text(summary(self.results))


# -- sections ------------------------------------------------------------------------------------------
def device_line(device: str) -> dict[str, Any]:
    import torch

    smi = "nvidia-smi not found"
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.strip()
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return {"device": f"{name}; {smi}", "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
            "python": platform.python_version(), "cpus": os.cpu_count()}


def _photo_jpeg(i: int, size: tuple[int, int], quality: int = 90) -> bytes:
    from PIL import Image
    from sklearn.datasets import load_sample_image

    rng = random.Random(i)
    photo = Image.fromarray(load_sample_image(("china.jpg", "flower.jpg")[i % 2]))
    w, h = rng.randint(size[0] // 2, photo.width - 1), rng.randint(size[1] // 2, photo.height - 1)
    x, y = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
    target = (rng.randint(int(size[0] * 0.9), size[0]), rng.randint(int(size[1] * 0.9), size[1]))
    image = photo.crop((x, y, x + w, y + h)).resize(target if rng.random() < 0.8 else target[::-1])
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_shards(out: Path, images: int, size: tuple[int, int], classes: int = 10) -> dict[str, Any]:
    from multiprocessing import Pool

    from pipeline.data.shard import write_shards
    from pipeline.data.sources import SampleRef

    began = time.monotonic()
    # The workers take SIGTERM as a plain process does, not as this run's stop.
    with Pool(min(os.cpu_count() or 1, 16), signal.signal, (signal.SIGTERM, signal.SIG_DFL)) as pool:
        data = pool.starmap(_photo_jpeg, [(i, size) for i in range(images)])
    refs = [SampleRef(f"img_{i:06d}", i % classes, "jpg", data=d) for i, d in enumerate(data)]
    write_shards(refs, [f"c{c}" for c in range(classes)], out, "train", shard_size=max(images // 16, 8))
    return {"images": images, "classes": classes, "mean_bytes": round(statistics.fmean(map(len, data))),
            "seconds": round(time.monotonic() - began, 1)}


def _batches(shards: Path, model: str, batch_size: int, count: int, device: str) -> list[tuple[Any, Any]]:
    from pipeline.data import make_loader

    loader = make_loader(shards, "train", batch_size, model, num_workers=min(os.cpu_count() or 1, 16),
                         rank=0, world_size=1, device=device)
    out = []
    for batch in loader:
        out.append((batch.images, batch.labels))
        if len(out) == count:
            return out
    raise ValueError(f"the shards hold fewer than {count} batches of {batch_size}")


def _timer(device: str) -> Callable[[Callable[[], Any], int], float]:
    import torch

    def run(fn: Callable[[], Any], steps: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(steps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began

    return run


def _peak_mib(fn: Callable[[], Any], device: str) -> float:
    """What one step allocates above what is live before it (activations and gradients), in MiB."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from train_step import peak_allocated

    return peak_allocated(fn) / 2**20


class Steps:
    """The plain PyTorch loop and our steps on a DeepSpeed engine, over the same device-resident batches."""

    def __init__(self, model: str, batch_size: int, precision: str, batches: list, device: str) -> None:
        import deepspeed
        import torch

        import adn
        from adn.complexity import count_flops
        from adn.export import export_subnet
        from adn.loss import DistillationConfig
        from pipeline.config import parse_args, resolve_config
        from pipeline.optim import build_optimizer
        from pipeline.precision import WEIGHT_DTYPES, autocast, is_cnn, use_channels_last
        from pipeline.step import TrainStep
        from pipeline.trainer import deepspeed_config

        self.device, self.precision = device, precision
        self.cfg = cfg = resolve_config(parse_args(["--model", model, "--data", "unused", "--batch-size",
                                                    str(batch_size), "--precision", precision]))
        torch.manual_seed(0)
        net = adn.create_model(model, num_classes=1000).to(device).train()
        self.channels_last = is_cnn(net)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        self.engine, *_ = deepspeed.initialize(model=net, optimizer=build_optimizer(net, cfg.optimizer),
                                               config=deepspeed_config(cfg, precision))
        if self.channels_last:
            use_channels_last(net)
        loss = DistillationConfig(**vars(cfg.adn), label_smoothing=cfg.data.get("label_smoothing", 0.0))
        self.ours = {mode: TrainStep(net, mode, loss, precision) for mode in ("vanilla", "adn")}
        self.batches = [(x.to(WEIGHT_DTYPES[precision], memory_format=layout), y) for x, y in batches]
        base = adn.SkipMask.base_net(net.num_stages)
        res = cfg.data["train_crop"]
        self.gflops = {"super": count_flops(net, None, res) / 1e9, "base": count_flops(net, base, res) / 1e9}
        # The plain loop: the super-net as timm's own plain module (no ADN machinery), in our layout and precision.
        self.plain = export_subnet(net, None, fold_bn=False).to(device, memory_format=layout).train()
        self.optimizer = build_optimizer(self.plain, cfg.optimizer)
        self.autocast = lambda: autocast("amp-bf16" if precision != "fp32" else "fp32", torch.device(device))
        self.smoothing = loss.label_smoothing
        self.i = 0

    def next_batch(self) -> tuple[Any, Any]:
        self.i = (self.i + 1) % len(self.batches)
        return self.batches[self.i]

    def plain_step(self) -> None:
        import torch.nn.functional as F

        x, y = self.next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.plain(x)
        F.cross_entropy(logits.float(), y, label_smoothing=self.smoothing).backward()
        self.optimizer.step()

    def fns(self) -> dict[str, Callable[[], Any]]:
        def ours(mode: str) -> Callable[[], Any]:
            return lambda: self.ours[mode](self.engine, *self.next_batch())

        return {"plain": self.plain_step, "vanilla": ours("vanilla"), "adn": ours("adn")}


def measure_steps(fns: dict[str, Callable[[], Any]], device: str, rounds: int, steps: int) -> dict[str, float]:
    """Seconds per step of each function: warmed up, then rounds in a rotating order, medians."""
    timer = _timer(device)
    for fn in fns.values():
        timer(fn, 3)
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timer(fns[name], steps) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def train_section(shards: Path, model: str, batch_size: int, precision: str, device: str, rounds: int,
                  steps: int, variants: tuple[str, ...] = ("plain", "vanilla", "adn")) -> dict[str, Any]:
    batches = _batches(shards, model, batch_size, 2, device)
    bench = Steps(model, batch_size, precision, batches, device)
    fns = {k: v for k, v in bench.fns().items() if k in variants}
    per_step = measure_steps(fns, device, rounds, steps)
    peaks = {k: _peak_mib(fn, device) for k, fn in fns.items()}
    img_s = {k: batch_size / v for k, v in per_step.items()}
    ratios, bounds, passed = {}, {}, {}
    if "plain" in img_s:
        ratios["vanilla_over_plain_img_s"] = img_s["vanilla"] / img_s["plain"]
        bounds["vanilla_over_plain_img_s"] = 0.95
        passed["vanilla_over_plain_img_s"] = ratios["vanilla_over_plain_img_s"] >= 0.95
    if "adn" in per_step:
        ratios["adn_over_vanilla_time"] = per_step["adn"] / per_step["vanilla"]
        bounds["adn_over_vanilla_time"] = 1.05 * (1 + bench.gflops["base"] / bench.gflops["super"])
        passed["adn_over_vanilla_time"] = ratios["adn_over_vanilla_time"] <= bounds["adn_over_vanilla_time"]
        ratios["adn_over_vanilla_peak_memory"] = peaks["adn"] / peaks["vanilla"]
        bounds["adn_over_vanilla_peak_memory"] = 1.10
        passed["adn_over_vanilla_peak_memory"] = ratios["adn_over_vanilla_peak_memory"] <= 1.10
    return {"model": model, "batch_size": batch_size, "resolution": bench.cfg.data["train_crop"],
            "precision": precision, "channels_last": bench.channels_last, "rounds": rounds,
            "steps_per_round": steps, "img_s": img_s, "peak_mib": peaks, "gflops": bench.gflops,
            "ratios": ratios, "bounds": bounds, "passed": passed}


def compile_section(shards: Path, model: str, batch_size: int, precision: str, device: str, rounds: int,
                    steps: int, backend: str) -> dict[str, Any]:
    import torch

    batches = _batches(shards, model, batch_size, 2, device)
    eager = Steps(model, batch_size, precision, batches, device)
    compiled = Steps(model, batch_size, precision, batches, device)
    began = time.monotonic()
    compiled.plain = torch.compile(compiled.plain, backend=backend)
    compiled.engine.compile(backend=backend)
    fns = {f"{k}_compiled": v for k, v in compiled.fns().items()}
    for fn in fns.values():  # the compilation itself: each mask is its own graph
        fn()
        fn()
    compile_s = time.monotonic() - began
    per_step = measure_steps({**eager.fns(), **fns}, device, rounds, steps)
    img_s = {k: batch_size / v for k, v in per_step.items()}
    return {"backend": backend, "img_s": img_s, "compile_s": compile_s,
            "speedup": {k: img_s[f"{k}_compiled"] / img_s[k] for k in ("plain", "vanilla", "adn")}}


def loader_section(shards: Path, model: str, batch_size: int, device: str, batches: int,
                   demand_img_s: float | None) -> dict[str, Any]:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from pipeline.data import make_loader
    from pipeline.data.storage import shard_samples

    workers = min(os.cpu_count() or 1, 16)
    img_s = {}
    for decode in ("workers", "device"):
        loader = make_loader(shards, "train", batch_size, model, num_workers=workers, rank=0, world_size=1,
                             device=device, decode=decode)
        seen, began, epoch = 0, None, 0
        while seen < batches * batch_size:
            loader.set_epoch(epoch)
            for batch in loader:
                if device == "cuda":
                    torch.cuda.synchronize()
                if began is None:  # the first batch pays the workers' start
                    began = time.perf_counter()
                    continue
                seen += batch.images.shape[0]
                if seen >= batches * batch_size:
                    break
            epoch += 1
        img_s[decode] = seen / (time.perf_counter() - began)
    first = sorted(shards.glob("train-*.tar"))[0]
    diffs = []
    for sample in shard_samples(str(first), None):
        data = torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8)
        here = decode_jpeg(data, mode=ImageReadMode.RGB).int()
        there = decode_jpeg(data, mode=ImageReadMode.RGB, device=device).cpu().int()
        diffs.append((there - here).abs().float())
        if len(diffs) == 16:
            break
    best = max(img_s.values())
    return {"workers": workers, "batch_size": batch_size, "img_s": img_s, "demand_img_s": demand_img_s,
            "keeps_up": None if demand_img_s is None else {k: v >= demand_img_s for k, v in img_s.items()},
            "decode_max_abs_diff": max(float(d.max()) for d in diffs),
            "decode_mean_abs_diff": statistics.fmean(float(d.mean()) for d in diffs), "best_img_s": best}


def table_section(model: str, batch_size: int, dtype: str, device: str, rounds: int, target: str) -> dict[str, Any]:
    from adn import SkipMask
    from search.parts import skeleton
    from search.profile import TOLERANCE, compare, measure_table

    masks = list(SkipMask.all(skeleton(model).num_stages))
    table = measure_table(model, device, batch_size, None, dtype, rounds, validate_masks=masks)
    measured = table.pop("validation_ms")
    report = compare(table, measured)
    holds = report["mape"] <= TOLERANCE and report["max_error"] <= 2 * TOLERANCE
    table.update(target=target, self_validation={"mape": report["mape"], "max_error": report["max_error"],
                                                 "tolerance": TOLERANCE, "attempt": 1})
    if not holds:
        table["mask_ms"] = measured  # the sum of parts misses: stage masks are looked up instead
    return {"model": model, "batch_size": batch_size, "dtype": dtype, "mape": report["mape"],
            "max_error": report["max_error"], "additive_holds": holds, "mask_ms": measured,
            "resolution": table["resolution"], "table": table}


def tests_section() -> dict[str, Any]:
    """The CUDA-only tests (bf16 gradients, channels-last, nvJPEG): they skip on a CPU."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-k", "cuda or nvjpeg",
                           "tests/pipeline/test_precision.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    outcome = re.compile(r"(\d+) (passed|failed|skipped|error)")
    last = next((line for line in reversed(out.splitlines()) if outcome.search(line) and " in " in line), "")
    count = {k: int(n) for n, k in outcome.findall(last)}
    return {"passed": count.get("passed", 0), "failed": count.get("failed", 0), "skipped": count.get("skipped", 0),
            "returncode": done.returncode, "output": "\n".join(out.splitlines()[-30:])}


def calibration_section(tables: list[dict[str, Any]]) -> dict[str, Any]:
    from search.roofline import calibrate

    if not tables:
        raise ValueError("no measured table to calibrate against")
    return calibrate([{k: t[k] for k in ("model", "batch_size", "resolution", "dtype", "mask_ms")}
                      for t in tables], "h200")


# -- report -------------------------------------------------------------------------------------------
def summary(results: dict[str, Any]) -> str:
    """The run as Markdown: the device line, then one block per section."""
    lines = ["# GPU check (benchmarks/gpu.py)", ""]
    if results.get("tiny"):
        lines += ["**--tiny on a CPU: code paths only, no figure here is a GPU figure.**", ""]
    lines += [f"Budget {results['budget_s']:.0f} s, elapsed {results.get('elapsed_s', 0):.0f} s.", ""]
    for s in results["sections"]:
        head = f"## {s['name']}: {s['status']}" + (f" ({s['reason']})" if "reason" in s else "")
        lines += [head, ""]
        if s["status"] != "done":
            continue
        kind = s["kind"]
        if kind == "device":
            lines += [f"- {s['device']}", f"- torch {s['torch']}, CUDA {s['cuda']}, cuDNN {s['cudnn']}, "
                                           f"Python {s['python']}, {s['cpus']} CPUs"]
        elif kind == "shards":
            lines += [f"- {s['images']} JPEGs, {s['mean_bytes']} bytes on average, in {s['seconds']} s"]
        elif kind == "train":
            lines += [f"{s['model']} at {s['resolution']}, batch {s['batch_size']}, {s['precision']}, "
                      f"channels-last {s['channels_last']}, median of {s['rounds']} rounds of "
                      f"{s['steps_per_round']} steps", "", "| step | images/s | peak step memory MiB |",
                      "|---|---:|---:|"]
            lines += [f"| {k} | {v:.1f} | {s['peak_mib'][k]:.1f} |" for k, v in s["img_s"].items()]
            lines += ["", "| ratio | measured | bound | passed |", "|---|---:|---:|---|"]
            lines += [f"| {k} | {v:.3f} | {s['bounds'][k]:.3f} | {s['passed'][k]} |" for k, v in s["ratios"].items()]
        elif kind == "loader":
            rates = ", ".join(f"decode in {k} {v:.0f}" for k, v in s["img_s"].items())
            lines += [f"- {s['workers']} workers, batch {s['batch_size']}: images/s {rates}; the ADN step takes "
                      f"{s['demand_img_s'] or 0:.0f}; keeps up: {s['keeps_up']}",
                      f"- device JPEG decoding against libjpeg-turbo: largest difference {s['decode_max_abs_diff']:.0f}"
                      f" levels, mean {s['decode_mean_abs_diff']:.3f}"]
        elif kind == "tables":
            lines += [f"- {s['model']} batch {s['batch_size']} {s['dtype']}: MAPE {s['mape']:.1%}, worst mask "
                      f"{s['max_error']:.1%}; sum of parts holds: {s['additive_holds']}"]
        elif kind == "calibration":
            lines += [f"- fitted: compute efficiency {s['compute_efficiency']}, memory efficiency "
                      f"{s['memory_efficiency']}, launch {s['launch_us']} us (shipped {s['shipped']})"
                      + (f"; at the edge of the fitted range: {', '.join(s['at_edge'])}" if s["at_edge"] else ""),
                      f"- MAPE over every mask: {s['mape_shipped']:.1%} shipped, {s['mape_fitted']:.1%} fitted", "",
                      "| model | batch | MAPE shipped | worst shipped | MAPE fitted | worst fitted |",
                      "|---|---:|---:|---:|---:|---:|"]
            lines += [f"| {e['model']} | {e['batch_size']} | {e['mape_shipped']:.1%} | {e['max_error_shipped']:.1%} "
                      f"| {e['mape_fitted']:.1%} | {e['max_error_fitted']:.1%} |" for e in s["entries"]]
        elif kind == "tests":
            lines += [f"- tests/pipeline/test_precision.py: {s['passed']} passed, {s['failed']} failed, "
                      f"{s['skipped']} skipped (exit {s['returncode']})"]
            lines += [f"- {line}" for line in s["output"].splitlines() if line.startswith("largest difference")]
        elif kind == "compile":
            lines += [f"- backend {s['backend']}, compiled in {s['compile_s']:.0f} s; speed-up: "
                      + ", ".join(f"{k} {v:.2f}x" for k, v in s["speedup"].items())]
        lines.append("")
    return "\n".join(lines)


def install_tables(results_path: Path) -> int:
    """Write the measured tables of a finished run into the shipped ``search/luts/<target>/``."""
    from search.tables import SHIPPED_DIR, save_table, table_filename, validate_table

    results = json.loads(results_path.read_text())
    written = 0
    for s in results["sections"]:
        if s["kind"] == "tables" and s["status"] == "done" and not results.get("tiny"):
            table = validate_table(s["table"], f"the {s['model']} table")
            save_table(table, path=SHIPPED_DIR / table["target"] / table_filename(table))
            written += 1
    print(f"{written} measured tables written under {SHIPPED_DIR}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="directory for gpu.json and gpu.md")
    p.add_argument("--budget-s", type=float, default=480.0, help="total time; sections that would not fit are skipped")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes: the code paths, not the figures")
    p.add_argument("--install-tables", type=Path, metavar="GPU_JSON",
                   help="write the measured tables of a finished run to search/luts/ and exit")
    args = p.parse_args(argv)
    if args.install_tables:
        return install_tables(args.install_tables)
    if args.out is None:
        p.error("--out is required: the directory the results are written to.")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda, but this machine has no CUDA device; use --device cpu --tiny for the code paths.")
        torch.backends.cudnn.benchmark = True
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    def stop(signum: int, frame: Any) -> None:
        raise Stopped

    signal.signal(signal.SIGTERM, stop)
    run = Run(args.out, args.budget_s, args.device, args.tiny)
    dev, tiny = args.device, args.tiny
    # name: (model, batch, images of the shards, JPEG size, rounds, steps per round, table rounds)
    size = dict(cnn="resnet_mini", vit="vit_mini", batch=8, images=96, jpeg=(48, 40), rounds=3, steps=2,
                table_rounds=3, dtype="fp32", more=("vit_mini",), compile="eager") if tiny else dict(
        cnn="resnet50", vit="vit_b16", batch=256, images=4096, jpeg=(500, 375), rounds=5, steps=5,
        table_rounds=15, dtype="bf16", more=("mobilenet_v2", "swin_t"), compile="inductor")
    precision = "fp32" if tiny and dev == "cpu" else "amp-bf16"
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        try:
            from pipeline.distributed import setup_distributed

            run.section("device", "device", 1, lambda: device_line(dev))
            setup_distributed(use_cuda=dev == "cuda")
            run.section("shards", "shards", 5 if tiny else 40,
                        lambda: make_shards(shards, size["images"], size["jpeg"]))
            trained = run.section(f"train {size['cnn']}", "train", 15 if tiny else 150, lambda: train_section(
                shards, size["cnn"], size["batch"], precision, dev, size["rounds"], size["steps"]))
            demand = trained["img_s"]["adn"] if trained else None
            run.section("CUDA tests", "tests", 30, tests_section)
            run.section("loader", "loader", 10 if tiny else 60, lambda: loader_section(
                shards, size["cnn"], size["batch"], dev, 6 if tiny else 40, demand))
            measured = []
            pairs = [(size["cnn"], 1), (size["vit"], 1)] if tiny else [(m, b) for m in ("resnet50", "vit_b16")
                                                                       for b in (1, 64)]
            for model, batch in pairs:
                done = run.section(f"table {model} b{batch}", "tables", 15 if tiny else 40, lambda m=model, b=batch:
                                   table_section(m, b, size["dtype"], dev, size["table_rounds"],
                                                 "h200" if dev == "cuda" else "cpu"))
                measured += [done] if done else []
            run.section("calibration", "calibration", 5 if tiny else 30, lambda: calibration_section(measured))
            run.section(f"train {size['cnn']} vanilla, DeepSpeed bf16", "train", 10 if tiny else 60,
                        lambda: train_section(shards, size["cnn"], size["batch"], "bf16", dev, size["rounds"],
                                              size["steps"], variants=("plain", "vanilla")))
            run.section(f"train {size['vit']}", "train", 15 if tiny else 150, lambda: train_section(
                shards, size["vit"], size["batch"] if tiny else 128, precision, dev, size["rounds"], size["steps"]))
            for model in size["more"] if not tiny else ():
                for batch in (1, 64):
                    done = run.section(f"table {model} b{batch}", "tables", 40, lambda m=model, b=batch:
                                       table_section(m, b, size["dtype"], dev, size["table_rounds"], "h200"))
                    measured += [done] if done else []
            run.section(f"compile {size['cnn']}", "compile", 40 if tiny else 200, lambda: compile_section(
                shards, size["cnn"], size["batch"], precision, dev, size["rounds"], size["steps"], size["compile"]))
        except Stopped:
            run.results["stopped"] = True
            print("stopped by SIGTERM; the results so far are written", flush=True)
    run.write()
    print(f"results: {args.out / 'gpu.json'}, summary: {args.out / 'gpu.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
