"""Roofline estimates of latency tables for accelerators we cannot measure here.

Every kernel the forward launches (one per ATen op, as PyTorch eager runs it) costs
``max(FLOPs / (peak * compute_efficiency), bytes / (bandwidth * memory_efficiency)) + launch``:
matmuls and convolutions run at the dtype's tensor-core peak, other ops at the FP32 vector peak;
bytes are the op's inputs read and outputs written; views launch nothing. The forward is traced
once on the ``meta`` device (shapes only, no compute) and each kernel is charged to the part
(``search.parts``) that launched it. Tables are marked ``method: roofline-estimate``.

Spec figures are the vendors' published datasheet numbers (dense, without structured sparsity);
see ``SPECS``. The efficiency factors and launch overhead are assumptions until ``calibrate`` fits
them to whole-network times measured on a device (``benchmarks/gpu.py`` does so on a GPU).

``python -m search.roofline --write`` regenerates the tables shipped in ``search/luts/``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from tqdm import tqdm

from adn import SkipMask, create_model

from .parts import Part, model_parts
from .profile import DTYPES
from .tables import FORMAT, SHIPPED_DIR, save_table, table_filename


@dataclass(frozen=True)
class Spec:
    """Published peak figures of one accelerator, and the assumptions that turn them into time."""

    device: str
    tensor_tflops: dict[str, float]  # dense tensor-core peak per dtype
    fp32_tflops: float  # vector (CUDA-core) FP32 peak
    bandwidth_gbs: float
    source: str
    compute_efficiency: float = 0.5
    memory_efficiency: float = 0.7
    launch_us: float = 6.0

    @property
    def default_dtype(self) -> str:
        return "bf16" if "bf16" in self.tensor_tflops else "fp16"


SPECS: dict[str, Spec] = {
    "h100": Spec("NVIDIA H100 SXM5 80GB", {"bf16": 989.4, "fp16": 989.4}, 66.9, 3350.0,
                 "NVIDIA H100 Tensor Core GPU datasheet: BF16/FP16 tensor 1,979 TFLOPS with sparsity (989.4 dense), "
                 "FP32 66.9 TFLOPS, HBM3 3.35 TB/s (SXM5)"),
    "h200": Spec("NVIDIA H200 SXM 141GB", {"bf16": 989.4, "fp16": 989.4}, 66.9, 4800.0,
                 "NVIDIA H200 Tensor Core GPU datasheet: the H100's compute (BF16/FP16 tensor 989.4 TFLOPS dense, FP32 "
                 "66.9 TFLOPS), HBM3e 4.8 TB/s"),
    "a100": Spec("NVIDIA A100 SXM4 80GB", {"bf16": 312.0, "fp16": 312.0}, 19.5, 2039.0,
                 "NVIDIA A100 Tensor Core GPU datasheet: BF16/FP16 tensor 312 TFLOPS (dense), FP32 19.5 TFLOPS, "
                 "HBM2e 2,039 GB/s (80GB SXM4)"),
    "v100": Spec("NVIDIA V100 SXM2 32GB", {"fp16": 125.0}, 15.7, 900.0,
                 "NVIDIA V100 datasheet: tensor (FP16) 125 TFLOPS, FP32 15.7 TFLOPS, HBM2 900 GB/s (SXM2); no BF16"),
    "l4": Spec("NVIDIA L4", {"bf16": 121.0, "fp16": 121.0}, 30.3, 300.0,
               "NVIDIA L4 datasheet: BF16/FP16 tensor 242 TFLOPS with sparsity (121 dense), FP32 30.3 TFLOPS, "
               "GDDR6 300 GB/s"),
    "t4": Spec("NVIDIA T4", {"fp16": 65.0}, 8.1, 320.0,
               "NVIDIA T4 datasheet: mixed-precision (FP16/FP32) 65 TFLOPS, FP32 8.1 TFLOPS, GDDR6 320 GB/s; no BF16"),
    "jetson-orin": Spec("NVIDIA Jetson AGX Orin 64GB", {"bf16": 21.3, "fp16": 21.3}, 5.3, 204.8,
                        "Jetson AGX Orin series datasheet: 2,048 CUDA cores and 64 third-generation tensor cores at "
                        "up to 1.3 GHz (FP32 5.3 TFLOPS), LPDDR5 204.8 GB/s; dense FP16/BF16 tensor peak derived as "
                        "64 x 128 FMA x 2 x 1.3 GHz = 21.3 TFLOPS", launch_us=10.0),
}
#: What the shipped tables cover: the four paper models at 224 and the CPU variants at 32, batch 1 and 64.
SHIPPED_MODELS = ("resnet50", "mobilenet_v2", "vit_b16", "swin_t", "resnet_mini", "vit_mini")
SHIPPED_BATCHES = (1, 64)


@dataclass
class Kernel:
    flops: float
    bytes: float
    tensor_core: bool


class _KernelTrace(TorchDispatchMode):
    """Records each ATen op's FLOPs and bytes, charged to the part running (``None``: between parts)."""

    def __init__(self) -> None:
        super().__init__()
        self.current: str | None = None
        self.kernels: dict[str | None, list[Kernel]] = defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func.overloadpacket in (torch.ops.aten.detach,):
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        nbytes = float(sum(t.numel() * t.element_size() for t in tensors))
        packet = func.overloadpacket
        if packet in flop_registry:
            flops, tensor_core = float(flop_registry[packet](*args, **kwargs, out_val=out)), True
        else:
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            flops, tensor_core = float(sum(t.numel() for t in outs)), False
        self.kernels[self.current].append(Kernel(flops, nbytes, tensor_core))
        return out


def kernel_time_ms(kernel: Kernel, spec: Spec, dtype: str) -> float:
    peak = (spec.tensor_tflops[dtype] if kernel.tensor_core and dtype in spec.tensor_tflops else spec.fp32_tflops)
    compute = kernel.flops / (peak * 1e12 * spec.compute_efficiency)
    memory = kernel.bytes / (spec.bandwidth_gbs * 1e9 * spec.memory_efficiency)
    return (max(compute, memory) + spec.launch_us * 1e-6) * 1e3


@torch.no_grad()
def trace_kernels(model_name: str, batch_size: int, resolution: int | None, dtype: str,
                  num_classes: int = 1000) -> tuple[list[Part], dict[str | None, list[Kernel]], Any, int]:
    """The kernels of one super-net forward on ``meta`` tensors, per part."""
    with torch.device("meta"):
        model = create_model(model_name, num_classes=num_classes)
    res = resolution or int(model.pretrained_cfg["input_size"][-1])
    model = model.to(DTYPES[dtype]).eval()
    parts = model_parts(model)
    trace = _KernelTrace()

    def enter(part: Part):  # noqa: ANN202
        def pre(module, args):  # noqa: ANN001, ANN202
            trace.current = part.name
        return pre

    def leave(module, args, out):  # noqa: ANN001, ANN202
        trace.current = None

    handles = []
    for part in parts:
        handles.append(part.module.register_forward_pre_hook(enter(part)))
        handles.append(part.module.register_forward_hook(leave))
    x = torch.empty(batch_size, 3, res, res, device="meta", dtype=DTYPES[dtype])
    try:
        with trace:
            model(x, skip=None)
    finally:
        for h in handles:
            h.remove()
    return parts, trace.kernels, model, res


def estimate_table(target: str, model_name: str, batch_size: int = 1, resolution: int | None = None,
                   dtype: str | None = None, num_classes: int = 1000, spec: Spec | None = None) -> dict[str, Any]:
    """The roofline-estimate table of ``model_name`` on ``target`` (``spec``: other factors than the shipped)."""
    if target not in SPECS:
        raise ValueError(f"no spec for target {target!r}; known: {', '.join(SPECS)}.")
    spec = spec or SPECS[target]
    dtype = dtype or spec.default_dtype
    parts, kernels, model, res = trace_kernels(model_name, batch_size, resolution, dtype, num_classes)
    rows = []
    for part in parts:
        if part.name not in kernels:
            continue  # never called in the forward (an unused head dropout, say)
        ms = sum(kernel_time_ms(k, spec, dtype) for k in kernels[part.name])
        row = {"name": part.name, "skip_bit": part.skip_bit, "norm_bit": part.norm_bit, "ms": ms,
               "kernels": len(kernels[part.name]), "gflop": sum(k.flops for k in kernels[part.name]) / 1e9}
        if part.norm_bit is not None:
            row["ms_norm_skipped"] = ms  # the other norm of a pair is the same kernel on the same shapes
        rows.append(row)
    return {"format": FORMAT, "model": model_name, "target": target, "device": spec.device, "device_kind": "cuda",
            "method": "roofline-estimate", "dtype": dtype, "batch_size": batch_size, "resolution": res,
            "num_stages": model.num_stages, "num_classes": num_classes,
            "date": datetime.date.today().isoformat(),
            "remainder_ms": sum(kernel_time_ms(k, spec, dtype) for k in kernels.get(None, [])),
            "parts": rows,
            "spec": {"tensor_tflops": spec.tensor_tflops, "fp32_tflops": spec.fp32_tflops,
                     "bandwidth_gbs": spec.bandwidth_gbs, "compute_efficiency": spec.compute_efficiency,
                     "memory_efficiency": spec.memory_efficiency, "launch_us": spec.launch_us,
                     "source": spec.source}}


def calibrate(measured: list[dict[str, Any]], target: str) -> dict[str, Any]:
    """Fit ``target``'s efficiency factors and launch cost to whole-network times measured there.

    ``measured``: one entry per (model, batch, dtype), ``{"model", "batch_size", "resolution", "dtype",
    "mask_ms": {mask: ms}}``. The fit minimises the mean absolute relative error over every mask of every
    entry (a grid over both efficiencies; the launch cost, linear in the kernel count, on a fine grid).
    Returns the fitted factors (``at_edge`` names any that ended on the edge of its range: a model the
    roofline does not fit) and the error per entry before (the shipped factors) and after.
    """
    import numpy as np

    spec = SPECS[target]
    efficiencies = np.round(np.arange(0.05, 1.0001, 0.05), 2)
    launches = np.arange(0.0, 30.0001, 0.25)
    entries = []
    for m in measured:
        parts, kernels, model, res = trace_kernels(m["model"], m["batch_size"], m.get("resolution"), m["dtype"])
        masks = list(m["mask_ms"])
        included = _included(model, parts, masks)
        arrays = {name: (np.array([k.flops for k in ks]), np.array([k.bytes for k in ks]),
                         np.array([spec.tensor_tflops.get(m["dtype"], spec.fp32_tflops) if k.tensor_core
                                   else spec.fp32_tflops for k in ks]) * 1e12)
                  for name, ks in kernels.items()}
        counts = np.array([sum(len(kernels.get(n, ())) for n in included[mask] + [None]) for mask in masks])
        entries.append((m, masks, included, arrays, counts, np.array([m["mask_ms"][k] for k in masks])))

    def no_launch_ms(entry: tuple, ce: float, me: float) -> Any:
        _, masks, included, arrays, _, _ = entry
        per_part = {name: float(np.maximum(f / (peak * ce), b / (spec.bandwidth_gbs * 1e9 * me)).sum() * 1e3)
                    for name, (f, b, peak) in arrays.items()}
        return np.array([sum(per_part.get(n, 0.0) for n in included[mask] + [None]) for mask in masks])

    def errors(ce: float, me: float, launch_us: float) -> list[Any]:
        return [np.abs(no_launch_ms(e, ce, me) + e[4] * launch_us * 1e-3 - e[5]) / e[5] for e in entries]

    best = (float("inf"), spec.compute_efficiency, spec.memory_efficiency, spec.launch_us)
    for ce in efficiencies:
        for me in efficiencies:
            base = [(no_launch_ms(e, ce, me), e[4], e[5]) for e in entries]
            for launch in launches:
                err = float(np.mean(np.concatenate([np.abs(a + n * launch * 1e-3 - t) / t for a, n, t in base])))
                if err < best[0]:
                    best = (err, float(ce), float(me), float(launch))
    before = errors(spec.compute_efficiency, spec.memory_efficiency, spec.launch_us)
    after = errors(*best[1:])
    edges = {"compute_efficiency": efficiencies, "memory_efficiency": efficiencies, "launch_us": launches}
    at_edge = [k for k, v in zip(edges, best[1:], strict=True) if v in (edges[k][0], edges[k][-1])]
    return {"target": target, "compute_efficiency": best[1], "memory_efficiency": best[2], "launch_us": best[3],
            "at_edge": at_edge,
            "shipped": {"compute_efficiency": spec.compute_efficiency, "memory_efficiency": spec.memory_efficiency,
                        "launch_us": spec.launch_us},
            "entries": [{"model": e[0]["model"], "batch_size": e[0]["batch_size"], "dtype": e[0]["dtype"],
                         "mape_shipped": float(b.mean()), "max_error_shipped": float(b.max()),
                         "mape_fitted": float(a.mean()), "max_error_fitted": float(a.max())}
                        for e, b, a in zip(entries, before, after, strict=True)],
            "mape_shipped": float(np.mean(np.concatenate(before))), "mape_fitted": best[0]}


def _included(model: torch.nn.Module, parts: list[Part], masks: list[str]) -> dict[str, list[str]]:
    """The parts each stage mask runs (a skippable part is left out when its stage is skipped)."""
    out = {}
    for mask in masks:
        skipped = SkipMask.parse(mask, model.num_stages)
        out[mask] = [p.name for p in parts if p.skip_bit is None or not skipped[p.skip_bit]]
    return out


def write_shipped(out: Path = SHIPPED_DIR) -> list[Path]:
    """Regenerate every shipped estimate: each target x model x batch, in the target's default dtype."""
    written = []
    jobs = [(t, m, b) for t in SPECS for m in SHIPPED_MODELS for b in SHIPPED_BATCHES]
    for target, model, batch in tqdm(jobs, desc="estimating", file=sys.stderr):
        table = estimate_table(target, model, batch)
        written.append(save_table(table, path=out / target / table_filename(table)))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m search.roofline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="regenerate the shipped tables in search/luts/")
    p.add_argument("--out", type=Path, default=SHIPPED_DIR, help="where --write puts them")
    args = p.parse_args(argv)
    if not args.write:
        for name, spec in SPECS.items():
            print(f"{name:<12} {spec.device}: {spec.source}")
        return 0
    paths = write_shipped(args.out)
    print(f"{len(paths)} tables written under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
