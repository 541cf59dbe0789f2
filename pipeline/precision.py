"""Numeric format and memory layout of a training: DeepSpeed's bf16 mode or torch autocast, and channels-last.

``bf16`` (and ``fp16``) is DeepSpeed's mode: the weights themselves are bf16 and the optimizer
keeps fp32 master copies, so every op, the norms too, runs in bf16. ``amp-bf16`` keeps fp32
weights and runs the forward under ``torch.autocast``: matmuls and convolutions in bf16, norms,
softmax and the loss in fp32, as torchvision's reference training does. Channels-last applies to
the CNNs; where DeepSpeed holds the weights in flat buffers (ZeRO 1 to 3), the weights stay NCHW
and only the activations are channels-last (cuDNN converts the weights per call).
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


def weights_to_channels_last(model: nn.Module) -> bool:
    """Make the 4-D weights channels-last after ``deepspeed.initialize`` (whose broadcast cannot view them so).

    Returns False, changing nothing, where DeepSpeed's optimizer holds the weights as views of flat
    buffers: replacing them would cut the optimizer off from the module.
    """
    params = list(model.parameters())
    if any(p.data._base is not None for p in params):
        return False
    model.to(memory_format=torch.channels_last)
    return True
