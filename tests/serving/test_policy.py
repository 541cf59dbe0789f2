"""The deadline policy against a brute-force reference over every subset and mask, and its two promises: tighter
slack never runs a slower mask, and unreachable requests are shed or served late as configured."""

from __future__ import annotations

import itertools
import random

import pytest

from serving.deadline import BadInput, request_start
from serving.policy import DepthCap, LatencyModel, choose, fastest_first

# Four front masks: ms per batch of 1, 2, 4, 8 (a batch costs less per image as it grows).
TABLE = {
    "TTTT": {1: 2.0, 2: 3.0, 4: 5.0, 8: 9.0},
    "TTFF": {1: 3.0, 2: 4.5, 4: 7.5, 8: 13.0},
    "TFFF": {1: 4.0, 2: 6.0, 4: 10.0, 8: 18.0},
    "FFFF": {1: 5.0, 2: 7.5, 4: 12.5, 8: 22.0},
}
FRONT = [("TTTT", 0.70), ("TTFF", 0.80), ("TFFF", 0.85), ("FFFF", 0.90)]
LATENCY = LatencyModel(TABLE)


def reference(slack: list[float]) -> tuple[str, list[int]]:
    """Shed: the largest set of requests some mask can serve in time, then the most accurate mask for that set."""
    n = len(slack)
    for size in range(n, 0, -1):
        best = None
        for subset in itertools.combinations(range(n), size):
            for mask, acc in FRONT:
                if LATENCY(mask, size) <= min(slack[i] for i in subset) and (best is None or acc > best[0]):
                    best = (acc, mask, list(subset))
        if best is not None:
            return best[1], best[2]
    return "", []


def test_latency_model_interpolates_between_measured_sizes_and_extrapolates_per_image() -> None:
    assert LATENCY("FFFF", 4) == 12.5
    assert LATENCY("FFFF", 3) == pytest.approx(10.0)  # halfway between 7.5 and 12.5
    assert LATENCY("FFFF", 16) == pytest.approx(44.0)  # 22 ms per 8, twice
    with pytest.raises(ValueError, match="batch sizes of 1 or more"):
        LatencyModel({"FFFF": {0: 1.0}})


def test_a_measured_dip_at_a_larger_batch_is_raised_to_the_time_of_the_smaller_one() -> None:
    noisy = LatencyModel({"FFFF": {1: 18.0, 2: 26.0, 4: 37.0, 8: 64.0, 16: 49.0}})  # measured on this CPU
    assert noisy("FFFF", 16) == 64.0
    assert noisy("FFFF", 12) == 64.0
    assert all(noisy("FFFF", b) <= noisy("FFFF", b + 1) for b in range(1, 32))


def test_the_chosen_mask_is_the_most_accurate_that_fits() -> None:
    assert choose([100.0], FRONT, LATENCY).mask == "FFFF"
    assert choose([4.5], FRONT, LATENCY).mask == "TFFF"  # FFFF needs 5 ms
    assert choose([2.5], FRONT, LATENCY).mask == "TTTT"
    # The batch of 4 costs more: 12.5 ms for FFFF, so a tightest slack of 11 ms gets TFFF (10 ms).
    assert choose([50.0, 11.0, 40.0, 30.0], FRONT, LATENCY).mask == "TFFF"


@pytest.mark.parametrize("seed", range(200))
def test_shedding_matches_a_brute_force_search(seed: int) -> None:
    rng = random.Random(seed)
    slack = [rng.uniform(-2.0, 25.0) for _ in range(rng.randint(1, 6))]
    choice = choose(slack, FRONT, LATENCY, on_late="shed")
    mask, kept = reference(slack)
    assert len(choice.run) == len(kept)  # as many requests served as possible
    if kept:
        assert dict(FRONT)[choice.mask] == dict(FRONT)[mask]  # and the best accuracy any such set allows
        assert LATENCY(choice.mask, len(choice.run)) <= min(slack[i] for i in choice.run)
    assert sorted(choice.run + choice.shed) == list(range(len(slack)))
    assert not choice.late


@pytest.mark.parametrize("seed", range(100))
@pytest.mark.parametrize("on_late", ["shed", "serve"])
def test_tighter_slack_never_yields_a_slower_mask(seed: int, on_late: str) -> None:
    """Among the same requests answered in time, less slack never picks a slower mask. (A request that becomes
    unreachable leaves the batch or stops counting, which the shedding tests cover.)"""
    rng = random.Random(seed)
    slack = [rng.uniform(3.0, 30.0) for _ in range(rng.randint(1, 8))]
    tighter = [s - rng.uniform(0.0, 10.0) for s in slack]
    before, after = choose(slack, FRONT, LATENCY, on_late), choose(tighter, FRONT, LATENCY, on_late)
    if (after.run, after.late) == (before.run, before.late):
        assert LATENCY(after.mask, 1) <= LATENCY(before.mask, 1)
    for alone in range(1, 40):  # one request: a mask for every slack, never slower as the slack shrinks
        assert LATENCY(choose([alone - 1.0], FRONT, LATENCY, on_late).mask, 1) <= \
            LATENCY(choose([float(alone)], FRONT, LATENCY, on_late).mask, 1)


def test_unreachable_requests_are_shed_or_served_late_as_configured() -> None:
    slack = [30.0, 1.0, 20.0, -3.0]  # 1 ms and -3 ms: not even TTTT (2 ms alone) makes it
    shed = choose(slack, FRONT, LATENCY, on_late="shed")
    assert shed.run == [0, 2] and shed.shed == [1, 3] and not shed.late
    assert shed.mask == "FFFF"  # 7.5 ms for two fits 20 ms
    late = choose(slack, FRONT, LATENCY, on_late="serve")
    assert late.run == [0, 1, 2, 3] and late.late == [1, 3] and not late.shed
    assert late.mask == "FFFF"  # 12.5 ms for four still fits the reachable ones' 20 ms
    nobody = choose([0.5, -1.0], FRONT, LATENCY, on_late="shed")
    assert nobody.run == [] and nobody.shed == [0, 1]
    everyone_late = choose([0.5, -1.0], FRONT, LATENCY, on_late="serve")
    assert everyone_late.mask == "TTTT" and everyone_late.late == [0, 1]


def test_a_batch_leaves_the_queue_behind_it_the_deadlines_the_fastest_mask_would() -> None:
    # Eight queued requests: after TTTT alone (2 ms), TTTT for the eight takes 9 ms more: 11 ms in all.
    assert choose([100.0], FRONT, LATENCY, waiting_ms=[20.0] * 8, max_batch=8).mask == "FFFF"  # 5 + 9 <= 20
    assert choose([100.0], FRONT, LATENCY, waiting_ms=[12.0] * 8, max_batch=8).mask == "TTFF"  # 3 + 9 <= 12
    assert choose([100.0], FRONT, LATENCY, waiting_ms=[11.0] * 8, max_batch=8).mask == "TTTT"
    # Queued requests no mask can save do not hold the batch back: they will be shed anyway.
    assert choose([100.0], FRONT, LATENCY, waiting_ms=[5.0] * 8, max_batch=8).mask == "FFFF"
    # Two chunks of four behind it (max_batch 4), in deadline order: the second ends at L + 5 + 5 <= 14 ms,
    # so the batch may take 4 ms (TFFF), not 5 (FFFF).
    assert choose([100.0], FRONT, LATENCY, waiting_ms=[14.0] * 4 + [13.0] * 4, max_batch=4).mask == "TFFF"


def test_the_depth_cap_halves_the_time_limit_on_trouble_and_gives_one_mask_back_per_calm_period() -> None:
    # Eight masks, fastest first, 10 to 80 ms for one image; the tolerance keeps everything within 5 % of 10 ms.
    cap = DepthCap([10.0, 10.4, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0], calm_s=2.0, pressure=0.5, tolerance=0.05)
    assert cap.allowed == 8
    assert cap.update(10.0, trouble=True) == 5  # limit (10 + 80) / 2 = 45 ms: up to 40
    assert cap.update(10.5, trouble=True) == 3  # 27.5 ms: up to 20
    assert cap.update(11.0, trouble=True) == 2  # 18.75 ms: 10 and 10.4
    assert [cap.update(12.0 + k, trouble=True) for k in range(6)] == [2] * 6  # never below 10.5 ms
    assert cap.update(18.9, trouble=False) == 2  # 1.9 s calm: not yet
    assert cap.update(19.0, trouble=False) == 3
    assert cap.update(20.0, trouble=False) == 3
    assert [cap.update(19.0 + 2 * k, trouble=False) for k in range(1, 8)] == [4, 5, 6, 7, 8, 8, 8]
    # Trouble: a shed, an answer past its deadline, or a wait over half the deadline before the batch started.
    assert not cap.troubled([10.0, 49.0], [100.0, 100.0], shed=0, missed=0)
    assert cap.troubled([10.0, 51.0], [100.0, 100.0], shed=0, missed=0)
    assert cap.troubled([0.0], [100.0], shed=1, missed=0)
    assert cap.troubled([0.0], [100.0], shed=0, missed=1)


def test_the_depth_cap_keeps_masks_nearly_as_fast_as_the_fastest() -> None:
    # The serving benchmark's front: FFTT takes 9.0 ms against TTTT's 8.4 and is 4.5 points more accurate.
    times = {"TTTT": 8.4, "FTTT": 8.4, "TFTT": 9.0, "FFTT": 9.0, "FFFT": 11.5}
    cap = DepthCap(list(times.values()), tolerance=0.1)
    for t in range(10):
        cap.update(float(t), trouble=True)
    assert list(times)[:cap.allowed] == ["TTTT", "FTTT", "TFTT", "FFTT"]
    assert DepthCap(list(times.values()), tolerance=0.0).update(0.0, trouble=True) == 4  # 9.95 ms: FFTT still fits
    strict = DepthCap(list(times.values()), tolerance=0.0)
    assert [strict.update(0.0, trouble=True) for _ in range(3)] == [4, 4, 2]
    with pytest.raises(ValueError, match="fastest first"):
        DepthCap([9.0, 8.4])


def test_the_depth_cap_limits_the_choice_to_the_fastest_masks() -> None:
    ordered = fastest_first(list(reversed(FRONT)), LATENCY)
    assert [m for m, _ in ordered] == ["TTTT", "TTFF", "TFFF", "FFFF"]
    assert choose([100.0], ordered[:2], LATENCY).mask == "TTFF"
    assert choose([100.0], ordered[:1], LATENCY).mask == "TTTT"


def test_a_fixed_mask_is_a_one_mask_front_with_the_same_shedding() -> None:
    fixed = [("FFFF", 0.9)]
    assert choose([100.0, 100.0], fixed, LATENCY).mask == "FFFF"
    assert choose([100.0, 8.0], fixed, LATENCY).run == [0, 1]  # FFFF for two: 7.5 ms
    # 6 ms: FFFF alone (5 ms) would make it, beside the other (7.5 ms for two) it would not: the batch keeps
    # the request with more slack, the most requests it can answer in time.
    choice = choose([100.0, 6.0], fixed, LATENCY)
    assert (choice.mask, choice.run, choice.shed) == ("FFFF", [0], [1])
    with pytest.raises(ValueError, match="on_late"):
        choose([1.0], fixed, LATENCY, on_late="drop")


def test_the_request_start_header_moves_the_deadline_back_to_when_the_request_started() -> None:
    now_perf, now_epoch = 1000.0, 1_800_000_000.0
    assert request_start(None, now_perf, now_epoch) == now_perf
    for header in ("t=1799999999.95", "t=1799999999950", "t=1799999999950000"):  # s, ms, us: 50 ms ago
        assert request_start(header, now_perf, now_epoch) == pytest.approx(now_perf - 0.05, abs=1e-6)
    assert request_start("t=1800000001", now_perf, now_epoch) == now_perf  # a skewed clock: not in the future
    for bad in ("soon", "t=-5", "t=inf"):
        with pytest.raises(BadInput, match="X-Request-Start"):
            request_start(bad, now_perf, now_epoch)
