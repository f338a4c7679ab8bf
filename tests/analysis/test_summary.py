"""Ablation summaries: equal-budget comparisons read off the runs' evaluation curves."""

from __future__ import annotations

import pytest

from gpt2.analysis.summary import _equal_budgets, interpolate


def test_interpolation_at_a_common_budget_is_linear_between_evaluations() -> None:
    curve = [(0, 0.0, 10.0), (100, 2.0, 6.0), (200, 4.0, 5.0)]
    assert interpolate(curve, 0, 150) == pytest.approx(5.5)
    assert interpolate(curve, 1, 1.0) == pytest.approx(8.0)
    assert interpolate(curve, 0, 200) == 5.0 and interpolate(curve, 0, 250) is None


def test_time_budgeted_arms_with_only_a_final_evaluation_compare_at_equal_time() -> None:
    """Each arm evaluated once, at the end of its 90 s (give or take a step): the equal-time column
    is each final loss; equal tokens cannot be read off one point each and stays empty."""
    rows = [
        dict(status="done", curves={"val_loss": [(170_000, 90.1, 5.2)]}),
        dict(status="done", curves={"val_loss": [(220_000, 90.6, 5.7)]}),
        dict(status="done", curves={"val_loss": [(200_000, 95.0, 5.5)]}),  # 5% late: not at the same time
    ]
    budget = _equal_budgets(rows)
    assert budget == {"tokens": 170_000, "train_time_s": 90.1, "curve_of": "evaluation"}
    assert [r["val_loss_at_equal_time"] for r in rows] == [5.2, 5.7, None]
    assert [r["val_loss_at_equal_tokens"] for r in rows] == [5.2, None, None]


def test_accuracy_curves_compare_at_the_budget_of_the_loss_curves() -> None:
    long = {"val_loss": [(0, 0.0, 4.0), (200, 2.0, 2.0)], "val_accuracy": [(0, 0.0, 0.0), (200, 2.0, 0.8)]}
    short = {"val_loss": [(0, 0.0, 4.0), (100, 1.0, 3.0)], "val_accuracy": [(0, 0.0, 0.0), (100, 1.0, 0.3)]}
    rows = [dict(status="done", curves=long), dict(status="done", curves=short)]
    _equal_budgets(rows)
    assert [r["val_accuracy_at_equal_tokens"] for r in rows] == [pytest.approx(0.4), pytest.approx(0.3)]
    assert [r["val_accuracy_at_equal_time"] for r in rows] == [pytest.approx(0.4), pytest.approx(0.3)]
