"""The Ray Serve application: one deployment holds the ADN and picks a skip mask per batch to meet deadlines.

Requests are batched by ``@serve.batch``; each batch asks ``policy.choose`` for the mask (from the requests'
remaining slack and the latency this replica measured at start) and runs it. ``build`` is the application
builder that ``serve run`` config files and KubeRay's ``RayService`` name (``import_path: serving.app:build``).
"""


import asyncio
import concurrent.futures
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import metrics

from .deadline import BadInput, parse_deadline, request_start
from .model import ServedModel, locate
from .policy import Choice, DepthCap, choose, fastest_first
from .settings import ServeSettings

INLINE_DECODE_BYTES = 256 * 1024  # larger bodies are decoded off the event loop


@dataclass
class Pending:
    image: torch.Tensor
    arrival: float
    deadline: float  # time.perf_counter() seconds


@dataclass
class Outcome:
    mask: str
    batch_size: int
    queue_ms: float
    service_ms: float
    top: list[dict[str, Any]] | None = None
    shed: bool = False
    late: bool = False


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


api = FastAPI(title="Adaptive Depth Network", description="One ADN that picks its depth per batch to meet deadlines.")


@serve.deployment(name="ADN", health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5)
@serve.ingress(api)
class ADNServer:
    """Holds the ADN on this replica's device; batches requests and runs the mask the policy picks per batch."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = ServeSettings(**settings)
        torch.set_num_threads(self.settings.threads)
        weights, front = locate(self.settings.checkpoint, self.settings.pareto, self.settings.model_uri,
                                self.settings.target, self.settings.tracking_uri)
        self.served = ServedModel(weights, front, self.settings.target, self.settings.device,
                                  self.settings.mask if self.settings.policy == "fixed" else None)
        self.latency = self.served.measure_latency(self.settings.max_batch, self.settings.latency_budget_s)
        acc = {p.mask: p.acc1 for p in self.served.front}
        self.choices = fastest_first([(m, acc.get(m, 0.0)) for m in self.served.masks], self.latency)
        self._cap = DepthCap([self.latency(m, 1) for m, _ in self.choices], self.settings.calm_s,
                             self.settings.pressure, self.settings.speed_tolerance)
        self._forward = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="adn-forward")
        self._waiting: dict[int, float] = {}  # deadlines of the requests queued for a batch, by id(Pending)
        self._idle: asyncio.Event | None = None  # set while no batch runs (made in the replica's event loop)
        self._slowdown = 1.0  # observed / predicted service time, a moving average (contention, throttling)
        self._run_batch.set_max_batch_size(self.settings.max_batch)
        self._run_batch.set_batch_wait_timeout_s(self.settings.batch_wait_ms / 1e3)
        self._requests = metrics.Counter("adn_requests", "requests answered, per mask", tag_keys=("mask",))
        self._deadlines = metrics.Counter("adn_deadlines", "requests by outcome: met, missed, shed",
                                          tag_keys=("outcome",))
        self._queue = metrics.Histogram("adn_queue_ms", "time from arrival to the batch's start",
                                        boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000])
        self._batch = metrics.Histogram("adn_batch_size", "requests per batch run",
                                        boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self._allowed = metrics.Gauge("adn_masks_allowed", "front masks a batch may pick from, fastest first")
        print(f"replica ready: {self.served.name} on {self.settings.device}, policy {self.settings.policy}, "
              f"latency model (ms per batch): {self.latency.as_json()}", flush=True)

    @api.get("/v1/model")
    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "model": self.served.name, "classes": self.served.classes, "target": self.served.target,
            "resolution": self.served.resolution,
            "front": [asdict(p) for p in self.served.front],
            "latency_model": {"measured_on": s.device, "threads": s.threads, "ms_per_batch": self.latency.as_json(),
                              "slowdown_now": round(self._slowdown, 3)},
            "policy": {"name": s.policy, "mask": self.served.fixed_mask, "slo_ms": s.slo_ms, "on_late": s.on_late,
                       "max_batch": s.max_batch, "batch_wait_ms": s.batch_wait_ms, "margin_ms": s.margin_ms,
                       "calm_s": s.calm_s, "pressure": s.pressure, "speed_tolerance": s.speed_tolerance,
                       "masks_allowed_now": [m for m, _ in self.choices[:self._cap.allowed]]},
            "source": s.model_uri or s.checkpoint, "pid": os.getpid(),
        }

    @api.post("/v1/classify")
    async def classify(self, request: Request) -> JSONResponse:
        try:
            arrival = request_start(request.headers.get("x-request-start"), time.perf_counter(), time.time())
            deadline_ms = parse_deadline(request.headers.get("x-deadline-ms"), self.settings.slo_ms)
        except BadInput as err:
            return _error(400, str(err))
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return _error(413, f"the body holds {int(declared)} bytes, more than this server takes ({limit}).")
        body = await request.body()
        if not body:
            return _error(400, "the body is empty; send one JPEG or PNG image.")
        if len(body) > limit:
            return _error(413, f"the body holds {len(body)} bytes, more than this server takes ({limit}).")
        try:
            if len(body) <= INLINE_DECODE_BYTES:
                image = self.served.preprocess(body)
            else:
                image = await asyncio.get_running_loop().run_in_executor(None, self.served.preprocess, body)
        except BadInput as err:
            return _error(400, str(err))
        pending = Pending(image, arrival, arrival + deadline_ms / 1e3)
        self._waiting[id(pending)] = pending.deadline
        if self._idle is None:
            self._idle = asyncio.Event()
            self._idle.set()
        try:
            # @serve.batch forms a batch as soon as a request arrives, even while the model is busy: the requests
            # wait here instead, and all that came during a batch enter the next one together. A request alone at
            # an idle replica runs at once, without the batch queue's hop to its own task (unless told to wait
            # for company with --batch-wait-ms).
            while not self._idle.is_set():
                await self._idle.wait()
            if len(self._waiting) == 1 and not self.settings.batch_wait_ms:
                out: Outcome = (await self._run_now([pending]))[0]
            else:
                out = await self._run_batch(pending)
        finally:
            self._waiting.pop(id(pending), None)
        timing = {"mask": out.mask, "batch_size": out.batch_size, "queue_ms": round(out.queue_ms, 3),
                  "service_ms": round(out.service_ms, 3), "deadline_ms": deadline_ms}
        if out.shed:
            return _error(503, "the deadline cannot be met: even the fastest mask would answer too late.",
                          reason="deadline unreachable", fastest_ms=round(self.latency(self.choices[0][0], 1), 3),
                          **timing)
        return JSONResponse({"top5": out.top, "late": out.late, **timing})

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _run_batch(self, items: list[Pending]) -> list[Outcome]:
        return await self._run_now(items)

    async def _run_now(self, items: list[Pending]) -> list[Outcome]:
        self._idle.clear()
        try:
            return await self._decide_and_run(items)
        finally:
            self._idle.set()

    async def _decide_and_run(self, items: list[Pending]) -> list[Outcome]:
        start = time.perf_counter()
        for p in items:
            self._waiting.pop(id(p), None)
        margin = self.settings.margin_ms
        slack = [(p.deadline - start) * 1e3 - margin for p in items]
        queued = [(d - start) * 1e3 - margin for d in self._waiting.values()]
        choice: Choice = choose(slack, self.choices[:self._cap.allowed],
                                lambda m, b: self.latency(m, b) * self._slowdown, self.settings.on_late, queued,
                                self.settings.max_batch)
        tops: dict[int, list[dict[str, Any]]] = {}
        if choice.run:
            images = torch.stack([items[i].image for i in choice.run])
            probs = await asyncio.get_running_loop().run_in_executor(
                self._forward, self.served.probabilities, images, choice.mask)
            tops = dict(zip(choice.run, self.served.top(probs), strict=True))
        done = time.perf_counter()
        service_ms = (done - start) * 1e3 if choice.run else 0.0
        if choice.run:
            ratio = service_ms / self.latency(choice.mask, len(choice.run))
            self._slowdown = min(max(0.8 * self._slowdown + 0.2 * ratio, 0.5), 4.0)
        self._batch.observe(len(choice.run))
        shed, late = set(choice.shed), set(choice.late)
        answered_late = sum(done > items[i].deadline - margin / 1e3 for i in choice.run)
        trouble = self._cap.troubled([(start - p.arrival) * 1e3 for p in items],
                                     [(p.deadline - p.arrival) * 1e3 for p in items], len(shed), answered_late)
        self._allowed.set(self._cap.update(done, trouble))
        outcomes = []
        for i, p in enumerate(items):
            queue_ms = (start - p.arrival) * 1e3
            self._queue.observe(queue_ms)
            if i in shed:
                self._deadlines.inc(tags={"outcome": "shed"})
            else:
                self._requests.inc(tags={"mask": choice.mask})
                self._deadlines.inc(tags={"outcome": "met" if done <= p.deadline else "missed"})
            missed = i in late or (i not in shed and done > p.deadline)
            outcomes.append(Outcome(choice.mask, len(choice.run), queue_ms, service_ms, tops.get(i), i in shed, missed))
        return outcomes


def deployment(settings: ServeSettings) -> serve.Application:
    """The application for ``settings``: replicas, CPUs per replica, and in-flight requests per replica."""
    settings.check()
    options: dict[str, Any] = {"num_cpus": settings.threads}
    if settings.device.startswith("cuda"):
        options["num_gpus"] = 1
    return ADNServer.options(num_replicas=settings.replicas, ray_actor_options=options,
                             max_ongoing_requests=settings.max_ongoing).bind(asdict(settings))


def build(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``serve run`` and ``RayService`` (``import_path: serving.app:build``)."""
    known = set(ServeSettings.__dataclass_fields__)
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown serving args {unknown}; the known ones are {sorted(known)}.")
    return deployment(ServeSettings(**args))
