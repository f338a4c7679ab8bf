"""lm-eval-harness on an exported model, offline, with the bundled local task (evals/tiny_mc)."""

from __future__ import annotations

import re

from tests.conftest import LmEvalRun


def test_lm_eval_scores_an_exported_model_on_the_local_task(lm_eval_tiny_mc: LmEvalRun) -> None:
    out = lm_eval_tiny_mc.stdout
    m = re.search(r"\|gpt2_tiny_mc\|\s*\d+\|none\s*\|\s*0\|acc\s*\|.\s*\|\s*([\d.]+)\|", out)
    assert m, out[-2000:]
    assert 0.0 <= float(m.group(1)) <= 1.0
    assert len(lm_eval_tiny_mc.samples) == lm_eval_tiny_mc.results["sample_len"] == 48
