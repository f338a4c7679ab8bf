"""Pruning in real training runs: the schedule is followed, the target reached, zeros kept, resume exact."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from gpt2.config import resolve
from gpt2.optim.prune.masks import count
from gpt2.trainer.extension import Extension
from gpt2.trainer.extensions.pruning import PruningExtension
from gpt2.trainer.loop import Trainer
from gpt2.trainer.run import extensions_for
from tests.conftest import tiny_run_flags

METHODS = {
    "magnitude": dict(pruning_method="magnitude"),
    "movement": dict(pruning_method="movement", optimizer="adamwspam", spam_enable_clip=True),
    "state": dict(pruning_method="state", optimizer="adamwprune", adamwprune_variant="bitter7"),
}
# warm-up 5, every 5 iterations, ramp end 30: iterations 10, 15, ..., 30 (0-based), after steps 11, ..., 31
UPDATES = (11, 16, 21, 26, 31)


class Watch(Extension):
    """Pruned gradients are zero before clipping, pruned weights and moments after every step.

    Records the measured sparsity and the schedule position after each step.
    """

    name = "watch"

    def __init__(self, pruning: PruningExtension, stop_at: int | None = None) -> None:
        self.pruning, self.stop_at, self.sparsity, self.applied = pruning, stop_at, {}, {}

    def before_optimizer_step(self, model, optimizer) -> None:  # runs after the pruning extension's
        masks = self.pruning.masks
        for p, keep in zip(masks.params, masks.masks):
            assert (p.grad[~keep] == 0).all(), "pruned gradient entries reach the gradient clipping"

    def on_step_end(self, step, model, optimizer) -> None:
        masks = self.pruning.masks
        for p, keep in zip(masks.params, masks.masks):
            assert (p.detach()[~keep] == 0).all(), f"pruned weight not zero after step {step}"
            for key in ("exp_avg", "exp_avg_sq"):
                assert (optimizer.state[p][key][~keep] == 0).all(), f"pruned {key} not zero after step {step}"
        self.sparsity[step] = masks.weight_sparsity()[0]
        self.applied[step] = self.pruning.applied
        if step == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler: finish the step, checkpoint, stop


def run(flags: dict, stop_at: int | None = None, **over) -> tuple[Trainer, PruningExtension, Watch, dict]:
    cfg = resolve({**flags, **over})
    exts = extensions_for(cfg)
    pruning = next(e for e in exts if isinstance(e, PruningExtension))
    watch = Watch(pruning, stop_at)
    trainer = Trainer(cfg, [*exts, watch])
    return trainer, pruning, watch, trainer.fit()


def flags_for(method: str, corpus_dir: Path, data_dir: Path) -> dict:
    return tiny_run_flags(
        corpus_dir,
        data_dir,
        max_iters=40,
        log_interval=10,
        eval_interval=20,
        target_sparsity=0.5,
        pruning_warmup=5,
        pruning_frequency=5,
        pruning_ramp_end=30,
        **METHODS[method],
    )


@pytest.fixture(scope="module", params=sorted(METHODS))
def whole(request, corpus_dir, data_dir, tmp_path_factory):
    """One uninterrupted 40-step run per method (shared by the tests below)."""
    method = request.param
    flags = flags_for(method, corpus_dir, data_dir)
    out = tmp_path_factory.mktemp(f"whole-{method}")
    return method, flags, *run(flags, output_dir=str(out)), out


def test_run_follows_the_schedule_and_reaches_the_target(whole):
    method, _, trainer, pruning, watch, results, out = whole
    n = pruning.masks.numel
    for step, measured in watch.sparsity.items():
        last = max((u for u in UPDATES if u <= step), default=None)
        expected = 0.0 if last is None else count(pruning.schedule.sparsity_at(last - 1), n) / n
        assert measured == expected, f"step {step}"
    assert abs(results["final_sparsity"] - 0.5) < 0.005
    assert results["mask_updates"] == len(UPDATES) and results["last_mask_update_step"] == 31
    assert results["pruning_schedule"] == ("linear" if method == "movement" else "cubic")
    layers = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert set(results["sparsity_per_layer"]) == {f"h.{i}.{m}" for i in range(2) for m in layers}
    # weights + m + v (+ 1-byte masks over the prunable share, + w0 for movement), in weight multiples
    assert 3.0 < results["effective_memory_x_weights"] < (3.3 if method != "movement" else 3.5)
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert [r["sparsity"] for r in evals] == pytest.approx([0.0, watch.sparsity[20], 0.5])
    assert (trainer.model.transformer.wte.weight != 0).all()  # the tied embedding is not pruned


@pytest.mark.parametrize("whole", ["movement", "state"], indirect=True)  # masks in the extension / optimizer
def test_resume_keeps_masks_and_schedule_position(whole, tmp_path):
    _, flags, trainer, whole_pruning, _, _, _ = whole
    _, part, _, results = run(flags, stop_at=22, output_dir=str(tmp_path))
    assert results["iters"] == 22 and part.last_update == 21
    resumed, pruning, watch, _ = run(flags, resume="auto", output_dir=str(tmp_path))
    assert min(watch.sparsity) == 23  # continued after step 22, with step 22's masks in place
    assert watch.sparsity[23] == part.masks.weight_sparsity()[0]
    assert watch.applied[23] == part.applied == part.schedule.sparsity_at(20)  # the schedule position
    assert pruning.updates == whole_pruning.updates and pruning.applied == whole_pruning.applied
    for a, b in zip(pruning.masks.masks, whole_pruning.masks.masks):
        assert torch.equal(a, b)
    for (name, a), b in zip(resumed.model.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.equal(a, b), name
