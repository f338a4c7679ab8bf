"""The statistics of verdicts: hand-computed paired tests and Holm adjustments, the alpha spending, and
the sequential rule's error rate under no effect (simulated), which must not exceed its level."""

from __future__ import annotations

import math
import random

import pytest

from gpt2.analysis import stats


def test_a_paired_comparison_matches_the_hand_computation() -> None:
    # deltas 0.1, 0.3, 0.2: mean 0.2, sd 0.1, se 0.1/sqrt(3); t = 3.4641 on 2 df
    p = stats.paired([0.1, 0.3, 0.2], margin=0.5)
    se = 0.1 / math.sqrt(3)
    assert (p.n, p.mean, p.sd, p.se) == (3, pytest.approx(0.2), pytest.approx(0.1), pytest.approx(se))
    assert p.ci == pytest.approx((0.2 - 4.302653 * se, 0.2 + 4.302653 * se), abs=1e-6)  # t(0.975, 2)
    assert p.p == pytest.approx(0.0742, abs=1e-4)  # 2 * P(T_2 > 3.4641)
    assert p.mde == pytest.approx((4.302653 + 1.060660) * se, abs=1e-6)  # t(0.975, 2) + t(0.8, 2)
    # equivalence within 0.5: the larger one-sided p, P(T_2 > (0.5 - 0.2) / se) = P(T_2 > 5.196)
    assert p.p_equivalent == pytest.approx(0.01754, abs=1e-4)
    assert stats.paired([0.3]).p is None  # one seed: no test


def test_holm_adjusts_step_down_and_keeps_missing_values() -> None:
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04)
    assert stats.holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_the_looks_spend_exactly_the_level_and_most_of_it_late() -> None:
    alphas = [stats.look_alpha(n, 10) for n in range(2, 11)]
    assert sum(alphas) == pytest.approx(stats.ALPHA)
    assert all(a > 0 for a in alphas) and alphas[0] > alphas[-1]  # Pocock-type: front-loaded a little
    assert stats.look_alpha(1, 10) == 0.0


@pytest.mark.parametrize("arms", [1, 3])
def test_with_no_true_effect_the_rule_calls_a_difference_at_most_at_its_level(arms: int) -> None:
    """Seeds in rounds of 2..10, stopping at the first decisive look: over 2,000 simulated
    ablations whose arms equal the control, the rate of any false 'difference' stays within 5%
    plus three Monte Carlo standard errors."""
    rng, sims, false = random.Random(0), 2000, 0
    for _ in range(sims):
        deltas = {f"arm{i}": [rng.gauss(0.0, 1.0) for _ in range(10)] for i in range(arms)}
        verdicts = stats.sequential(deltas, max_seeds=10, margin=0.5)
        false += any(v.decision == "difference" for v in verdicts.values())
    rate, mc = false / sims, math.sqrt(stats.ALPHA * (1 - stats.ALPHA) / sims)
    assert rate <= stats.ALPHA + 3 * mc, rate
    assert rate > 0.005  # not vacuous: the rule does call differences


def test_a_real_effect_is_called_early_and_no_effect_is_called_equivalent() -> None:
    rng = random.Random(1)
    strong = stats.sequential({"a": [-1.0 + rng.gauss(0, 0.05) for _ in range(10)]}, max_seeds=10, margin=0.1)
    assert strong["a"].decision == "difference" and strong["a"].paired.n <= 4
    null = stats.sequential({"a": [rng.gauss(0, 0.01) for _ in range(10)]}, max_seeds=10, margin=0.1)
    assert null["a"].decision == "no difference > 0.1" and null["a"].ruled_out < 0.1
    undecided = stats.sequential({"a": [rng.gauss(0, 1.0) for _ in range(10)]}, max_seeds=10, margin=0.1)
    assert undecided["a"].decision == "undecided" and undecided["a"].ruled_out > 0.1
