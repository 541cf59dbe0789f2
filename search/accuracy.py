"""Accuracy of many skip masks in one pass over a split, sharing the stages masks have in common.

The forward is cut at stage boundaries (``model.stage_segments()``): what a mask computes up to
the end of stage k depends only on its choices for stages 1..k. For each batch the masks asked
for form a prefix tree, walked depth first: each distinct prefix runs its segment once, and the
state at a node feeds all masks below it. All 2^S stage masks then cost about half of 2^S full
passes (resnet50), with logits identical to one-by-one evaluation: the same modules run on the
same tensors.

Nothing outlives a batch: the split streams through (``evaluate_split``), and the walk holds at
most one state per stage. Masks asked for together share; masks asked for apart do not, which
is why the search hands its masks over in batches (``search.batching``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from adn import BlockMask, SkipMask
from adn.masks import MaskLike
from pipeline.data import make_loader
from pipeline.evaluate import Accuracy, topk_hits

from .counts import PassResult


def _stage_choices(mask: SkipMask | BlockMask, num_stages: int) -> tuple[Any, ...]:
    """The part of ``mask`` each stage segment depends on: a bit, or the bits of the stage's blocks."""
    if isinstance(mask, BlockMask):
        return tuple(tuple(b for b, s in zip(mask, mask.stages, strict=True) if s == k) for k in range(num_stages))
    return tuple(mask)


class MaskEvaluator:
    """Top-1/top-5 of masks over batches, one pass for all of them, with shared stage prefixes per batch."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.segments = model.stage_segments()
        self.num_stages = model.num_stages

    @torch.no_grad()
    def run(self, batches: Iterable, masks: Iterable[MaskLike]) -> PassResult:
        """One pass over ``batches`` of (images, labels, ...) for all ``masks`` (stage or block masks)."""
        parsed = [self.model.parse_mask(m) for m in masks]
        result = PassResult({str(m): [0, 0, 0] for m in parsed})
        distinct = {str(m): m for m in parsed}.values()
        previous = self.model.skip_mask
        try:
            for batch in batches:
                images, labels = batch[0], batch[1]
                start = time.perf_counter()
                hits = self._walk(images, labels, list(distinct), result)
                for mask, (top1, top5) in hits.items():  # one sync per batch, after every mask's forward
                    c = result.counts[mask]
                    c[0] += int(top1)
                    c[1] += int(top5)
                    c[2] += labels.numel()
                result.forward_s += time.perf_counter() - start
                result.batches += 1
                result.segment_runs_one_by_one += len(distinct) * self.num_stages
        finally:
            self.model.set_skip(previous)
        return result

    def evaluate(self, batches: Iterable, masks: Iterable[MaskLike]) -> dict[str, Accuracy]:
        return {m: Accuracy(*r) for m, r in self.run(batches, masks).rates().items()}

    def _walk(self, images: torch.Tensor, labels: torch.Tensor, masks: list[SkipMask | BlockMask],
              result: PassResult) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        choices = {str(m): _stage_choices(m, self.num_stages) for m in masks}
        hits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def visit(depth: int, state: torch.Tensor, group: list[SkipMask | BlockMask]) -> None:
            if depth == self.num_stages:
                for mask in group:
                    self.model.set_skip(mask)
                    hits[str(mask)] = topk_hits(self.segments[-1](state), labels)
                return
            branches: dict[Any, list[SkipMask | BlockMask]] = {}
            for mask in group:
                branches.setdefault(choices[str(mask)][depth], []).append(mask)
            for members in branches.values():
                self.model.set_skip(members[0])  # segments 0..depth depend only on the shared prefix
                out = self.segments[depth](state)
                result.segment_runs += 1
                visit(depth + 1, out, members)

        visit(0, images, masks)
        return hits


def rss_mib() -> tuple[float, float]:
    """(resident, peak resident) MiB of this process, from /proc (0, 0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return 0.0, 0.0


def reset_peak_rss() -> bool:
    """Start the peak-resident counter afresh (Linux >= 4.0: ``clear_refs`` 5), so a pass reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def evaluate_split(model: nn.Module, data: str, split: str, recipe: dict[str, Any], masks: Iterable[MaskLike], *,
                   batch_size: int = 100, rank: int = 0, world_size: int = 1, max_samples: int | None = None,
                   num_workers: int = 0, device: str | torch.device = "cpu",
                   calibrate_images: int | None = None) -> PassResult:
    """One streaming pass over part ``rank`` of ``world_size`` of a split, for all ``masks``.

    The validation loader cuts the split into contiguous sample ranges, so parts evaluated
    anywhere and merged count every sample exactly once. The result carries where it ran, how
    many samples it saw and the peak memory of the pass. With ``calibrate_images``, each mask gets
    its own pass after ``adn.calibrate_norms`` from the first N training images (validation
    transforms; the same images on every worker, so the parts still add up exactly): the
    shared prefixes are lost, as the segment runs show.
    """
    import socket

    loader = make_loader(data, split, batch_size, {"data": recipe["data"]}, train=False, rank=rank,
                         world_size=world_size, num_workers=num_workers, device=device, max_samples=max_samples)
    before, _ = rss_mib()
    reset = reset_peak_rss()
    start = time.perf_counter()
    calibration_s = 0.0
    if calibrate_images:
        from adn.calibrate import calibrated
        from pipeline.evaluate import calibration_loader

        calibration = calibration_loader(data, recipe, calibrate_images, device)
        result = PassResult({})
        for mask in masks:
            begin = time.perf_counter()
            with calibrated(model, mask, calibration, calibrate_images):
                calibration_s += time.perf_counter() - begin
                result = result.join(MaskEvaluator(model).run(loader, [mask]))
    else:
        result = MaskEvaluator(model).run(loader, masks)
    now, peak = rss_mib()
    samples = next(iter(result.counts.values()))[2] if result.counts else 0
    result.workers.append({"host": socket.gethostname(), "pid": os.getpid(), "rank": rank, "samples": samples,
                           "bad_samples": loader.bad_samples, "wall_s": time.perf_counter() - start,
                           "rss_before_mib": before, "peak_rss_mib": peak if reset else max(peak, now),
                           "calibration_s": calibration_s})
    return result
