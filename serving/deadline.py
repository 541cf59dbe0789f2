"""A request's deadline from its headers: how long it may take (``X-Deadline-Ms``) and since when
(``X-Request-Start``)."""

from __future__ import annotations

import math


class BadInput(ValueError):
    """A request the server cannot answer as sent (the message is the answer's sentence)."""


def parse_deadline(header: str | None, default_ms: float) -> float:
    """The ``X-Deadline-Ms`` header as milliseconds (the server's SLO when absent)."""
    if header is None:
        return default_ms
    try:
        value = float(header)
    except ValueError:
        raise BadInput(f"X-Deadline-Ms must be a number of milliseconds, got {header!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise BadInput(f"X-Deadline-Ms must be a positive number of milliseconds, got {header!r}.")
    return value


def request_start(header: str | None, now_perf: float, now_epoch: float) -> float:
    """When the request started, on the ``time.perf_counter()`` clock: from ``X-Request-Start`` (``t=`` and the
    Unix time in seconds, milliseconds or microseconds, as load balancers such as nginx set it, or the client),
    else now. The deadline then counts the time spent before the replica (proxy, network) too; a start in the
    future (skewed clocks) counts as now."""
    if header is None:
        return now_perf
    try:
        value = float(header.strip().removeprefix("t="))
    except ValueError:
        raise BadInput(f"X-Request-Start must be t= and a Unix time, got {header!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise BadInput(f"X-Request-Start must be t= and a Unix time, got {header!r}.")
    seconds = value / 1e6 if value > 1e14 else value / 1e3 if value > 1e11 else value
    return now_perf - max(0.0, now_epoch - seconds)
