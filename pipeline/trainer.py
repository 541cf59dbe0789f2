"""The training engine: DeepSpeed, the loaders, the two-pass step, evaluation, checkpoints and MLflow for one rank.

``pipeline.train`` builds a ``Trainer`` from a resolved ``TrainConfig`` once its checks have passed.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from adn import SkipMask, create_model
from adn.checkpoint import WEIGHTS_NAME, save_weights
from adn.complexity import mask_costs
from adn.loss import DistillationConfig

from .checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    DiskFull,
    NeverSaved,
    disk_full,
    find_checkpoint,
    guard_loads,
    mark_complete,
    prune,
    rng_state,
    set_rng_state,
    size_of,
    step_tag,
    write_atomic,
)
from .config import TrainConfig
from .data import make_loader
from .data.storage import ShardReadError
from .distributed import setup_distributed
from .evaluate import Accuracy, evaluate
from .init_from import InitSource
from .init_from import build as build_from
from .optim import build_optimizer, build_scheduler
from .precision import WEIGHT_DTYPES, autocast, is_cnn, resolve_precision, use_channels_last
from .signals import Preempted, StopRequest, StopWaiting
from .step import TrainStep
from .tracking import Tracker

log = logging.getLogger("pipeline.train")


def deepspeed_config(cfg: TrainConfig, precision: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a run: one micro-batch per step (the two passes are not accumulation steps)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(cfg.clip_grad_norm or 0.0),
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # DeepSpeed's bf16/fp16 mode runs the whole network in that dtype: the norms' running statistics too.
        **({"data_types": {"buffer_dtype": precision}} if precision in ("bf16", "fp16") else {}),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.zero_stage == 3:
        # The two passes run different modules: no prefetching of parameters the next pass may not use.
        ds["zero_optimization"]["stage3_prefetch_bucket_size"] = 0
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    zero = ds["zero_optimization"]
    if cfg.mode == "adn" and zero.get("stage") == 1 and zero.get("overlap_comm"):
        # Measured (README, "Communication of an ADN step"): ZeRO-1 then reduces in the hooks of the boundary
        # backward only, so parameters the base-net does not use are never averaged across ranks.
        raise ValueError("overlap_comm with ZeRO stage 1 would leave the gradients of the blocks only the super-net "
                         "uses unaveraged across ranks in an ADN step; drop overlap_comm, or use ZeRO stage 2 with it.")
    return ds


@contextlib.contextmanager
def _full_weights(model: torch.nn.Module, zero_stage: int) -> Iterator[None]:
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield
    else:
        yield


def release(err: BaseException) -> None:
    """Drop the frames of a failed write: its open files keep the removed partial files' blocks in use, so the
    free space reported would not be what the disk has once the run ends."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        err.__traceback__ = None
        err = err.__cause__ or err.__context__
    gc.collect()


def _weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class Trainer:
    """Owns the engine, the loaders, the tracker and the loop; built once per process."""

    def __init__(self, cfg: TrainConfig, init: InitSource | None = None) -> None:
        self.cfg, self.init = cfg, init
        self.stop = StopRequest()  # first: a signal during start-up is kept for the first step, not fatal
        self.stop.install()
        use_cuda = torch.cuda.is_available() and not cfg.cpu
        if not use_cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.rank, self.world, local_rank = setup_distributed(use_cuda, cfg.rendezvous_timeout)
        self.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.precision = precision = resolve_precision(cfg.precision, use_cuda, cfg.amp)
        self.nodes = int(os.environ.get("CROSS_SIZE", 1))  # set by the DeepSpeed launcher
        self.dtype = WEIGHT_DTYPES[precision]  # what the images are cast to
        self.output = Path(cfg.output)
        self.ckpt_dir = self.output / CHECKPOINTS

        recipe = {"data": cfg.data}
        self.train_loader = make_loader(cfg.data_dir, "train", cfg.batch_size, recipe, rank=self.rank,
                                        world_size=self.world, num_workers=cfg.workers, seed=cfg.seed,
                                        device=self.device, decode=cfg.decode)
        self.val_loader = make_loader(cfg.data_dir, "val", cfg.batch_size, recipe, rank=self.rank,
                                      world_size=self.world, num_workers=cfg.workers, device=self.device,
                                      decode=cfg.decode)
        self.classes = self.train_loader.classes
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DeepSpeed also broadcasts rank 0's)
        if init is None:
            self.model = create_model(cfg.model, num_classes=len(self.classes), **cfg.model_kwargs)
        else:
            self.model, notes = build_from(init, cfg.model, len(self.classes), **cfg.model_kwargs)
            if self.rank == 0:
                log.info("initialised from %s%s", init.describe(), "".join(f"; {n}" for n in notes))
        self.channels_last = cfg.channels_last
        if self.channels_last is None:
            self.channels_last = use_cuda and is_cnn(self.model) and cfg.zero_stage < 3
        if self.channels_last and not is_cnn(self.model):
            raise ValueError(f"--channels-last applies to CNNs; {cfg.model} keeps its features channels-last already.")
        # What is printed, saved and logged: the config and what this run decided from it.
        self.record = cfg.record(precision=precision, channels_last=self.channels_last, world_size=self.world,
                                 nodes=self.nodes)
        self.loss = DistillationConfig(**asdict(cfg.adn), label_smoothing=cfg.data.get("label_smoothing", 0.0))
        self.step_fn = TrainStep(self.model, cfg.mode, self.loss, precision)
        self.eval_masks = (self.model.masks() if cfg.eval_all_masks else self.step_fn.train_masks)

        optimizer = build_optimizer(self.model, cfg.optimizer)
        scheduler = build_scheduler(optimizer, cfg.lr_schedule, cfg.epochs, self.steps_per_epoch,
                                    cfg.optimizer["lr"])
        extra = json.loads(Path(cfg.deepspeed_config).read_text()) if cfg.deepspeed_config else None
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer, lr_scheduler=scheduler,
                                                     config=deepspeed_config(cfg, precision, extra))
        guard_loads(self.engine)
        if self.channels_last and not use_channels_last(self.model) and self.rank == 0:
            log.info("channels-last: the activations only; DeepSpeed holds the weights in flat buffers (NCHW)")
        if cfg.mode == "adn" and cfg.zero_stage >= 2 and self.world > 1 and self.rank == 0:
            log.warning("ZeRO-%d reduces the gradients after each backward, so an ADN step reduces twice (the "
                        "super-net's, then the base-net's): about 1 + params(base)/params(super) times a vanilla "
                        "step's bytes. ZeRO-1 reduces once per step and partitions the optimizer state too.",
                        cfg.zero_stage)
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=True)
        self.tracker: Tracker | None = None
        self.step_time, self.steps_run = 0.0, 0  # the loop's own time (steps and their logging), this process
        self.step_cpu = 0.0  # CPU time of this process (all its threads, the tracker's sender too) over the steps
        self.history: dict[str, dict[str, Accuracy]] = {}
        self.epoch_log: list[dict[str, Any]] = []  # per evaluation: images seen, step time since the last one, top-1s
        self._step_time_logged = 0.0
        self.data_report: dict[str, int] = {}  # evaluated and skipped samples at the last evaluation
        self._bad_seen = {"train": 0, "val": 0}
        self.saved_step: int | None = None  # the step of the newest checkpoint this run wrote or resumed

    # -- state ---------------------------------------------------------------------------------
    def resume(self, path: Path) -> dict[str, Any]:
        found = find_checkpoint(path)
        directory, tag = found.directory, found.tag
        if self.rank == 0:
            print(found.describe(), file=sys.stderr, flush=True)
        loaded, client = self.engine.load_checkpoint(str(directory), tag=tag)
        self.saved_step = self.engine.global_steps
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed could not load checkpoint {tag!r} from {str(directory)!r}.")
        saved = client["config"]
        for key in ("model", "mode", "batch_size", "world_size", "epochs"):
            if saved[key] != self.record[key]:
                raise ValueError(f"the checkpoint was trained with {key}={saved[key]!r}, this run asks for "
                                 f"{self.record[key]!r}; resume with the same settings.")
        if self.ema is not None and client.get("ema") is not None:
            self.ema.module.load_state_dict(client["ema"])
        log.info("resumed from %s/%s at step %d", directory, tag, self.engine.global_steps)
        return client

    def save(self, epoch_done: bool) -> None:
        step = self.engine.global_steps
        run_id = self.tracker.run_id if self.tracker else None
        client = {"config": self.record, "rng": rng_state(), "mlflow_run_id": run_id,
                  "ema": self.ema.module.state_dict() if self.ema is not None else None,
                  "epoch_log": self.epoch_log,
                  "history": {k: {m: vars(a) for m, a in v.items()} for k, v in self.history.items()}}
        tag = step_tag(step)
        try:
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False)
        except Exception as err:
            try:  # the last complete checkpoint is the best guess of a checkpoint's size
                need, estimated = size_of(self.ckpt_dir / find_checkpoint(self.ckpt_dir).tag), False
            except (CheckpointError, FileNotFoundError):  # weights and two AdamW moments
                need, estimated = 3 * sum(p.numel() * p.element_size() for p in self.model.parameters()), True
            if not disk_full(err, self.ckpt_dir, need):
                raise
            shutil.rmtree(self.ckpt_dir / tag, ignore_errors=True)  # the partial files would keep the disk full
            release(err)
            raise DiskFull(self.ckpt_dir, f"checkpoint {tag}", need, estimated) from err
        torch.distributed.barrier()  # every rank's files are written
        self.saved_step = step
        if self.rank == 0:
            mark_complete(self.ckpt_dir, tag, step)
            prune(self.ckpt_dir, self.cfg.keep_checkpoints)
            if epoch_done or step == self.total_steps:
                try:
                    self.save_weights()
                except Exception as err:
                    need = sum(v.numel() * v.element_size() for v in self.model.state_dict().values())
                    need *= 2 if self.ema is not None else 1
                    if not disk_full(err, self.output, need):
                        raise
                    release(err)
                    raise DiskFull(self.output, WEIGHTS_NAME, need, True) from err
        torch.distributed.barrier()

    def save_weights(self) -> Path:
        meta = {"model_name": self.cfg.model, "classes": self.classes,
                "resolution": int(self.cfg.data["val_crop"]), "recipe": self.record,
                "step": self.engine.global_steps, "mode": self.cfg.mode}
        with _full_weights(self.model, self.cfg.zero_stage):
            path = save_weights(self.model, self.output / WEIGHTS_NAME, **meta)
        if self.ema is not None:
            save_weights(self.ema.module, self.output / "weights_ema.safetensors", **meta)
        return path

    # -- loop ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Accuracy]:
        cfg, rank0 = self.cfg, self.rank == 0
        client: dict[str, Any] = {}
        if cfg.resume is not None:
            try:
                client = self.resume(Path(cfg.resume or self.output))
            except NeverSaved as err:  # killed in its first save: there is nothing to continue
                if rank0:
                    print(f"{err}; starting from scratch.", file=sys.stderr, flush=True)
            self.history = {k: {m: Accuracy(**a) for m, a in v.items()} for k, v in client.get("history", {}).items()}
            self.epoch_log = list(client.get("epoch_log", []))
        if rank0:
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / "config.yaml").write_text(yaml.safe_dump(self.record, sort_keys=False))
            print(yaml.safe_dump({"resolved config": self.record}, sort_keys=False), flush=True)
        layout = f"{self.nodes}x{self.world // self.nodes}"  # nodes x ranks per node
        run_name = cfg.run_name or f"{cfg.model}-{cfg.mode}-{layout}"
        self.tracker = Tracker(cfg.tracking_uri, cfg.experiment, run_name,
                               enabled=rank0 and cfg.tracking, run_id=client.get("mlflow_run_id"),
                               tags={"adn.model": cfg.model, "adn.mode": cfg.mode, "adn.output": str(self.output),
                                     "mlflow.note.content": f"{cfg.model} ({cfg.mode}) trained on "
                                                            f"{self.world} ranks, output {self.output}",
                                     **({"mlflow.parentRunId": cfg.parent_run_id} if cfg.parent_run_id else {})})
        if rank0 and self.tracker.enabled:
            if not client:
                import deepspeed
                import timm

                self.tracker.log_params({**self.record, "versions": {"torch": torch.__version__, "deepspeed":
                                         deepspeed.__version__, "timm": timm.__version__}})
            write_atomic(self.output / "run.json", json.dumps(  # tests and tools poll for it
                {"mlflow_run_id": self.tracker.run_id, "tracking_uri": self.tracker.uri,
                 "experiment": cfg.experiment}, indent=1))
            self.tracker.log_artifact(self.output / "config.yaml")
        torch.distributed.barrier()

        step = self.engine.global_steps
        if not client and (self.init is not None or self.total_steps == 0):
            self.evaluate_at(0, 0)  # where a fine-tune starts: the super-net is the network it was given
            if self.total_steps == 0 and rank0:
                self.save_weights()
        replicas = None
        if cfg.verify_replicas:
            (self.output / "replicas").mkdir(parents=True, exist_ok=True)
            replicas = open(self.output / "replicas" / f"rank{self.rank}.jsonl", "a")  # noqa: SIM115
        try:
            while step < self.total_steps:
                epoch, start = divmod(step, self.steps_per_epoch)
                step = self.train_epoch(epoch, start, client.get("rng"), replicas)  # resumed: same RNG as then
                client = {}
                if step % self.steps_per_epoch == 0 or step == self.total_steps:
                    self.end_epoch(epoch, step)  # evaluates and checkpoints
                    if step < self.total_steps and (signum := self._stop_signal()):
                        raise Preempted(signum, step, step_tag(step))
        except BaseException as err:
            self.tracker.finish("FAILED" if isinstance(err, Exception) and not isinstance(err, Preempted)
                                else "KILLED")
            raise
        finally:
            if replicas is not None:
                replicas.close()
            for loader in (self.train_loader, self.val_loader):
                loader.close()
        return self.finish()

    def train_epoch(self, epoch: int, start: int, rng: dict[str, Any] | None, replicas: Any) -> int:
        cfg, rank0 = self.cfg, self.rank == 0
        self.train_loader.set_epoch(epoch)
        self.model.train()
        stop = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)
        batches = self.train_loader.iterate(start)
        if rng is not None:
            set_rng_state(rng)  # after the replayed batches: the next one is drawn as in the original run
        with tqdm(total=stop, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not rank0,
                  unit="step", dynamic_ncols=True) as bar:  # closed before an error is printed
            window: dict[str, float] = {}
            window_steps, window_start = 0, time.perf_counter()
            step = epoch * self.steps_per_epoch + start
            for _ in range(start, stop):
                batch = self._next_batch(batches, step)
                step_start, cpu_start = time.perf_counter(), time.process_time()
                losses = self.step_fn(self.engine, self.inputs(batch.images), batch.labels)
                if self.ema is not None:
                    self.ema.update(self.model, step=step)
                step += 1
                for k, v in losses.items():
                    window[k] = window.get(k, 0.0) + float(v)
                window_steps += 1
                if replicas is not None:
                    self._verify_replicas(replicas, step)
                if step % cfg.log_every == 0 or step == epoch * self.steps_per_epoch + stop:
                    elapsed = time.perf_counter() - window_start
                    metrics = {k: v / window_steps for k, v in window.items()
                               if k != "loss_feat" or self.loss.feature_kd}
                    metrics["lr"] = self.engine.get_lr()[0]
                    metrics["images_per_s"] = window_steps * cfg.batch_size * self.world / max(elapsed, 1e-9)
                    self.tracker.log_metrics(metrics, step)
                    bar.set_postfix(loss_ce=f"{metrics['loss_ce']:.3f}", loss_kd=f"{metrics['loss_kd']:.3g}",
                                    img_s=f"{metrics['images_per_s']:.0f}", refresh=False)
                    window, window_steps, window_start = {}, 0, time.perf_counter()
                self.step_time += time.perf_counter() - step_start
                self.step_cpu += time.process_time() - cpu_start
                self.steps_run += 1
                bar.update(1)
                saved = cfg.save_every_steps and step % cfg.save_every_steps == 0
                if saved and step % self.steps_per_epoch:
                    self.save(epoch_done=False)
                # Mid-epoch only (an epoch's last step is evaluated and checkpointed first, in run()).
                if step % self.steps_per_epoch and step != self.total_steps and (signum := self._stop_signal()):
                    if not saved:
                        self.save(epoch_done=False)
                    raise Preempted(signum, step, step_tag(step))
        return step

    def _next_batch(self, batches: Iterator[Any], step: int) -> Any:
        """The next training batch. In a one-rank run a stop signal while it is awaited, or a shard that
        cannot be read, ends the run with a checkpoint at ``step``; with several ranks a rank cannot save
        alone (the others wait in the step's collectives), so there the run stops at a step's end."""
        if self.world > 1:
            return next(batches)
        try:
            with self.stop.waiting():
                return next(batches)
        except StopWaiting as err:
            self._checkpoint(step)
            raise Preempted(err.signum, step, step_tag(step)) from None
        except ShardReadError as err:
            self._checkpoint(step)
            raise ShardReadError(f"{err} Checkpoint {step_tag(step)} is complete: resume with --resume once the "
                                 "storage answers.") from None

    def _checkpoint(self, step: int) -> None:
        if self.saved_step != step:
            self.save(epoch_done=False)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of images as the network takes them: the weights' dtype, channels-last where the run is."""
        return images.to(self.dtype, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)

    def _evaluate(self, model: torch.nn.Module, masks: list, progress: bool = False) -> dict[str, Accuracy]:
        batches = ((self.inputs(b.images), b.labels) for b in self.val_loader)
        with autocast(self.precision, self.device):
            return evaluate(model, batches, masks, device=self.device, total=len(self.val_loader),
                            progress=progress, desc="validate")

    def _stop_signal(self) -> int:
        """The stop signal any rank received (0: none); every rank calls it at the same steps, so all stop at
        the same step even when the signal reached them a step apart."""
        if self.world == 1:
            return self.stop.signum
        flag = torch.tensor([self.stop.signum], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def _verify_replicas(self, out: Any, step: int) -> None:
        with _full_weights(self.model, self.cfg.zero_stage):
            digest = _weights_hash(self.model)
        out.write(json.dumps({"step": step, "sha256": digest}) + "\n")
        out.flush()
        gathered: list[str | None] = [None] * self.world
        torch.distributed.all_gather_object(gathered, digest)
        if len(set(gathered)) != 1:
            raise RuntimeError(f"ranks hold different weights after step {step}: {gathered}")

    def end_epoch(self, epoch: int, step: int) -> None:
        self.evaluate_at(epoch + 1, step)
        self.save(epoch_done=True)

    def evaluate_at(self, epoch: int, step: int) -> None:
        """Validate after ``epoch`` epochs (0: the initial weights), log it and keep it for the summary."""
        results = self._evaluate(self.model, self.eval_masks, progress=self.rank == 0)
        bad = self._bad_samples()  # this epoch's, before the EMA's pass reads the val split again
        metrics = {}
        for mask, acc in results.items():
            metrics[f"val_acc1_{mask}"] = acc.acc1
            metrics[f"val_acc5_{mask}"] = acc.acc5
        if self.ema is not None:
            for mask, acc in self._evaluate(self.ema.module, self.step_fn.train_masks).items():
                metrics[f"val_ema_acc1_{mask}"] = acc.acc1
                metrics[f"val_ema_acc5_{mask}"] = acc.acc5
            self._bad_samples()
        evaluated, listed = next(iter(results.values())).samples, self.val_loader.manifest.num_samples
        images = step * self.cfg.batch_size * self.world
        metrics.update(epoch=epoch, val_samples=evaluated, bad_samples_train=bad["train"],
                       bad_samples_val=bad["val"], images_seen=images)
        self.tracker.log_metrics(metrics, step)
        self.history[f"epoch{epoch}"] = results
        self.epoch_log.append({"epoch": epoch, "step": step, "images": images,
                               "step_s": self.step_time - self._step_time_logged,
                               "acc1": {m: a.acc1 for m, a in results.items()}})
        self._step_time_logged = self.step_time
        self.data_report = {"val_samples": evaluated, "val_manifest_samples": listed,
                            "bad_samples_train": bad["train"], "bad_samples_val": bad["val"]}
        if self.rank == 0:
            line = ", ".join(f"{m} {a.acc1:.2%}" for m, a in results.items())
            when = f"epoch {epoch}" if epoch else f"before any step ({self.init.describe() if self.init else 'random'})"
            tqdm.write(f"{when}: top-1 {line} on {evaluated} of {listed} val images"
                       + (f" ({bad['val']} unreadable, skipped)" if bad["val"] else "")
                       + (f"; {bad['train']} training images unreadable this epoch" if bad["train"] else ""))

    def _bad_samples(self) -> dict[str, int]:
        """Samples skipped as unreadable since the last call, over every rank and loader worker."""
        totals = torch.tensor([self.train_loader.bad_samples, self.val_loader.bad_samples], device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(totals)
        new = {"train": int(totals[0]) - self._bad_seen["train"], "val": int(totals[1]) - self._bad_seen["val"]}
        self._bad_seen = {"train": int(totals[0]), "val": int(totals[1])}
        return new

    def finish(self) -> dict[str, Accuracy]:
        last = self.history[max(self.history, key=lambda k: int(k.removeprefix("epoch")))] if self.history else {}
        if self.rank == 0:
            resolution = int(self.cfg.data["val_crop"])
            costs = mask_costs(self.model, resolution, masks=[SkipMask.parse(m, self.model.num_stages)
                                                             for m in last] or None)
            rows = [{"mask": str(c.mask), "acc1": last[str(c.mask)].acc1 if str(c.mask) in last else None,
                     "acc5": last[str(c.mask)].acc5 if str(c.mask) in last else None,
                     "gflops": c.gflops, "params_m": c.params_m} for c in costs]
            summary = {"model": self.cfg.model, "mode": self.cfg.mode, "steps": self.engine.global_steps,
                       "init_from": self.cfg.init_from, "resolution": resolution, "masks": rows,
                       "evaluations": self.epoch_log, "data": self.data_report,
                       "timing": {"steps_run": self.steps_run, "step_s": self.step_time, "step_cpu_s": self.step_cpu,
                                  "tracking_sender_cpu_s": self.tracker.sender_cpu_s,
                                  "steps_per_s": self.steps_run / self.step_time if self.step_time else None}}
            (self.output / "summary.json").write_text(json.dumps(summary, indent=1))
            for name in ("summary.json", WEIGHTS_NAME, "weights_ema.safetensors"):
                if (self.output / name).is_file():
                    self.tracker.log_artifact(self.output / name)
            self.tracker.finish()
            if self.tracker.dropped:
                print(f"MLflow: {self.tracker.dropped} values or calls could not be sent (the warnings above say "
                      "which); the files in the output directory are complete.")
            print(f"\n{'mask':<10}{'top-1':>8}{'top-5':>8}{'GFLOPs':>10}{'params M':>10}")
            for r in rows:
                acc1 = f"{r['acc1']:.2%}" if r["acc1"] is not None else "-"
                acc5 = f"{r['acc5']:.2%}" if r["acc5"] is not None else "-"
                print(f"{r['mask']:<10}{acc1:>8}{acc5:>8}{r['gflops']:>10.4f}{r['params_m']:>10.3f}")
            trained = [str(m) for m in self.step_fn.train_masks if str(m) in last]
            names = {str(self.step_fn.super_mask): "super-net", str(self.step_fn.base_mask): "base-net"}
            print("top-1: " + ", ".join(f"{names[m]} {m} {last[m].acc1:.2%}" for m in trained))
            print(f"weights: {self.output / WEIGHTS_NAME}")
            if self.tracker.enabled:
                print(f"MLflow run {self.tracker.run_id}: {self.tracker.where()}")
        return last
