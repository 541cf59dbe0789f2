"""The open-loop client's traffic and figures: arrival processes with the rate and burstiness asked for, and
attainment / effective accuracy counted against every request sent."""

from __future__ import annotations

import numpy as np
import pytest

from serving import loadgen


@pytest.mark.parametrize("cv2", [1.0, 8.0])
def test_gamma_arrivals_have_the_rate_and_the_squared_coefficient_of_variation_asked_for(cv2: float) -> None:
    arrivals = loadgen.gamma(50.0, cv2, 400.0, np.random.default_rng(0))
    gaps = np.diff(arrivals)
    assert len(arrivals) / 400.0 == pytest.approx(50.0, rel=0.1)
    assert gaps.var() / gaps.mean() ** 2 == pytest.approx(cv2, rel=0.15)
    assert arrivals == sorted(arrivals) and arrivals[0] >= 0 and arrivals[-1] < 400.0


def test_phases_follow_their_rates_one_after_the_other() -> None:
    arrivals = np.array(loadgen.phases([(10.0, 50.0), (100.0, 20.0)], np.random.default_rng(1)))
    assert (arrivals < 50).sum() == pytest.approx(500, rel=0.15)
    assert ((arrivals >= 50) & (arrivals < 70)).sum() == pytest.approx(2000, rel=0.1)


def test_answers_fall_into_the_phase_they_were_sent_in() -> None:
    rates = [(2.0, 10.0), (20.0, 5.0), (2.0, 10.0), (20.0, 5.0)]
    arrivals = loadgen.phases(rates, np.random.default_rng(2))
    answers = [loadgen.Answer(t, 1.0, 200, 0, 50.0) for t in arrivals]
    groups = loadgen.by_rate(answers, rates)
    assert sorted(groups) == [2.0, 20.0]
    assert [seconds for _, seconds in groups.values()] == [20.0, 10.0]
    calm, burst = ([a.at_s for a in groups[r][0]] for r in (2.0, 20.0))
    assert len(calm) + len(burst) == len(arrivals)
    assert all(t < 10 or 15 <= t < 25 for t in calm) and all(10 <= t < 15 or t >= 25 for t in burst)
    assert len(burst) / 10.0 == pytest.approx(20.0, rel=0.2)
    # A boundary belongs to the phase that starts there.
    edge = loadgen.by_rate([loadgen.Answer(10.0, 1.0, 200, 0, 50.0)], rates)
    assert len(edge[20.0][0]) == 1 and not edge[2.0][0]


def test_attainment_and_effective_accuracy_count_every_request_sent() -> None:
    a = loadgen.Answer
    answers = [a(0.0, 10.0, 200, 3, 50.0, "FFFF", predicted=3),  # in time, right
               a(0.1, 40.0, 200, 3, 50.0, "TTTT", predicted=5),  # in time, wrong
               a(0.2, 60.0, 200, 1, 50.0, "FFFF", predicted=1),  # right but late
               a(0.3, 5.0, 503, 2, 50.0),  # shed
               a(0.4, 30000.0, 0, 2, 50.0)]  # no answer
    s = loadgen.summarize(answers, duration_s=1.0)
    assert (s["sent"], s["answered"], s["shed"], s["failed"]) == (5, 3, 1, 1)
    assert s["attainment"] == pytest.approx(2 / 5) and s["effective_accuracy"] == pytest.approx(1 / 5)
    assert s["accuracy_answered"] == pytest.approx(2 / 3) and s["throughput"] == pytest.approx(2.0)
    assert s["masks"] == {"FFFF": pytest.approx(2 / 3), "TTTT": pytest.approx(1 / 3)}
    assert s["p50_ms"] == 40.0
    assert "expected_accuracy" not in s
    # Expected: the two answers in time score their masks' pool accuracy, the late, shed and lost ones nothing.
    s = loadgen.summarize(answers, duration_s=1.0, mask_accuracy={"FFFF": 0.9, "TTTT": 0.6})
    assert s["expected_accuracy"] == pytest.approx((0.9 + 0.6) / 5)
