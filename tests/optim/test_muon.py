"""--optimizer muon: torch's Muon on the blocks' matrices, AdamW on the rest, one LR, exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2.config import resolve
from gpt2.errors import ConfigError
from gpt2.model import GPT
from gpt2.optim.factory import muon_params
from gpt2.optim.muon import Muon, MuonWithAdamW, newton_schulz
from gpt2.trainer import checkpoint
from gpt2.trainer.run import train_once
from tests.conftest import small_gpt_config


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest() -> None:
    model = GPT(small_gpt_config())
    matrices, rest = muon_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert matrices and all(p.dim() == 2 and names[id(p)].startswith("transformer.h.") for p in matrices)
    rest_names = {names[id(p)] for p in rest}
    assert "transformer.wte.weight" in rest_names and "transformer.wpe.weight" in rest_names
    assert all(p.dim() < 2 for p in rest if names[id(p)].startswith("transformer.h."))


def _pair(ns_dtype: torch.dtype) -> tuple[torch.nn.Parameter, torch.nn.Parameter, Muon, torch.optim.Muon]:
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(24, 16))
    b = torch.nn.Parameter(a.detach().clone())
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    return a, b, Muon([a], ns_dtype=ns_dtype, **kw), torch.optim.Muon([b], **kw)


def test_with_bf16_newton_schulz_it_is_torch_muon_bitwise() -> None:
    a, b, ours, theirs = _pair(torch.bfloat16)
    for step in range(3):
        g = torch.randn(24, 16, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert torch.equal(a, b)


def test_fp32_newton_schulz_is_closer_to_exact_arithmetic_than_bf16() -> None:
    g = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    coeffs, steps, eps = (3.4445, -4.775, 2.0315), 5, 1e-7
    exact = newton_schulz(g.double(), coeffs, steps, eps, torch.float64)
    fp32 = newton_schulz(g, coeffs, steps, eps, torch.float32).double()
    bf16 = newton_schulz(g, coeffs, steps, eps, torch.bfloat16).double()
    assert (fp32 - exact).abs().max() < 1e-5 < (bf16 - exact).abs().max()
    a, b, ours, theirs = _pair(torch.float32)  # and the fp32 step is torch's step up to bf16 rounding
    a.grad = b.grad = torch.randn(24, 16)
    ours.step()
    theirs.step()
    torch.testing.assert_close(a, b, rtol=0, atol=2e-3)


def test_one_learning_rate_schedule_reaches_both_halves(tiny_flags) -> None:
    from gpt2.trainer.loop import Trainer

    trainer = Trainer(resolve(dict(tiny_flags, optimizer="muon")))
    opt = trainer.optimizer
    assert isinstance(opt, MuonWithAdamW)
    trainer.step_fn.set_lr(1.5e-3)
    assert [g["lr"] for g in opt.muon.param_groups + opt.adamw.param_groups] == [1.5e-3] * 3
    assert opt.muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert opt.muon.param_groups[0]["weight_decay"] == opt.adamw.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("accumulation", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_muon_training_lowers_the_loss_and_resumes_exactly(tiny_flags, tmp_path, accumulation) -> None:
    flags = dict(
        tiny_flags,
        optimizer="muon",
        max_iters=12,
        dropout=0.1,
        gradient_accumulation=accumulation,
        save_checkpoint=True,
        checkpoint_interval=6,
        keep_checkpoints=2,
        eval_interval=6,
    )
    full = train_once(resolve(dict(flags, output_dir=str(tmp_path / "full"))))
    records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.5, evals
    mid = tmp_path / "full" / checkpoint.step_name(6)
    train_once(resolve(dict(flags, output_dir=str(tmp_path / "resumed"), resume=str(mid))))
    a = checkpoint.load(tmp_path / "full" / checkpoint.LAST)
    b = checkpoint.load(tmp_path / "resumed" / checkpoint.LAST)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert full["iters"] == 12


def test_muon_with_magnitude_pruning_keeps_the_pruned_weights_at_zero(tiny_flags) -> None:
    from gpt2.trainer.loop import Trainer
    from gpt2.trainer.run import extensions_for

    cfg = resolve(
        dict(
            tiny_flags,
            optimizer="muon",
            pruning_method="magnitude",
            target_sparsity=0.5,
            pruning_warmup=2,
            pruning_frequency=2,
            max_iters=10,
        )
    )
    trainer = Trainer(cfg, extensions_for(cfg))
    results = trainer.fit()
    assert results["final_sparsity"] == pytest.approx(0.5, abs=0.02)
    ext = next(e for e in trainer.extensions if e.name == "pruning")
    masks = ext.pruner.masks
    assert masks.active
    for name, weight, keep in zip(masks.names, masks.params, masks.masks, strict=True):
        assert torch.count_nonzero(weight[~keep]) == 0, name


@pytest.mark.parametrize(
    "extra,message",
    [
        (dict(parallel="fsdp"), "orthogonalises whole matrices, which FSDP shards"),
        (
            dict(pruning_method="state", pruning_warmup=2),
            "--pruning-method state needs --optimizer adamwprune",
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused(tiny_flags, extra, message) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(dict(tiny_flags, optimizer="muon", **extra))


def test_muon_flags_need_muon(tiny_flags) -> None:
    with pytest.raises(ConfigError, match="--muon-momentum needs --optimizer muon"):
        resolve(dict(tiny_flags, muon_momentum=0.9), explicit={"muon_momentum"})
