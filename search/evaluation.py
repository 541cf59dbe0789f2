"""Evaluation workers: each pass over a split is cut into sample ranges, one per worker, and summed exactly.

``start_eval_workers`` places one ``EvalWorker`` actor per GPU of the Ray cluster (else one per node),
spread over the nodes, each holding the model on its device for the whole search. ``run_pass``
hands every worker the same masks; each streams its contiguous range of the split (the validation
loader's exact cut) and returns integer hit counts, which add up to what one process would count.
Only ``EvalWorker`` itself loads torch: a Tune trial that calls ``run_pass`` stays light.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.data import DataError

from .counts import PassResult


def load_shipped(blob: bytes, device: str) -> tuple[Any, dict[str, Any]]:
    """The model from the weights the driver shipped through Ray's object store; the file it passes through
    on this node is removed once loaded."""
    from adn.checkpoint import load_trained

    with tempfile.TemporaryDirectory(prefix="adn-weights-") as tmp:
        path = Path(tmp) / "weights.safetensors"
        path.write_bytes(blob)
        return load_trained(path, map_location=device)


class EvalWorker:
    """One part of every pass: the model on this worker's device, streaming sample range ``rank`` of ``world_size``."""

    def __init__(self, weights: bytes, data: str, batch_size: int, rank: int, world_size: int, *,
                 max_samples: int | None = None, loader_workers: int = 0, threads: int | None = None,
                 calibrate_images: int | None = None) -> None:
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu" and threads:
            torch.set_num_threads(threads)
        self.model, meta = load_shipped(weights, self.device)
        self.recipe = meta["recipe"]
        self.data, self.batch_size, self.rank, self.world_size = data, batch_size, rank, world_size
        self.max_samples, self.loader_workers = max_samples, loader_workers
        self.calibrate_images = calibrate_images

    def node(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def run(self, split: str, masks: list[str]) -> PassResult:
        from .accuracy import evaluate_split

        result = evaluate_split(self.model, self.data, split, self.recipe, masks, batch_size=self.batch_size,
                                rank=self.rank, world_size=self.world_size, max_samples=self.max_samples,
                                num_workers=self.loader_workers, device=self.device,
                                calibrate_images=self.calibrate_images)
        result.workers[-1]["node"] = self.node()
        return result


def start_eval_workers(weights: Path, data: str, batch_size: int, max_samples: int | None,
                       eval_workers: int | None, loader_workers: int | None,
                       calibrate_images: int | None = None) -> list[Any]:
    """One worker per GPU of the cluster (else one per node), spread over the nodes, models loaded."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = eval_workers or gpus or len(nodes)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if gpus and count > gpus:
        raise ValueError(f"--eval-workers {count} is more than the cluster's {gpus} GPUs.")
    if not gpus and count > cpus:
        raise ValueError(f"--eval-workers {count} is more than the cluster's {cpus} CPUs (one each).")
    node_cpus = min(int(n["Resources"].get("CPU", 1)) for n in nodes)
    per_node = -(-count // len(nodes))
    threads = max(1, node_cpus // per_node)
    if loader_workers is None:  # decoding keeps a GPU busy only with several processes; on CPU it shares the cores
        loader_workers = min(8, max(1, node_cpus // per_node - 1)) if gpus else 0
    blob = ray.put(Path(weights).read_bytes())
    remote = ray.remote(EvalWorker)
    workers = [remote.options(num_cpus=1, num_gpus=1 if gpus else 0, scheduling_strategy="SPREAD").remote(
        blob, data, batch_size, rank, count, max_samples=max_samples, loader_workers=loader_workers,
        threads=threads, calibrate_images=calibrate_images) for rank in range(count)]
    try:
        ray.get([w.node.remote() for w in workers])  # a model that does not load fails here, before any trial
    except Exception as err:  # noqa: BLE001 - Ray wraps the worker's exception; keep its last line
        raise RuntimeError(f"the evaluation workers could not start: {str(err).strip().splitlines()[-1]}") from err
    return workers


def shard_error(err: BaseException) -> DataError | None:
    """The unreadable shard behind a Ray or Ray Tune error (a worker's traceback, a failed trial), as the one
    sentence training gives; None when the error is something else."""
    seen, texts = set(), []
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        texts.append(str(err))
        err = err.__cause__ or err.__context__
    found = re.findall(r"ShardReadError: (.+)", "\n".join(texts))
    return DataError(found[-1].strip()) if found else None


def run_pass(workers: list[Any], split: str, masks: list[str]) -> tuple[PassResult, dict[str, Any]]:
    """One pass over ``split`` for ``masks``, cut over ``workers``: the summed counts and what the pass cost."""
    import ray

    start = time.perf_counter()
    try:
        parts = ray.get([w.run.remote(split, masks) for w in workers])
    except Exception as err:
        found = shard_error(err)
        if found is None:
            raise
        raise found from None
    total = parts[0]
    for part in parts[1:]:
        total = total.merge(part)
    return total, {"split": split, **total.stats(time.perf_counter() - start)}
