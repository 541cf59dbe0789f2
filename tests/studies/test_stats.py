"""The study's paired statistics against hand computations: mean difference, t-interval, verdicts per claim, and
the learning curves over seeds."""

from __future__ import annotations

import math

import pytest

from studies.paper import claims, curves, plateau
from studies.stats import paired, verdict

# Student's t quantiles at 0.975, from a printed table: 2 and 4 degrees of freedom.
T_2, T_4 = 4.302653, 2.776445


def test_paired_difference_and_interval_match_a_hand_computation() -> None:
    # d = [2, 1, 5]: mean 8/3; sample sd sqrt(((2-8/3)^2 + (1-8/3)^2 + (5-8/3)^2) / 2) = sqrt(13/3).
    p = paired([70.0, 72.0, 75.0], [68.0, 71.0, 70.0])
    half = T_2 * math.sqrt(13 / 3) / math.sqrt(3)
    assert p.differences == [2.0, 1.0, 5.0]
    assert p.mean == pytest.approx(8 / 3)
    assert (p.low, p.high) == (pytest.approx(8 / 3 - half, abs=1e-5), pytest.approx(8 / 3 + half, abs=1e-5))
    assert p.low == pytest.approx(-2.5045, abs=1e-4) and p.high == pytest.approx(7.8378, abs=1e-4)
    assert verdict(p, "superior") == "undecided"  # the interval holds 0


def test_verdicts_follow_where_the_interval_lies() -> None:
    # d = [2, 3, 2.5, 3.5, 3]: mean 2.8, sd sqrt(0.325), half-width 2.776445 * sqrt(0.325 / 5) = 0.70786.
    above = paired([12.0, 13.0, 12.5, 13.5, 13.0], [10.0] * 5)
    assert (above.low, above.high) == (pytest.approx(2.8 - T_4 * math.sqrt(0.065), abs=1e-5),
                                       pytest.approx(2.8 + T_4 * math.sqrt(0.065), abs=1e-5))
    assert verdict(above, "superior") == "holds"
    below = paired([10.0] * 5, [12.0, 13.0, 12.5, 13.5, 13.0])
    assert verdict(below, "superior") == "does not hold"
    # At least as good up to 1 point: [-0.6, -0.4, -0.5, -0.5, -0.5] lies within the margin: holds; shifted by
    # two points it lies below -1: does not; one pair alone decides nothing.
    close = paired([9.4, 9.6, 9.5, 9.5, 9.5], [10.0] * 5)
    assert verdict(close, "non-inferior", margin=1.0) == "holds"
    assert verdict(close, "superior") == "does not hold"
    assert verdict(paired([7.4, 7.6, 7.5, 7.5, 7.5], [10.0] * 5), "non-inferior", margin=1.0) == "does not hold"
    single = paired([80.0], [70.0])
    assert (single.low, single.high) == (-math.inf, math.inf)
    assert verdict(single, "superior") == "undecided"
    with pytest.raises(ValueError, match="same seeds"):
        paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="kind"):
        verdict(above, "better")


def test_claims_pair_the_trainings_of_each_seed() -> None:
    def seed(adn_sup: float, adn_base: float, vanilla: float, naive_base: float, alone: float) -> dict:
        return {"adn": {"FFFF": adn_sup, "TTTT": adn_base}, "vanilla": {"FFFF": vanilla, "TTTT": naive_base},
                "base": {"TTTT": alone}}

    # ADN's super-net 0.5, 1.5 and 1.0 points above vanilla; its base-net 3, 4, 2 above the base-net alone.
    per_seed = {0: seed(0.750, 0.700, 0.745, 0.200, 0.670), 1: seed(0.765, 0.710, 0.750, 0.150, 0.670),
                2: seed(0.740, 0.690, 0.730, 0.180, 0.670)}
    one, two, three = claims(per_seed, [0, 1, 2], "FFFF", "TTTT", chance=10.0)
    assert one["paired"]["differences"] == pytest.approx([0.5, 1.5, 1.0])
    # d = [0.5, 1.5, 1.0]: mean 1, sd 0.5, interval 1 -+ 4.302653 * 0.5 / sqrt(3) = [-0.2421, 2.2421].
    assert one["paired"]["low"] == pytest.approx(1 - T_2 * 0.5 / math.sqrt(3), abs=1e-5)
    assert one["verdict"] == "holds"  # above -1 point
    assert two["paired"]["differences"] == pytest.approx([3.0, 4.0, 2.0])
    assert two["paired"]["low"] == pytest.approx(3 - T_2 * 1.0 / math.sqrt(3), abs=1e-5)  # 0.5159 > 0
    assert two["verdict"] == "holds"
    # Naive: 17.67 % against vanilla's 74.17 % (kept (17.67 - 10) / (74.17 - 10) = 12 %); ADN keeps
    # (70 - 10) / (75.17 - 10) = 92 %.
    assert three["verdict"] == "holds"
    per_seed[2]["base"]["TTTT"] = 0.75  # the base-net alone now wins on one seed by 6 points: undecided
    assert claims(per_seed, [0, 1, 2], "FFFF", "TTTT", chance=10.0)[1]["verdict"] == "undecided"


def test_learning_curves_keep_the_epochs_every_seed_evaluated() -> None:
    rows = ("adn_super", "adn_base", "vanilla", "base_alone")
    per_seed = {0: {r: {1: 0.20, 2: 0.40, 3: 0.50} for r in rows}, 1: {r: {1: 0.30, 2: 0.60} for r in rows}}
    c = curves(per_seed, [0, 1])
    assert c["vanilla"]["epochs"] == [1, 2]
    assert c["vanilla"]["mean"] == pytest.approx([25.0, 50.0])
    assert c["vanilla"]["std"] == pytest.approx([math.sqrt(50.0), math.sqrt(200.0)])  # sample sd of 20, 30 and 40, 60
    assert c["adn_base"]["per_seed"] == {"0": pytest.approx([20.0, 40.0]), "1": pytest.approx([30.0, 60.0])}
    # Two epochs: the last quarter is the last epoch; vanilla gained 25 points against a spread of sqrt(200).
    assert c["vanilla"]["plateau"] == {"from_epoch": 1, "to_epoch": 2, "gain": pytest.approx(25.0),
                                       "spread": pytest.approx(math.sqrt(200.0)), "flat": False}


def test_a_curve_is_flat_when_its_last_quarter_gains_less_than_the_seed_spread() -> None:
    epochs = list(range(1, 9))
    rising = plateau(epochs, [10, 20, 30, 40, 50, 60, 70, 80], [3.0] * 8)
    assert (rising["from_epoch"], rising["gain"], rising["flat"]) == (6, 20.0, False)  # 8 // 4 = 2 epochs back
    flat = plateau(epochs, [10, 40, 60, 70, 75, 78, 79, 80], [1.5] * 7 + [2.0])
    assert (flat["gain"], flat["spread"], flat["flat"]) == (2.0, 2.0, True)
    assert plateau([1], [50.0], [0.0])["flat"] is False  # one epoch says nothing
