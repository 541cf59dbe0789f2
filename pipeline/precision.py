"""Numeric format and memory layout of a training: DeepSpeed's bf16 mode or torch autocast, and channels-last.

``bf16`` (and ``fp16``) is DeepSpeed's mode: the weights themselves are bf16 and the optimizer
keeps fp32 master copies, so every op, the norms too, runs in bf16. ``amp-bf16`` keeps fp32
weights and runs the forward under ``torch.autocast``: matmuls and convolutions in bf16, norms,
softmax and the loss in fp32, as torchvision's reference training does. Channels-last applies to
the CNNs; where DeepSpeed holds the weights itself (ZeRO 1 and 2), the weights stay NCHW and only
the activations are channels-last (cuDNN converts the weights per call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

#: Weight dtype per precision (``amp-bf16`` keeps fp32 weights and casts per op).
WEIGHT_DTYPES = {"fp32": torch.float32, "amp-bf16": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(asked: str, use_cuda: bool, amp: bool) -> str:
    """``auto``: torch autocast in bf16 on a GPU when the recipe asks for AMP, else fp32."""
    if asked == "auto":
        return "amp-bf16" if use_cuda and amp else "fp32"
    if asked == "fp16" and not use_cuda:
        raise ValueError("--precision fp16 needs a GPU; on CPU use fp32, bf16 or amp-bf16.")
    return asked


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """The forward's context: ``torch.autocast`` in bf16 for ``amp-bf16``, nothing for the other precisions."""
    if precision == "amp-bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def is_cnn(model: nn.Module) -> bool:
    """Whether the network's features are NCHW (channels on dim 1), so channels-last changes its kernels."""
    return getattr(model, "channel_dim", None) == 1


def use_channels_last(model: nn.Module) -> bool:
    """Set a CNN up for channels-last activations once ``deepspeed.initialize`` has run (its broadcast cannot
    view channels-last weights); True when the 4-D weights were made channels-last too.

    Where DeepSpeed's optimizer holds the weights as views of one flat buffer (ZeRO 1 and 2), replacing
    them would cut the optimizer off from the module: they stay NCHW, and their gradients (channels-last
    from a channels-last input) are made NCHW before DeepSpeed's gradient buckets, which view them flat.
    """
    params = list(model.parameters())
    if len({p.untyped_storage().data_ptr() for p in params}) == len(params):  # each weight its own storage
        model.to(memory_format=torch.channels_last)
        return True
    for p in params:
        if p.dim() == 4:
            p.register_hook(lambda grad: grad.contiguous())
    return False

