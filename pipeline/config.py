"""One training's settings: recipe values, then flags, then defaults, resolved and validated once.

``TrainConfig`` is what the trainer reads, and its ``record`` is what is printed, saved as
``config.yaml``, logged as MLflow params and kept in every checkpoint. ``preflight`` checks it
against the world (data, tracking server, checkpoints, the ``--init-from`` source) before any
rank or node starts. This module imports neither torch nor DeepSpeed: ``--help`` and a bad flag
answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import CHECKPOINTS, NeverSaved, find_checkpoint
from .data import read_manifest
from .data.storage import parse_location
from .distributed import RENDEZVOUS_TIMEOUT_S
from .recipes import list_recipes, load_recipe
from .tracking import check_reachable, resolve_tracking_uri

if TYPE_CHECKING:
    from .init_from import InitSource

#: Training modes: the two-pass ADN step, or one network alone (the paper's baselines).
MODES = ("adn", "vanilla", "base")
#: Numeric formats of a training (``pipeline.precision``).
PRECISIONS = ("auto", "fp32", "amp-bf16", "bf16", "fp16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Train an ADN super-net (two-pass self-distillation) with DeepSpeed, tracked in MLflow.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="ADN model name (adn.list_models()); defaults to the recipe's model")
    p.add_argument("--data", required=True, help="WebDataset shards with train.json and val.json: a directory, "
                                                 "http(s)://HOST/PREFIX, s3://BUCKET/PREFIX or 'pipe:CMD {}'")
    p.add_argument("--recipe", help=f"shipped recipe ({', '.join(list_recipes())}) or a YAML file; "
                                    "defaults to the recipe named after --model")
    p.add_argument("--mode", choices=MODES, default="adn",
                   help="adn: two-pass self-distillation; vanilla: the super-net alone; base: the base-net alone")
    p.add_argument("--output", help="run directory for checkpoints, weights and config (default runs/MODEL-MODE)")
    p.add_argument("--resume", nargs="?", const="", metavar="PATH",
                   help="continue from the newest complete checkpoint of --output, or of PATH (an output directory "
                        "or one checkpoint tag); SIGTERM or SIGUSR1 stops a run with a checkpoint to resume from")
    p.add_argument("--init-from", metavar="SOURCE",
                   help="start from trained weights instead of random ones (a fine-tune, e.g. with a *_finetune "
                        "recipe): 'timm' (timm's pretrained weights, from the hub cache), PATH (a plain timm or ADN "
                        "state dict, or a training output directory) or 'mlflow:RUN_ID' (that run's weights); the "
                        "super-net and base-net are evaluated before the first step")
    g = p.add_argument_group("recipe overrides")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="samples per rank per step")
    g.add_argument("--lr", type=float, help="base learning rate")
    g.add_argument("--alpha", type=float, help="weight of the super-net CE (1 - alpha weighs the KD)")
    g.add_argument("--temperature", type=float, help="KD temperature T")
    g.add_argument("--kd-topk", type=int, help="KL over the teacher's top-k classes only (0: all classes)")
    g.add_argument("--feature-kd", type=float, help="weight of the KL on stage outputs (0: off)")
    g.add_argument("--clip-grad", type=float, help="gradient-norm clipping (0: off)")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="keep an EMA of the weights")
    g = p.add_argument_group("engine")
    g.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0,
                   help="DeepSpeed ZeRO stage (0 and 1 reduce gradients once per ADN step; 2 and 3 after each of "
                        "its two backward passes: benchmarks/comms.py)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="amp-bf16: fp32 weights, forward under torch.autocast (norms and loss in fp32); bf16, fp16: "
                        "DeepSpeed's mode (bf16 weights, fp32 master copies); auto: amp-bf16 on GPU when the recipe "
                        "asks for AMP, else fp32")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format for a CNN's activations and weights (default: on for CNNs on "
                        "GPU)")
    g.add_argument("--deepspeed-config", help="JSON file merged over the generated DeepSpeed config")
    g.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    g.add_argument("--decode", choices=("workers", "device"), default="workers",
                   help="where JPEGs are decoded: in the DataLoader workers, or on the training device (nvJPEG on a "
                        "GPU; the workers only read shards and draw the crops; crop-and-flip recipes only)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in all (smoke runs; 0: "
                                                 "only initialise, evaluate and write the weights)")
    g.add_argument("--rendezvous-timeout", type=float, default=RENDEZVOUS_TIMEOUT_S, metavar="S",
                   help="seconds the ranks wait for each other at start (an unreachable MASTER_ADDR fails after this)")
    g.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    g = p.add_argument_group("evaluation, checkpoints, tracking")
    g.add_argument("--eval-all-masks", action="store_true", help="evaluate all 2^S masks after each epoch")
    g.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N steps (0: epochs only)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="DeepSpeed checkpoints kept on disk")
    g.add_argument("--log-every", type=int, default=20, help="log training metrics every N steps")
    g.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    g.add_argument("--experiment", default="adn-train", help="MLflow experiment name")
    g.add_argument("--run-name", help="MLflow run name (default: MODEL-MODE-NODESxRANKS, e.g. vit_b16-adn-8x8)")
    g.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    g.add_argument("--parent-run-id", help="make this MLflow run a child of that run (the studies group their "
                                          "trainings so)")
    g.add_argument("--verify-replicas", action="store_true",
                   help="after every step, hash each rank's weights into OUTPUT/replicas/rank<R>.jsonl and stop "
                        "with an error if ranks differ")
    return p.parse_args(argv)


@dataclass
class DistillConfig:
    """The self-distillation loss (docs/design.md, "The loss")."""

    alpha: float = 0.5
    temperature: float = 1.0
    kd_topk: int | None = None
    feature_kd: float = 0.0


@dataclass
class TrainConfig:
    """Everything one training reads; recipe-shaped sections (optimizer, schedule, data) stay mappings."""

    model: str
    recipe: str
    mode: str
    data_dir: str
    output: str
    epochs: int
    batch_size: int
    max_steps: int | None
    seed: int
    workers: int
    optimizer: dict[str, Any]
    lr_schedule: dict[str, Any]
    clip_grad_norm: float
    ema: bool
    ema_decay: float
    amp: bool
    model_kwargs: dict[str, Any]
    adn: DistillConfig
    data: dict[str, Any]
    zero_stage: int
    precision: str
    channels_last: bool | None
    eval_all_masks: bool
    save_every_steps: int
    keep_checkpoints: int
    log_every: int
    init_from: str | None
    # How this run is carried out (not recipe values).
    resume: str | None = None
    deepspeed_config: str | None = None
    decode: str = "workers"
    cpu: bool = False
    rendezvous_timeout: float = RENDEZVOUS_TIMEOUT_S
    tracking: bool = True
    tracking_uri: str | None = None
    experiment: str = "adn-train"
    run_name: str | None = None
    parent_run_id: str | None = None
    verify_replicas: bool = False

    def record(self, **decided: Any) -> dict[str, Any]:
        """The config as one mapping, plus what the run ``decided`` (precision, world size, nodes)."""
        return {**asdict(self), **decided}


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The recipe's values overridden by the flags that were given; every bad value is one sentence."""
    recipe_name = args.recipe or args.model
    if recipe_name is None:
        raise ValueError("pass --model or --recipe.")
    recipe = copy.deepcopy(load_recipe(recipe_name))
    model = args.model or recipe["model"]
    if model != recipe["model"] and args.recipe is None:
        raise ValueError(f"no recipe is named {model!r}; pass --recipe.")
    adn = DistillConfig(**{**recipe.get("adn", {})})
    for name in ("alpha", "temperature", "feature_kd"):
        if getattr(args, name) is not None:
            setattr(adn, name, getattr(args, name))
    if args.kd_topk is not None:
        adn.kd_topk = args.kd_topk or None
    optimizer = dict(recipe["optimizer"])
    if args.lr is not None:
        optimizer["lr"] = args.lr

    def given(flag: str, default: Any) -> Any:
        value = getattr(args, flag)
        return default if value is None else value

    config = TrainConfig(
        model=model, recipe=str(recipe_name), mode=args.mode, data_dir=parse_location(args.data).absolute(),
        output=str(Path(args.output or f"runs/{model}-{args.mode}").resolve()),
        epochs=given("epochs", recipe["epochs"]), batch_size=given("batch_size", recipe["batch_size"]),
        max_steps=args.max_steps, seed=args.seed, workers=args.workers, optimizer=optimizer,
        lr_schedule=dict(recipe.get("lr_schedule", {"name": "constant"})),
        clip_grad_norm=given("clip_grad", recipe.get("clip_grad_norm", 0.0)),
        ema=given("ema", bool(recipe.get("ema", False))), ema_decay=recipe.get("ema_decay", 0.9998),
        amp=bool(recipe.get("amp", False)), model_kwargs=dict(recipe.get("model_kwargs", {})), adn=adn,
        data=dict(recipe["data"]), zero_stage=args.zero_stage, precision=args.precision,
        channels_last=args.channels_last, eval_all_masks=args.eval_all_masks, save_every_steps=args.save_every_steps,
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every,
        init_from=args.init_from or recipe.get("init_from"), resume=args.resume,
        deepspeed_config=args.deepspeed_config, decode=args.decode, cpu=args.cpu,
        rendezvous_timeout=args.rendezvous_timeout,
        tracking=not args.no_tracking, tracking_uri=args.tracking_uri, experiment=args.experiment,
        run_name=args.run_name, parent_run_id=args.parent_run_id, verify_replicas=args.verify_replicas)
    validate(config, finetune=bool(recipe.get("finetune")), init_flag=args.init_from)
    return config


def validate(config: TrainConfig, finetune: bool = False, init_flag: str | None = None) -> None:
    """Values out of range and flags that contradict each other, one sentence each."""
    if init_flag and config.resume is not None:
        raise ValueError("--init-from starts a new run from other weights and --resume continues a run from its own; "
                         "pass one of them.")
    if finetune and not config.init_from:
        raise ValueError(f"recipe {config.recipe} fine-tunes trained weights (a short schedule at a low learning "
                         "rate); pass --init-from timm|PATH|mlflow:RUN_ID, or use the from-scratch recipe.")
    if config.max_steps is not None and config.max_steps < 0:
        raise ValueError(f"--max-steps must be 0 or more, got {config.max_steps}.")
    for name in ("epochs", "batch_size", "log_every", "keep_checkpoints"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}.")
    for flag, value in (("workers", config.workers), ("save-every-steps", config.save_every_steps),
                        ("clip-grad", config.clip_grad_norm), ("kd-topk", config.adn.kd_topk or 0),
                        ("feature-kd", config.adn.feature_kd)):
        if value < 0:
            raise ValueError(f"--{flag} must be 0 or more, got {value}.")
    for flag, value in (("lr", config.optimizer["lr"]), ("temperature", config.adn.temperature),
                        ("rendezvous-timeout", config.rendezvous_timeout)):
        if not value > 0:
            raise ValueError(f"--{flag} must be above 0, got {value}.")
    if not 0 <= config.adn.alpha <= 1:
        raise ValueError(f"--alpha weighs the super-net's CE against the KD and must be within 0 and 1, got "
                         f"{config.adn.alpha}.")
    if config.channels_last and config.zero_stage == 3:
        raise ValueError("--channels-last works with --zero-stage 0 to 2; ZeRO-3 gathers each weight for its forward "
                         "in the layout it was partitioned in.")
    if config.ema and config.zero_stage == 3:
        raise ValueError("--ema needs the full weights on every rank; use --zero-stage 0, 1 or 2 with it.")


@dataclass
class Preflight:
    """What the checks before a run found: the training classes, and the resolved ``--init-from`` source."""

    classes: list[str]
    init: InitSource | None


def preflight(config: TrainConfig, check_tracking: bool = True, notes: bool = True) -> Preflight:
    """Both manifests, the tracking server, the checkpoint ``--resume`` continues and the ``--init-from`` source,
    each one sentence when it cannot serve the run; shared by ``pipeline.train`` and ``pipeline.launch``."""
    classes = read_manifest(config.data_dir, "train").classes
    read_manifest(config.data_dir, "val")
    if check_tracking and config.tracking:
        check_reachable(resolve_tracking_uri(config.tracking_uri))
    if config.resume == "" and not (Path(config.output) / CHECKPOINTS).exists():
        raise FileNotFoundError(f"--resume: {config.output!r} holds no checkpoints; pass --output or a PATH.")
    if config.resume is not None:  # what --resume names is checked now, not after the engine's start-up
        with contextlib.suppress(NeverSaved):  # the run starts from scratch and says so
            find_checkpoint(config.resume or config.output)

    init = None
    if config.init_from and config.resume is None:  # every rank reads the weights itself (norm buffers too)
        from .init_from import resolve as resolve_init

        init = resolve_init(config.init_from, config.model, classes, config.tracking_uri, config.data,
                            config.model_kwargs)
    return Preflight(classes, init)
