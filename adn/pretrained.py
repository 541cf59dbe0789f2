"""Where timm's pretrained weights of an ADN model live, found before anything waits on the hub.

``create_model(name, pretrained=True)`` goes through timm, which downloads from the Hugging Face hub
and, offline, retries for minutes before it fails. ``locate`` answers at once instead: the file in
the hub cache, or ``None`` when the hub answers and timm may download it, or one sentence naming the
file to place there when neither holds.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

#: the timm architecture each ADN family is built on (and whose pretrained weights it can start from)
TIMM_ARCH = {
    "mobilenet_v2": "mobilenetv2_100",
    "resnet50": "resnet50",
    "swin_t": "swin_tiny_patch4_window7_224",
    "vit_b16": "vit_base_patch16_224",
}
#: the file names timm asks the hub for, in its order (safetensors first)
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


class PretrainedUnavailable(FileNotFoundError):
    """timm's weights are neither cached nor downloadable now."""


@dataclass(frozen=True)
class TimmWeights:
    """timm's default pretrained weights of one architecture and the data config they were trained with."""

    arch: str
    hub_id: str
    num_classes: int
    classifier: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def cache_dir(self) -> Path:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE) / f"models--{self.hub_id.replace('/', '--')}"

    def placement(self) -> Path:
        """Where a file placed by hand is found (the hub cache's layout, revision ``main``)."""
        return self.cache_dir() / "snapshots" / "main" / HUB_FILES[0]


def timm_weights(model_name: str) -> TimmWeights:
    """The pretrained weights timm would load for an ADN model; one sentence when there are none."""
    if model_name not in TIMM_ARCH:
        raise ValueError(f"{model_name} has no timm pretrained weights (timm weights exist for "
                         f"{', '.join(sorted(TIMM_ARCH))}); start it from a file or a run instead.")
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(TIMM_ARCH[model_name])
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(f"timm {TIMM_ARCH[model_name]} has no weights on the Hugging Face hub.")
    return TimmWeights(TIMM_ARCH[model_name], cfg.hf_hub_id, cfg.num_classes, str(cfg.classifier),
                       tuple(cfg.mean), tuple(cfg.std))


def cached_file(weights: TimmWeights) -> Path | None:
    """The weights file in the hub cache (any revision ``main`` resolves to), or ``None``."""
    from huggingface_hub import try_to_load_from_cache

    for filename in HUB_FILES:
        found = try_to_load_from_cache(weights.hub_id, filename)
        if isinstance(found, str):  # not the "known missing" marker
            return Path(found)
    return None


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub's host accepts a TCP connection now (honours ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT``)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def locate(model_name: str, timeout_s: float = 3.0) -> Path | None:
    """timm's cached weights file of ``model_name``; ``None`` when not cached but the hub answers (timm downloads
    it); ``PretrainedUnavailable`` with the path to place the file at when neither."""
    weights = timm_weights(model_name)
    found = cached_file(weights)
    if found is not None or hub_reachable(timeout_s):
        return found
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} cannot be reached"
    raise PretrainedUnavailable(
        f"timm's pretrained weights of {model_name} ({weights.hub_id}, {HUB_FILES[0]}) are not in the hub cache "
        f"and {why}: download {constants.ENDPOINT}/{weights.hub_id}/resolve/main/{HUB_FILES[0]} elsewhere and "
        f"place it at {weights.placement()}, or pass that file's path instead.")

