"""Which skip mask a batch runs, from the slack of its requests and each mask's latency per batch size.

``choose`` is a pure function and ``DepthCap`` a small state machine over its input (which masks a batch may pick
from), so both are tested on their own; the Ray Serve deployment only wires them to requests.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

ON_LATE = ("shed", "serve")


class LatencyModel:
    """Milliseconds to run a batch under each mask, measured at a few batch sizes, linear between them.

    Past the largest measured size, time grows in proportion to the batch (no batching gain assumed). A larger
    batch never takes less time than a smaller one: a measured dip (noise, a faster kernel) is raised to the
    largest time measured at a smaller size, so that the policy never counts on it.
    """

    def __init__(self, table: Mapping[str, Mapping[int, float]]) -> None:
        if not table:
            raise ValueError("the latency model needs at least one mask.")
        self.table: dict[str, dict[int, float]] = {}
        for mask, row in table.items():
            measured = sorted((int(b), float(ms)) for b, ms in row.items())
            if not measured or measured[0][0] < 1:
                raise ValueError(f"the latency of mask {mask} needs batch sizes of 1 or more, got {dict(measured)}.")
            envelope, top = {}, 0.0
            for b, ms in measured:
                top = max(top, ms)
                envelope[b] = top
            self.table[mask] = envelope

    def __call__(self, mask: str, batch_size: int) -> float:
        row = self.table[mask]
        sizes = list(row)
        i = bisect.bisect_left(sizes, batch_size)
        if i < len(sizes) and sizes[i] == batch_size:
            return row[batch_size]
        if i == 0:
            return row[sizes[0]] * batch_size / sizes[0]
        if i == len(sizes):
            return row[sizes[-1]] * batch_size / sizes[-1]
        lo, hi = sizes[i - 1], sizes[i]
        return row[lo] + (row[hi] - row[lo]) * (batch_size - lo) / (hi - lo)

    def as_json(self) -> dict[str, dict[str, float]]:
        return {mask: {str(b): round(ms, 4) for b, ms in row.items()} for mask, row in self.table.items()}


@dataclass(frozen=True)
class Choice:
    """What one batch does: the mask it runs, and which of its requests run, are shed, or run knowing they are late."""

    mask: str
    run: list[int] = field(default_factory=list)
    shed: list[int] = field(default_factory=list)
    late: list[int] = field(default_factory=list)
    predicted_ms: float = 0.0


Latency = Callable[[str, int], float]  # (mask, batch size) -> ms: a LatencyModel, possibly scaled


class DepthCap:
    """Feedback over the per-batch choice: the slowest mask, by its time for a batch of one, a batch may pick from.

    The per-batch choice sees only the requests that reached the replica; queueing before it (the proxy, the
    network, CPU shared with them) shows up as trouble: a request shed, one answered after its deadline, or one
    that waited more than ``pressure`` of its deadline before its batch started. After trouble the time limit
    falls halfway to the fastest mask's time, but never below ``tolerance`` above it: masks that close to the
    fastest serve about as many requests, so cutting them would cost accuracy for no speed. After ``calm_s``
    seconds without trouble the next slower mask comes back.
    """

    def __init__(self, times_ms: Sequence[float], calm_s: float = 0.5, pressure: float = 0.5,
                 tolerance: float = 0.1) -> None:
        if not times_ms:
            raise ValueError("the depth cap needs at least one mask.")
        if list(times_ms) != sorted(times_ms):
            raise ValueError(f"the depth cap takes the masks' times fastest first, got {list(times_ms)}.")
        self.times = [float(t) for t in times_ms]
        self.calm_s, self.pressure = calm_s, pressure
        self.floor_ms = self.times[0] * (1 + tolerance)
        self.limit_ms = self.times[-1]
        self._since = -math.inf

    @property
    def allowed(self) -> int:
        """How many masks, fastest first, a batch may pick from now."""
        return bisect.bisect_right(self.times, self.limit_ms)

    def update(self, now_s: float, trouble: bool) -> int:
        """The number of masks allowed after a batch that ended at ``now_s`` (seconds) with or without trouble."""
        if trouble:
            self.limit_ms = max(self.floor_ms, (self.times[0] + self.limit_ms) / 2)
            self._since = now_s
        elif self.allowed < len(self.times) and now_s - self._since >= self.calm_s:
            self.limit_ms = self.times[self.allowed]
            self._since = now_s
        return self.allowed

    def troubled(self, waited_ms: Sequence[float], budget_ms: Sequence[float], shed: int, missed: int) -> bool:
        """Whether a batch had trouble: a shed or missed request, or one that waited more than ``pressure`` of its
        deadline (``waited_ms[i]`` of ``budget_ms[i]``) before the batch started."""
        return shed > 0 or missed > 0 or any(w > self.pressure * b for w, b in zip(waited_ms, budget_ms, strict=True))


def fastest_first(front: Sequence[tuple[str, float]], latency: Latency) -> list[tuple[str, float]]:
    """The front ordered by the time of a batch of one, fastest first (ties: the more accurate first)."""
    return sorted(front, key=lambda p: (latency(p[0], 1), -p[1]))


def _queue_ok(first_ms: float, waiting_ms: Sequence[float], latency: Latency, fastest: str,
              max_batch: int) -> list[bool]:
    """For the queued requests in deadline order, batched by ``max_batch`` and run with the fastest mask after a
    batch of ``first_ms``: whether each chunk still meets its tightest deadline."""
    ordered = sorted(waiting_ms)
    t, ok = first_ms, []
    for i in range(0, len(ordered), max_batch):
        chunk = ordered[i:i + max_batch]
        t += latency(fastest, len(chunk))
        ok.append(t <= chunk[0])
    return ok


def choose(slack_ms: Sequence[float], front: Sequence[tuple[str, float]], latency: Latency,
           on_late: str = "shed", waiting_ms: Sequence[float] = (), max_batch: int = 16) -> Choice:
    """The most accurate mask of ``front`` ((mask, accuracy) pairs) whose predicted time for the batch fits the
    tightest slack among the requests that can still meet their deadline, and that leaves the requests queued
    behind the batch (``waiting_ms``: their slack) every deadline the fastest mask would have left them.

    A request is unreachable when even the fastest mask cannot answer it in time in this batch: with
    ``on_late="shed"`` the batch drops the fewest requests (those with the least slack) that let the others make
    it, and those are shed; with ``"serve"`` every request runs and the unreachable ones are marked late. A
    one-mask front is the fixed baseline: the same shedding, no choice of depth.
    """
    if on_late not in ON_LATE:
        raise ValueError(f"on_late must be one of {', '.join(ON_LATE)}, got {on_late!r}.")
    if not front:
        raise ValueError("the front is empty.")
    n = len(slack_ms)
    if n == 0:
        raise ValueError("a batch holds at least one request.")
    fastest = min(front, key=lambda p: (latency(p[0], 1), -p[1]))[0]
    by_slack = sorted(range(n), key=lambda i: -slack_ms[i])  # most slack first
    if on_late == "shed":
        # The largest k such that the k requests with most slack all fit the fastest mask at batch size k.
        k = 0
        while k < n and slack_ms[by_slack[k]] >= latency(fastest, k + 1):
            k += 1
        run, other = sorted(by_slack[:k]), sorted(by_slack[k:])
        size = k
    else:
        run = list(range(n))
        other = sorted(i for i in run if slack_ms[i] < latency(fastest, n))
        size = n
    reachable = [i for i in run if i not in set(other)]
    if not reachable:
        return Choice(fastest, run, [] if on_late == "serve" else other, other if on_late == "serve" else [],
                      latency(fastest, max(size, 1)) if run else 0.0)
    tightest = min(slack_ms[i] for i in reachable)
    floor = _queue_ok(latency(fastest, size), waiting_ms, latency, fastest, max_batch)

    def keeps_queue(mask: str) -> bool:
        got = _queue_ok(latency(mask, size), waiting_ms, latency, fastest, max_batch)
        return all(g or not f for g, f in zip(got, floor, strict=True))

    fits = [(acc, -latency(mask, size), mask) for mask, acc in front
            if latency(mask, size) <= tightest and keeps_queue(mask)]
    mask = max(fits)[2] if fits else fastest
    if on_late == "shed":
        return Choice(mask, run, other, [], latency(mask, size))
    return Choice(mask, run, [], other, latency(mask, size))
