"""Open-loop HTTP load for the classify endpoint: arrival times fixed in advance, so a slow server cannot slow
the client down (a closed loop would wait for answers and hide overload), and the figures the serving
literature reports: deadline attainment and effective accuracy (answered correctly within the deadline / sent)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Answer:
    """One request as the client saw it; latency runs from its scheduled send time, ``send_late_ms`` after which
    the client's event loop actually sent it."""

    at_s: float
    latency_ms: float
    status: int  # 0: no answer (timeout or connection error)
    label: int
    deadline_ms: float
    mask: str = ""
    batch_size: int = 0
    queue_ms: float = 0.0
    service_ms: float = 0.0
    predicted: int = -1
    send_late_ms: float = 0.0

    @property
    def in_time(self) -> bool:
        return self.status == 200 and self.latency_ms <= self.deadline_ms

    @property
    def correct_in_time(self) -> bool:
        return self.in_time and self.predicted == self.label


def poisson(rate: float, duration_s: float, rng: np.random.Generator, start_s: float = 0.0) -> list[float]:
    """Arrival times of a Poisson process at ``rate`` per second over ``duration_s``."""
    return gamma(rate, 1.0, duration_s, rng, start_s)


def gamma(rate: float, cv2: float, duration_s: float, rng: np.random.Generator, start_s: float = 0.0) -> list[float]:
    """Arrivals with gamma-distributed gaps of mean ``1/rate`` and squared coefficient of variation ``cv2``
    (1: Poisson; 8: the bursty traces of the serving literature)."""
    shape = 1.0 / cv2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=int(rate * duration_s * 3) + 16)
    times = start_s + np.cumsum(gaps)
    return [float(t) for t in times[times < start_s + duration_s]]


def phases(rates: Sequence[tuple[float, float]], rng: np.random.Generator) -> list[float]:
    """Poisson arrivals through consecutive (rate per second, seconds) phases."""
    out, start = [], 0.0
    for rate, seconds in rates:
        out += poisson(rate, seconds, rng, start)
        start += seconds
    return out


def by_rate(answers: Sequence[Answer], rates: Sequence[tuple[float, float]]) -> dict[float, tuple[list[Answer], float]]:
    """The answers of a ``phases`` replay grouped by the rate of the phase each was sent in: for each rate, its
    answers and the seconds its phases lasted together."""
    groups: dict[float, tuple[list[Answer], float]] = {}
    bounds = np.cumsum([seconds for _, seconds in rates])
    for rate, seconds in rates:
        got, total = groups.get(rate, ([], 0.0))
        groups[rate] = (got, total + seconds)
    for a in answers:
        k = min(int(np.searchsorted(bounds, a.at_s, side="right")), len(rates) - 1)
        groups[rates[k][0]][0].append(a)
    return groups


async def _replay(url: str, arrivals: Sequence[float], bodies: Sequence[bytes], labels: Sequence[int],
                  deadline_ms: float, timeout_s: float, max_in_flight: int) -> list[Answer]:
    import aiohttp

    answers: list[Answer | None] = [None] * len(arrivals)
    connector = aiohttp.TCPConnector(limit=max_in_flight, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter() + 0.05

        async def one(i: int) -> None:
            scheduled = start + arrivals[i]
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            body, label = bodies[i % len(bodies)], labels[i % len(labels)]
            late_s = time.perf_counter() - scheduled
            answer = Answer(arrivals[i], 0.0, 0, label, deadline_ms, send_late_ms=late_s * 1e3)
            # The deadline counts from the scheduled send time (X-Request-Start), as an open-loop client's does.
            headers = {"X-Deadline-Ms": f"{deadline_ms:g}", "X-Request-Start": f"t={time.time() - late_s:.6f}"}
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    answer.status = r.status
                    data = await r.json(content_type=None)
                answer.mask = data.get("mask", "")
                answer.batch_size = int(data.get("batch_size", 0))
                answer.queue_ms = float(data.get("queue_ms", 0.0))
                answer.service_ms = float(data.get("service_ms", 0.0))
                if r.status == 200:
                    answer.predicted = int(data["top5"][0]["class"])
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                answer.status = answer.status if answer.status != 200 else 0
            answer.latency_ms = (time.perf_counter() - scheduled) * 1e3
            answers[i] = answer

        await asyncio.gather(*(one(i) for i in range(len(arrivals))))
    return [a for a in answers if a is not None]


def replay(url: str, arrivals: Sequence[float], bodies: Sequence[bytes], labels: Sequence[int], deadline_ms: float,
           *, timeout_s: float = 30.0, max_in_flight: int = 512) -> list[Answer]:
    """POST ``bodies`` (cycled) to ``url`` at ``arrivals`` seconds from now, each with ``deadline_ms``."""
    return asyncio.run(_replay(url, arrivals, bodies, labels, deadline_ms, timeout_s, max_in_flight))


def summarize(answers: Sequence[Answer], duration_s: float | None = None,
              mask_accuracy: Mapping[str, float] | None = None) -> dict:
    """Attainment, effective accuracy, latency percentiles, throughput and the mix of masks of a replay.

    With ``mask_accuracy`` (each mask's top-1 over the image pool the requests are drawn from), also the expected
    effective accuracy: every answer in time scores its mask's accuracy instead of its own image's 0 or 1, which
    keeps the policy's choices and removes the noise of which images a short run happened to send."""
    sent = len(answers)
    if sent == 0:
        return {"sent": 0}
    ok = [a for a in answers if a.status == 200]
    expected = ({"expected_accuracy": sum(mask_accuracy[a.mask] for a in answers if a.in_time) / sent}
                if mask_accuracy is not None else {})
    latencies = sorted(a.latency_ms for a in ok) or [float("nan")]
    span = duration_s or (max(a.at_s for a in answers) - min(a.at_s for a in answers)) or 1.0
    masks = Counter(a.mask for a in ok)
    return {
        "sent": sent,
        "answered": len(ok),
        "shed": sum(a.status == 503 for a in answers),
        "failed": sum(a.status not in (200, 503) for a in answers),
        "attainment": sum(a.in_time for a in answers) / sent,
        "effective_accuracy": sum(a.correct_in_time for a in answers) / sent,
        "accuracy_answered": sum(a.predicted == a.label for a in ok) / max(len(ok), 1),
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "throughput": sum(a.in_time for a in answers) / span,
        "masks": {m: c / max(len(ok), 1) for m, c in sorted(masks.items())},
        "mean_batch": statistics.fmean(a.batch_size for a in ok) if ok else 0.0,
        **expected,
    }
