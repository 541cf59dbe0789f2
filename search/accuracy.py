"""Accuracy of many skip masks at once, sharing the stages masks have in common.

The forward is cut at stage boundaries (``model.stage_segments()``): what a mask computes up to
the end of stage k depends only on its choices for stages 1..k. For each batch the masks asked
for form a prefix tree, walked depth first: each distinct prefix runs its segment once, and the
state at a node feeds all masks below it. All 2^S stage masks then cost about half of 2^S full
passes (resnet50), with logits identical to one-by-one evaluation: the same modules run on the
same tensors. A bounded cache of stage states (``cache_bytes``) carries the sharing across calls,
so Ray Tune trials served by one worker process reuse each other's prefixes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from adn import BlockMask, SkipMask
from adn.masks import MaskLike
from pipeline.evaluate import Accuracy, topk_hits


def _stage_choices(mask: SkipMask | BlockMask, num_stages: int) -> tuple[Any, ...]:
    """The part of ``mask`` each stage segment depends on: a bit, or the bits of the stage's blocks."""
    if isinstance(mask, BlockMask):
        return tuple(tuple(b for b, s in zip(mask, mask.stages, strict=True) if s == k) for k in range(num_stages))
    return tuple(mask)


class MaskEvaluator:
    """Top-1/top-5 of masks on validation batches held in memory, with shared stage prefixes."""

    def __init__(self, model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 cache_bytes: int = 2 << 30) -> None:
        self.model = model.eval()
        self.batches = list(batches)
        self.segments = model.stage_segments()
        self.num_stages = model.num_stages
        self.cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.cache_bytes, self._cached = cache_bytes, 0
        self.segment_runs = 0  # stage segments actually computed (a measure of the sharing)

    def _remember(self, key: tuple, state: torch.Tensor) -> None:
        size = state.numel() * state.element_size()
        if size > self.cache_bytes:
            return
        self.cache[key] = state
        self._cached += size
        while self._cached > self.cache_bytes:
            _, old = self.cache.popitem(last=False)
            self._cached -= old.numel() * old.element_size()

    @torch.no_grad()
    def evaluate(self, masks: Iterable[MaskLike]) -> dict[str, Accuracy]:
        """Accuracy of each mask (stage or block masks, as ``model.parse_mask`` reads them)."""
        parsed = [self.model.parse_mask(m) for m in masks]
        counts = {str(m): [0, 0, 0] for m in parsed}
        previous = self.model.skip_mask
        try:
            for index, (images, labels) in enumerate(self.batches):
                self._walk(index, images, labels, parsed, counts)
        finally:
            self.model.set_skip(previous)
        return {k: Accuracy(c1 / n if n else 0.0, c5 / n if n else 0.0, n) for k, (c1, c5, n) in counts.items()}

    def _walk(self, index: int, images: torch.Tensor, labels: torch.Tensor,
              masks: list[SkipMask | BlockMask], counts: dict[str, list[int]]) -> None:
        choices = {str(m): _stage_choices(m, self.num_stages) for m in masks}

        def visit(depth: int, state: torch.Tensor, group: list[SkipMask | BlockMask]) -> None:
            if depth == self.num_stages:
                for mask in group:
                    self.model.set_skip(mask)
                    top1, top5 = topk_hits(self.segments[-1](state), labels)
                    c = counts[str(mask)]
                    c[0] += int(top1)
                    c[1] += int(top5)
                    c[2] += labels.numel()
                return
            branches: dict[Any, list[SkipMask | BlockMask]] = {}
            for mask in group:
                branches.setdefault(choices[str(mask)][depth], []).append(mask)
            for members in branches.values():
                key = (index, choices[str(members[0])][: depth + 1])
                out = self.cache.get(key)
                if out is None:
                    self.model.set_skip(members[0])  # segments 0..depth depend only on the shared prefix
                    out = self.segments[depth](state)
                    self.segment_runs += 1
                    self._remember(key, out)
                else:
                    self.cache.move_to_end(key)
                visit(depth + 1, out, members)

        visit(0, images, masks)
