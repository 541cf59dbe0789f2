"""Measure a latency table on this machine: ``python -m search.profile --model resnet50 --validate``.

Every part (``search.parts``) is timed on the input it sees in the super-net, in both norm modes
where its switchable norms follow a stage bit; a skippable block is also timed where it runs (the
mean of what dropping it alone saves the super-net and what adding it alone costs the base-net).
What runs between parts is the end-to-end time of both ends minus their parts. Everything is timed
over interleaved rounds, each in a fresh random order, so a slow spell of a shared machine lands on
all items alike; medians are kept. On CUDA, times come from CUDA events after a synchronisation.

Every table validates itself: every mask's whole network is timed in the same rounds and compared
with ``search.tables.predict`` (``mape``, ``max_error``). A table above ``--tolerance``, with a mask
at 0 ms or below, a remainder below 0 beyond the tolerance of the fastest mask, or rounds that
spread is measured again, and after ``--attempts`` the command fails saying the machine was too
busy. ``--validate`` prints the validation; ``validate(table)`` checks a saved table again later.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from adn import BlockMask, SkipMask, create_model, list_models
from pipeline.lock import exclusive

from .parts import Part, capture_inputs, default_resolution, model_parts, skeleton
from .tables import FORMAT, LOCAL_TARGETS, TableError, load_table, predict, predict_all, save_table, user_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: A fresh table's own MAPE against the whole network under every mask, timed in the same rounds.
TOLERANCE = 0.05
#: Measurements a busy machine gets before it is reported.
ATTEMPTS = 3
#: The median relative interquartile range of the rounds above which the machine was shared (idle here:
#: 0.08 to 0.13; two measurements at once on 2 cores: 0.56).
MAX_SPREAD = 0.25


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


class Timer:
    """Milliseconds per call: wall clock on CPU, CUDA events after a synchronisation on GPU.

    Calls are timed in bursts of about ``target_ms`` (short parts repeat many times per sample).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def _once(self, fn: Callable[[], Any], iters: int) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / iters
        begin = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - begin) * 1e3 / iters

    def iterations(self, fn: Callable[[], Any], target_ms: float, warmup: int = 3) -> int:
        for _ in range(warmup):
            fn()
        one = self._once(fn, 1)
        return max(1, min(1000, math.ceil(target_ms / max(one, 1e-3))))

    def interleaved(self, fns: dict[str, tuple[Callable[[], Any], float]], rounds: int, desc: str,
                    ) -> Timings:
        """Median ms per call of each (function, burst ms); every round times each once, in a fresh random
        order, so a slow spell of a shared machine lands on all of them alike and no item always follows the
        one that warms its caches. The spread of the rounds comes back too: it is how a busy machine shows."""
        iters = {k: self.iterations(fn, target) for k, (fn, target) in fns.items()}
        samples: dict[str, list[float]] = {k: [] for k in fns}
        order = random.Random(0)
        for _ in tqdm(range(rounds), desc=desc, leave=False, file=sys.stderr):
            names = list(fns)
            order.shuffle(names)
            for k in names:
                samples[k].append(self._once(fns[k][0], iters[k]))
        return Timings({k: statistics.median(v) for k, v in samples.items()}, round_spread(samples))


class Timings(NamedTuple):
    ms: dict[str, float]
    spread: float


def round_spread(samples: dict[str, list[float]]) -> float:
    """The median over items of each item's interquartile range relative to its median.

    On an idle machine the rounds of one item agree to a few per cent; a neighbour that takes a
    core for part of the run spreads them (the table is then a mix of two machines).
    """
    spreads = []
    for values in samples.values():
        if len(values) >= 4:
            q1, _, q3 = statistics.quantiles(values, n=4)
            spreads.append((q3 - q1) / max(statistics.median(values), 1e-9))
    return statistics.median(spreads) if spreads else 0.0


def _mode_mask(num_stages: int, norm_bit: int | None) -> SkipMask:
    bits = [False] * num_stages
    if norm_bit is not None:
        bits[norm_bit] = True
    return SkipMask(tuple(bits))


def _call_part(model: nn.Module, part: Part, mask: SkipMask) -> Callable[[], Any]:
    def run() -> Any:
        model.set_skip(mask)  # a flag flip, and only when the mask changes
        return part.module(*part.args, **part.kwargs)
    return run


def _call_model(model: nn.Module, x: torch.Tensor, mask: SkipMask) -> Callable[[], Any]:
    return lambda: model(x, skip=mask)


def prepare(name: str, device: str, batch_size: int, resolution: int | None, dtype: str, num_classes: int = 1000,
            ) -> tuple[nn.Module, torch.Tensor, int]:
    """The model in eval mode on ``device`` in ``dtype``, an input batch, and the resolution used."""
    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but this machine has no CUDA device.")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}.")
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes)
    res = resolution or int(model.pretrained_cfg["input_size"][-1])
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    x = torch.randn(batch_size, 3, res, res, device=device, dtype=DTYPES[dtype])
    return model, x, res


def _bursts(device: torch.device) -> tuple[float, float]:
    """Burst lengths (ms) for one part and for a whole network."""
    return (5.0, 20.0) if device.type == "cpu" else (2.0, 5.0)


@torch.no_grad()
def measure_table(name: str, device: str = "cpu", batch_size: int = 1, resolution: int | None = None,
                  dtype: str = "fp32", rounds: int = 15, num_classes: int = 1000,
                  validate_masks: Sequence[SkipMask] = ()) -> dict[str, Any]:
    """Time every part of ``name`` and return the table (``method: measured``).

    ``validate_masks`` are also timed end to end in the same rounds (as separate samples, not used
    for the table), so the validation sees the same machine as the table; they come back under
    ``table["validation_ms"]``.
    """
    model, x, res = prepare(name, device, batch_size, resolution, dtype, num_classes)
    dev = torch.device(device)
    parts = capture_inputs(model, model_parts(model), x)
    s = model.num_stages
    part_ms, whole_ms = _bursts(dev)
    fns: dict[str, tuple[Callable[[], Any], float]] = {}
    for p in parts:
        fns[f"{p.name}|kept"] = (_call_part(model, p, _mode_mask(s, None)), part_ms)
        if p.norm_bit is not None:
            fns[f"{p.name}|skipped"] = (_call_part(model, p, _mode_mask(s, p.norm_bit)), part_ms)
    # A skippable block is also timed in context, from both ends: the super-net with that block alone
    # dropped, and the base-net with that block alone added.
    skippable = [p for p in parts if p.skip_bit is not None]
    for i, p in enumerate(skippable):
        drop = BlockMask(tuple(j == i for j in range(len(skippable))), model.block_stages)
        add = BlockMask(tuple(j != i for j in range(len(skippable))), model.block_stages)
        fns[f"{p.name}|dropped"] = (_call_model(model, x, drop), whole_ms)
        fns[f"{p.name}|added"] = (_call_model(model, x, add), whole_ms)
    # What runs between parts: whole-network runs of the two ends minus their parts.
    ends = {"super": SkipMask.super_net(s), "base": SkipMask.base_net(s)}
    fns.update({f"{k}|model": (_call_model(model, x, m), whole_ms) for k, m in ends.items()})
    fns.update({f"{m}|validate": (_call_model(model, x, m), whole_ms) for m in validate_masks})
    times, spread = Timer(dev).interleaved(fns, rounds, desc=f"timing {len(parts)} parts")
    rows = []
    for p in parts:
        row = {"name": p.name, "skip_bit": p.skip_bit, "norm_bit": p.norm_bit, "ms": times[f"{p.name}|kept"]}
        if p.skip_bit is not None:
            # What it costs in the running network (caches as in the real forward), averaged over the
            # two ends: single drops from the super-net overstate it, single additions to the base-net understate it.
            row["ms_isolated"] = row["ms"]
            row["ms"] = max(0.5 * (times["super|model"] - times[f"{p.name}|dropped"]
                                   + times[f"{p.name}|added"] - times["base|model"]), 0.0)
        if p.norm_bit is not None:
            row["ms_norm_skipped"] = times[f"{p.name}|skipped"]
        rows.append(row)
    table = _table(name, model, device_name(dev), dev.type, dtype, batch_size, res, "measured", rows)
    table["remainder_ms"] = statistics.fmean(times[f"{k}|model"] - predict(table, m) for k, m in ends.items())
    table["rounds"] = rounds
    table["round_spread"] = spread
    if validate_masks:
        table["validation_ms"] = {str(m): times[f"{m}|validate"] for m in validate_masks}
    return table


def _table(name: str, model: nn.Module, device: str, kind: str, dtype: str, batch_size: int, resolution: int,
           method: str, rows: list[dict[str, Any]], remainder_ms: float = 0.0) -> dict[str, Any]:
    return {"format": FORMAT, "model": name, "target": None, "device": device, "device_kind": kind,
            "method": method, "dtype": dtype, "batch_size": batch_size, "resolution": resolution,
            "num_stages": model.num_stages, "num_classes": model.num_classes, "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(), "remainder_ms": remainder_ms, "parts": rows}


def compare(table: dict[str, Any], measured: dict[str, float]) -> dict[str, Any]:
    """Predicted against measured ms per mask: each error, their mean absolute value and the worst."""
    predicted = predict_all(table, measured)
    rows = [{"mask": k, "predicted_ms": predicted[k], "measured_ms": v, "error": (predicted[k] - v) / v}
            for k, v in measured.items()]
    errors = [abs(r["error"]) for r in rows]
    return {"model": table["model"], "device": table["device"], "batch_size": table["batch_size"],
            "resolution": table["resolution"], "dtype": table["dtype"],
            "mape": statistics.fmean(errors), "max_error": max(errors), "rows": rows}


@torch.no_grad()
def validate(table: dict[str, Any], device: str = "cpu", rounds: int = 15,
             masks: Sequence[SkipMask] | None = None) -> dict[str, Any]:
    """Time the whole network under every mask now and compare with an existing table's predictions."""
    model, x, _ = prepare(table["model"], device, table["batch_size"], table["resolution"], table["dtype"],
                          table.get("num_classes", 1000))
    masks = list(masks or SkipMask.all(model.num_stages))
    whole_ms = _bursts(torch.device(device))[1]
    measured, spread = Timer(torch.device(device)).interleaved(
        {str(m): (_call_model(model, x, m), whole_ms) for m in masks}, rounds, desc=f"validating {len(masks)} masks")
    return {**compare(table, measured), "round_spread": spread}


class BusyMachineError(TableError):
    """Every attempt at a table failed its own checks: the machine was shared while it was timed."""


def problems(table: dict[str, Any], report: dict[str, Any], tolerance: float, max_spread: float) -> list[str]:
    """Why a fresh table must not be trusted (empty when it may be saved).

    Measured beside another measurement or a training, parts and whole networks are timed on a machine
    whose speed changes under them: the remainder came out at -17.65 ms and 8 of 16 masks negative.
    """
    out = []
    # The remainder is fitted (whole networks minus their parts), so it carries the noise of both: resnet50's
    # came out at -0.35 and -0.83 ms on a quiet machine. Beyond the tolerance of the fastest mask it is load.
    fastest = min(r["measured_ms"] for r in report["rows"])
    if table["remainder_ms"] < -tolerance * fastest:
        out.append(f"a negative remainder between parts ({table['remainder_ms']:.2f} ms, beyond {tolerance:.0%} of "
                   f"the fastest mask's {fastest:.2f} ms)")
    negative = [r["mask"] for r in report["rows"] if r["predicted_ms"] <= 0]
    if negative:
        out.append(f"{len(negative)} masks predicted at zero or below")
    if report["mape"] > tolerance:
        out.append(f"its own MAPE {report['mape']:.1%} above the {tolerance:.0%} target")
    if table["round_spread"] > max_spread:
        out.append(f"the rounds spread {table['round_spread']:.0%} (above {max_spread:.0%})")
    return out


def measure_checked(name: str, device: str = "cpu", batch_size: int = 1, resolution: int | None = None,
                    dtype: str = "fp32", rounds: int = 15, num_classes: int = 1000, tolerance: float = TOLERANCE,
                    attempts: int = ATTEMPTS, max_spread: float = MAX_SPREAD,
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A table that passed its self-validation, with that validation: every mask timed end to end in the
    same rounds as the parts, the table's MAPE against them at most ``tolerance``, no mask at 0 ms or below,
    no remainder further below 0 than ``tolerance`` of the fastest mask, and rounds that agree. A failed
    attempt is measured again; after ``attempts`` failures ``BusyMachineError``.
    """
    masks = list(SkipMask.all(skeleton(name).num_stages))
    why: list[str] = []
    for attempt in range(1, attempts + 1):
        table = measure_table(name, device, batch_size, resolution, dtype, rounds, num_classes, validate_masks=masks)
        report = {**compare(table, table.pop("validation_ms")), "round_spread": table["round_spread"]}
        why = problems(table, report, tolerance, max_spread)
        if not why:
            table["self_validation"] = {"mape": report["mape"], "max_error": report["max_error"],
                                        "tolerance": tolerance, "attempt": attempt}
            return table, report
        print(f"latency table of {name}: attempt {attempt} of {attempts} rejected ({'; '.join(why)})"
              + ("; measuring again." if attempt < attempts else "."), file=sys.stderr)
    raise BusyMachineError(f"the machine was too busy to measure a latency table of {name}: {attempts} attempts "
                           f"failed their own checks, the last with {'; '.join(why)}; stop what else runs on it "
                           "(another training or measurement) and measure again.")


def cache_path(model: str, batch_size: int, resolution: int, dtype: str, num_classes: int) -> Path:
    """This machine's cached table: every field the cache compares is in the name, except the CPU model and
    torch version, which a changed machine replaces rather than keeps beside."""
    return (user_dir() / "cpu" /
            f"{model}_b{batch_size}_r{resolution}_{dtype}_c{num_classes}_t{torch.get_num_threads()}.json")


def local_table(model: str, batch_size: int, resolution: int | None, dtype: str = "fp32", rounds: int = 15,
                remeasure: bool = False, num_classes: int = 1000, wait_s: float = 3600.0) -> dict[str, Any]:
    """``--target cpu``: this machine's table, measured now unless a cached one matches it exactly.

    Measurements of one cache entry are serialised by a file lock: a second search waits for the first
    one's table (two at once would also time each other's load) and then reuses it.
    """
    res = resolution or default_resolution(model)
    path = cache_path(model, batch_size, res, dtype, num_classes)
    with exclusive(path.with_name(path.name + ".lock"), f"the latency table {str(path)!r}", wait=wait_s):
        if path.is_file() and not remeasure:
            try:
                cached = load_table(path)
                same = (cached["device"], cached.get("torch"), cached.get("threads"), cached.get("num_classes"),
                        "self_validation" in cached) == (
                    device_name(torch.device("cpu")), torch.__version__, torch.get_num_threads(), num_classes, True)
                if same:
                    return {**cached, "source": "user", "path": str(path)}
            except TableError:
                pass  # a corrupt cache is measured again
        table, _ = measure_checked(model, "cpu", batch_size, res, dtype, rounds, num_classes)
        save_table({**table, "target": "cpu"}, path=path)
    return {**table, "target": "cpu", "source": "user", "path": str(path)}


def _print_table(table: dict[str, Any]) -> None:
    print(f"{table['model']} on {table['device']}, {table['dtype']}, batch {table['batch_size']}, "
          f"{table['resolution']}x{table['resolution']}, {table['method']}")
    print(f"{'part':<24}{'ms':>10}{'ms (norm skipped)':>20}  dropped by bit")
    for p in table["parts"]:
        skipped = f"{p['ms_norm_skipped']:.4f}" if p["norm_bit"] is not None else "-"
        bit = "-" if p["skip_bit"] is None else str(p["skip_bit"] + 1)
        print(f"{p['name']:<24}{p['ms']:>10.4f}{skipped:>20}  {bit}")
    print(f"{'(between parts)':<24}{table['remainder_ms']:>10.4f}")


def check_args(args: argparse.Namespace) -> None:
    """Every flag out of its range as one sentence, before anything is timed."""
    if args.tolerance <= 0 or args.attempts < 1:
        raise ValueError(f"--tolerance must be above 0 and --attempts at least 1, got {args.tolerance} and "
                         f"{args.attempts}.")
    if args.rounds < 3:
        raise ValueError(f"--rounds must be at least 3 for a median to mean anything, got {args.rounds}.")
    if args.threads is not None and (args.device != "cpu" or args.threads < 1):
        raise ValueError(f"--threads sets CPU threads: give a count of at least 1 with --device cpu, "
                         f"got {args.threads} with --device {args.device}.")
    if args.save_as in LOCAL_TARGETS:
        raise ValueError(f"{args.save_as!r} names this machine's cache; pick a target name such as h100.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m search.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"one of {', '.join(list_models())}")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--resolution", type=int, help="input size (default: the model's, 224 or 32)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier width (the head's cost)")
    p.add_argument("--threads", type=int,
                   help="CPU threads for the forward (default: torch's, one per core); a CPU latency holds for the "
                        "thread count it was measured with, and the table records it")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (medians are kept)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", help="write the table to this JSON file")
    where.add_argument("--save-as", metavar="TARGET",
                       help="save as a named target in the user directory ($ADN_LUT_DIR or ~/.cache/adn/luts); "
                            "it then overrides a shipped estimate of that name")
    p.add_argument("--validate", action="store_true",
                   help="print the self-validation: every mask timed end to end beside the parts, and the error")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help="the largest MAPE of the table against its own validation for it to be kept "
                        "(default %(default)s); a table above it, with a mask at 0 ms or below or a negative "
                        "remainder beyond it, or timed while the machine was busy is measured again")
    p.add_argument("--attempts", type=int, default=ATTEMPTS,
                   help="measurements before a busy machine is reported as an error (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON (the validation when --validate, else the table)")
    args = p.parse_args(argv)
    try:
        check_args(args)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        table, report = measure_checked(args.model, args.device, args.batch_size, args.resolution, args.dtype,
                                        args.rounds, args.num_classes, args.tolerance, args.attempts)
        if args.save_as:
            table["target"] = args.save_as
            saved = save_table(table, target=args.save_as)
        elif args.out:
            saved = save_table(table, path=args.out)
        else:
            saved = None
    except (ValueError, TableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report if args.validate else table, indent=1))
        return 0
    _print_table(table)
    if args.validate:
        print(f"\n{'mask':<8}{'predicted ms':>14}{'measured ms':>14}{'error':>9}")
        for r in report["rows"]:
            print(f"{r['mask']:<8}{r['predicted_ms']:>14.3f}{r['measured_ms']:>14.3f}{r['error']:>+9.1%}")
        print(f"MAPE {report['mape']:.2%}, worst {report['max_error']:.2%}")
    if saved is not None:
        print(f"table written to {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
