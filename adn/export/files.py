"""A chosen sub-network as a file: safetensors, TorchScript, ONNX or a ``torch.export`` program.

Each file is loaded back after writing and its logits compared with the super-net under the
mask, so a file that would not compute the sub-network is never handed over silently.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..masks import MaskLike

FORMATS = {"safetensors": ".safetensors", "torchscript": ".pt", "onnx": ".onnx", "pt2": ".pt2"}
SUBNET_FORMAT = "adn-subnet/1"


def save_subnet(slim: nn.Module, path: str | os.PathLike[str], fmt: str, example: torch.Tensor,
                meta: dict[str, str]) -> Path:
    """Write ``slim`` (from ``export_subnet``) as ``fmt``; ONNX and pt2 keep the batch dimension dynamic.

    safetensors holds the weights and what rebuilds the module (``load_subnet``): the model, its
    classes and the mask. The other formats hold the graph too and need no ADN code to run.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # torch.export wants its own suffix
    if fmt == "safetensors":
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in slim.state_dict().items()}
        save_file(state, str(tmp), metadata={"format": SUBNET_FORMAT, **meta})
    elif fmt == "torchscript":
        with warnings.catch_warnings():  # deprecated in PyTorch 2 (pt2 is its successor) but still asked for
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # input-size asserts: traced at this size
            torch.jit.save(torch.jit.trace(slim, example, check_trace=False), str(tmp))
    elif fmt == "pt2":
        torch.export.save(torch.export.export(slim, (example,), dynamic_shapes=_dynamic_batch()), str(tmp))
    elif fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as err:
            raise ValueError("ONNX export needs the onnx and onnxscript packages: pip install '.[export]'.") from err
        program = torch.onnx.export(slim, (example,), dynamo=True, dynamic_shapes=_dynamic_batch(),
                                    input_names=["images"], output_names=["logits"], verbose=False)
        program.save(str(tmp))
    else:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}.")
    os.replace(tmp, path)
    return path


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def load_subnet(path: str | os.PathLike[str], fmt: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The written sub-network as a callable on a batch of images (ONNX runs in onnxruntime)."""
    path = Path(path)
    fmt = fmt or format_of(path)
    if fmt == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        from ..registry import create_model
        from . import export_subnet

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != SUBNET_FORMAT:
            raise ValueError(f"{str(path)!r} is not a sub-network written by adn.export.")
        skeleton = create_model(meta["model"], num_classes=int(meta["num_classes"]))
        slim = export_subnet(skeleton, meta["mask"])
        slim.load_state_dict(load_file(str(path)))
        return slim.eval()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path)).eval()
    if fmt == "pt2":
        return torch.export.load(str(path)).module()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])


def format_of(path: str | os.PathLike[str]) -> str:
    suffix = Path(path).suffix.lower()
    for fmt, ext in FORMATS.items():
        if suffix == ext or (fmt == "torchscript" and suffix in (".pt", ".ts", ".torchscript")):
            return fmt
    raise ValueError(f"cannot tell the format of {str(path)!r} from its extension; pass --format "
                     f"({', '.join(FORMATS)}).")


@dataclass(frozen=True)
class Exported:
    path: Path
    fmt: str
    mask: str
    params: int  # what the file holds (norms folded away)
    gflops: float  # multiply-accumulates of the sub-network at the model's resolution
    max_abs_diff: float  # the file's logits against the super-net under the mask


def export_file(model: nn.Module, mask: MaskLike, path: str | os.PathLike[str], fmt: str, *, model_name: str,
                classes: list[str], resolution: int, batch_size: int = 2, atol: float = 1e-4) -> Exported:
    """Export ``model`` under ``mask`` to ``path``, load the file back and compare its logits with the super-net's."""
    from ..complexity import count_flops
    from . import export_subnet

    mask = model.parse_mask(mask)
    slim = export_subnet(model, mask)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(batch_size, 3, resolution, resolution, generator=generator)
    meta = {"model": model_name, "mask": str(mask), "num_classes": str(len(classes)),
            "classes": json.dumps(classes), "resolution": str(resolution)}
    written = save_subnet(slim, path, fmt, example, meta)
    check = torch.randn(batch_size + 1, 3, resolution, resolution, generator=generator)  # another batch size
    with torch.no_grad():
        reference = model.eval()(check, skip=mask)
        got = load_subnet(written, fmt)(check)
    diff = (got - reference).abs().max().item()
    if not diff <= atol * max(1.0, reference.abs().max().item()):
        raise ValueError(f"the exported {fmt} file gives logits {diff:.2e} away from the super-net under {mask} "
                         f"(more than {atol:g}); it was written to {str(written)!r} but should not be used.")
    return Exported(written, fmt, str(mask), sum(p.numel() for p in slim.parameters()),
                    count_flops(model, mask, resolution) / 1e9, diff)
