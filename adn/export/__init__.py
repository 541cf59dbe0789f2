"""Export one sub-network as a plain, slim timm module for deployment.

The copy drops the skipped blocks, keeps only the active norm of each switchable pair, folds
batch norms into the convolution in front of them, and becomes an instance of the plain timm
class again: its forward takes no mask, and ``torch.export`` / ONNX see a static graph.

Files (``adn.export.files``, ``python -m pipeline.export``): the sub-network written as safetensors,
TorchScript, ONNX or a ``torch.export`` program, loaded back and checked against the super-net.
"""

from __future__ import annotations

import copy

import torch
from timm.layers import BatchNormAct2d
from torch import fx, nn

from ..masks import BlockMask, MaskLike, SkipMask, stage_view
from ..network import AdaptiveDepthMixin, SkippableSequential, plain_class
from ..norms import KeptOnly, SwitchableNorm


def export_subnet(model: nn.Module, mask: MaskLike = None, fold_bn: bool = True) -> nn.Module:
    """Return a plain eval-mode ``nn.Module`` that computes ``model`` under ``mask``; ``model`` is untouched."""
    if not isinstance(model, AdaptiveDepthMixin):
        raise TypeError(f"{type(model).__name__} is not an ADN model; build one with adn.create_model.")
    mask = model.parse_mask(mask)
    sub = copy.deepcopy(model).eval()
    _slim(sub, mask)
    sub.__class__ = plain_class(model)
    for name in ("adn_name", "num_stages", "block_stages", "_skippable", "_switchable_norms", "_kept_only",
                 "_skip_mask"):
        sub.__dict__.pop(name, None)
    sub.adn_mask = str(mask)
    if fold_bn:
        fold_batch_norms(sub)
    return sub


def _slim(module: nn.Module, mask: SkipMask | BlockMask) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, SwitchableNorm):
            child = child.norms[int(stage_view(mask)[child.bit])]
        elif isinstance(child, KeptOnly):
            child = nn.Identity() if stage_view(mask)[child.bit] else child.module
        elif isinstance(child, SkippableSequential):
            child = nn.Sequential(*child.kept_blocks(mask))
        setattr(module, name, child)
        _slim(child, mask)


class _ConvNormTracer(fx.Tracer):
    """Keeps convolutions and batch norms (timm's BatchNormAct2d too) as single graph nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)) or super().is_leaf_module(m, qualname)


@torch.no_grad()
def fold_batch_norms(module: nn.Module) -> int:
    """Fold each eval-mode batch norm into the convolution whose only consumer it is; returns how many.

    The data flow comes from an FX trace, so a convolution whose output is also used elsewhere
    (where folding would change that other use) is left alone. Untraceable modules fold nothing.
    """
    try:
        graph = _ConvNormTracer().trace(module)
    except Exception:  # noqa: BLE001 - FX cannot trace every model; not folding is always correct.
        return 0
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        norm = module.get_submodule(node.target)
        source = node.args[0] if node.args else None
        if not (isinstance(norm, nn.BatchNorm2d) and isinstance(source, fx.Node) and source.op == "call_module"):
            continue
        conv = module.get_submodule(source.target)
        if not (isinstance(conv, nn.Conv2d) and calls[source.target] == 1 and len(source.users) == 1):
            continue
        replacement = _without_norm(norm)
        if replacement is None or not norm.track_running_stats or conv.out_channels != norm.num_features:
            continue
        _fold_into(conv, norm)
        parent, _, leaf = node.target.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, replacement)
        folded += 1
    return folded


def _without_norm(norm: nn.BatchNorm2d) -> nn.Module | None:
    """What remains of a batch-norm module once its affine map lives in the convolution."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    if type(norm) is BatchNormAct2d:
        return nn.Sequential(norm.drop, norm.act) if not isinstance(norm.drop, nn.Identity) else norm.act
    return None


def _fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    inv_std = torch.rsqrt(norm.running_var + norm.eps)
    scale = norm.weight * inv_std if norm.affine else inv_std
    shift = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - norm.running_mean) * scale + shift)


from .files import FORMATS, Exported, export_file, load_subnet, save_subnet  # noqa: E402 (they use export_subnet)

__all__ = ["FORMATS", "Exported", "export_file", "export_subnet", "fold_batch_norms", "load_subnet", "save_subnet"]
