"""lm-eval-harness on an exported model, offline, with the bundled local task (evals/tiny_mc)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import LmEvalRun


def test_lm_eval_scores_an_exported_model_on_the_local_task(lm_eval_tiny_mc: LmEvalRun) -> None:
    out = lm_eval_tiny_mc.stdout
    m = re.search(r"\|gpt2_tiny_mc\|\s*\d+\|none\s*\|\s*0\|acc\s*\|.\s*\|\s*([\d.]+)\|", out)
    assert m, out[-2000:]
    assert 0.0 <= float(m.group(1)) <= 1.0
    assert len(lm_eval_tiny_mc.samples) == lm_eval_tiny_mc.results["sample_len"] == 48


def test_the_in_loop_accuracy_equals_lm_evals_on_the_export(lm_eval_tiny_mc: LmEvalRun) -> None:
    """The training run scored evals/tiny_mc at its last evaluation (--eval-task), on the weights
    that were then saved, exported and given to lm-eval: the same acc, acc_norm and standard errors."""
    ours, theirs = lm_eval_tiny_mc.run_results, lm_eval_tiny_mc.results
    assert ours["eval_step"] == ours["iters"] == 4
    for key in ("acc", "acc_norm"):
        assert ours[f"final_mc_tiny_mc_{key}"] == theirs[f"{key},none"]
        assert ours[f"final_mc_tiny_mc_{key}_se"] == pytest.approx(theirs[f"{key}_stderr,none"], rel=1e-9)
