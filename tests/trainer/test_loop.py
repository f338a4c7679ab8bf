"""The training loop: accumulation, resume, outputs, time budget, epochs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gpt2.config import resolve
from gpt2.data.loader import TokenBatches
from gpt2.kernels import build
from gpt2.trainer import checkpoint
from gpt2.trainer.extension import Extension
from gpt2.trainer.loop import Trainer
from gpt2.trainer.run import train_once
from gpt2.trainer.step import TrainStep


class _GradCapture(Extension):
    """Copies every gradient just before the optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def before_optimizer_step(self, model, optimizer) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _grads_for(accumulation: int, micro_batch: int, data: torch.Tensor) -> dict[str, torch.Tensor]:
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=96, n_layer=2, n_head=2, n_embd=32))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cap = _GradCapture()
    step = TrainStep(
        model,
        opt,
        device=torch.device("cpu"),
        dtype=torch.float32,
        accumulation=accumulation,
        grad_clip=0.0,
        extensions=[cap],
    )
    chunks = iter(data.split(micro_batch))

    def next_batch():
        b = next(chunks)
        return b[:, :-1], b[:, 1:]

    step(next_batch, lr=0.0)
    return cap.grads


def test_gradient_accumulation_equals_big_batch() -> None:
    """4 micro-batches of 2 give the gradient of one batch of 8 (loss scaled by 1/accumulation)."""
    data = torch.randint(0, 96, (8, 17), generator=torch.Generator().manual_seed(1))
    small = _grads_for(4, 2, data)
    big = _grads_for(1, 8, data)
    assert small.keys() == big.keys() and len(big) > 0
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=0, atol=1e-5, msg=name)
    # and not trivially: an unscaled sum would be 4x larger
    name = "transformer.h.0.mlp.c_fc.weight"
    assert big[name].abs().max() > 1e-4


def _losses(metrics_path) -> dict[int, float]:
    out = {}
    for line in metrics_path.read_text().splitlines():
        r = json.loads(line)
        if "train_loss" in r and "val_loss" not in r:
            out[r["step"]] = r["train_loss"]
    return out


@pytest.mark.parametrize("dtype,prefetch", [("float32", False), ("bfloat16", False), ("float32", True)])
def test_resume_reproduces_uninterrupted_run(tiny_flags, tmp_path, monkeypatch, dtype, prefetch) -> None:
    """Resuming from a mid-run checkpoint ends with the same losses and weights as not stopping.

    ``prefetch``: the uninterrupted run prepares batches ahead (as on CUDA), the resumed one not.
    """
    if prefetch:
        init = TokenBatches.__init__
        monkeypatch.setattr(
            TokenBatches, "__init__", lambda self, *a, **kw: init(self, *a, **kw, prefetch=True)
        )
    flags = dict(
        tiny_flags,
        dtype=dtype,
        dropout=0.1,
        max_iters=12,
        log_interval=1,
        eval_interval=4,
        save_checkpoint=True,
        checkpoint_interval=6,
        keep_checkpoints=2,
    )
    full_dir = tmp_path / "full"
    train_once(resolve(dict(flags, output_dir=str(full_dir))))
    mid = full_dir / checkpoint.step_name(6)
    assert mid.exists()

    monkeypatch.undo()
    resumed_dir = tmp_path / "resumed"
    train_once(resolve(dict(flags, output_dir=str(resumed_dir), resume=str(mid))))

    full, resumed = _losses(full_dir / "metrics.jsonl"), _losses(resumed_dir / "metrics.jsonl")
    assert sorted(resumed) == list(range(7, 13))
    for s in resumed:
        assert abs(full[s] - resumed[s]) < 1e-6, (s, full[s], resumed[s])
    a = checkpoint.load(full_dir / checkpoint.LAST)["model"]
    b = checkpoint.load(resumed_dir / checkpoint.LAST)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_resume_auto_continues_in_place(tiny_flags) -> None:
    """--resume auto picks checkpoint_last.pt of the output dir and keeps one metrics history."""
    flags = dict(tiny_flags, max_iters=4, save_checkpoint=True, checkpoint_interval=2)
    first = train_once(resolve(flags))
    assert first["iters"] == 4
    second = train_once(resolve(dict(flags, max_iters=6, resume="auto")))
    assert second["iters"] == 6
    steps = [
        json.loads(x)["step"] for x in Path(flags["output_dir"], "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps) and steps[-1] == 6


def test_resume_auto_without_checkpoint_starts_fresh(tiny_flags) -> None:
    results = train_once(resolve(dict(tiny_flags, max_iters=2, resume="auto")))
    assert results["iters"] == 2


def test_resume_rejects_checkpoint_of_another_model(tiny_flags) -> None:
    from gpt2.errors import UserError

    flags = dict(tiny_flags, max_iters=2, save_checkpoint=True, checkpoint_interval=2)
    train_once(resolve(flags))
    with pytest.raises(UserError, match="different model"):
        train_once(resolve(dict(flags, n_layer=3, resume="auto")))


def test_outputs_and_results_keys(tiny_flags) -> None:
    """metrics.jsonl has a record per log step and per eval; results.json has the stable keys."""
    results = train_once(resolve(tiny_flags))
    out = tiny_flags["output_dir"]
    stored = json.loads(Path(out, "results.json").read_text())
    for key in (
        "final_train_loss",
        "final_val_loss",
        "best_val_loss",
        "final_val_perplexity",
        "iters",
        "tokens_seen",
        "wall_time_s",
        "tokens_per_s",
        "peak_memory_bytes",
        "n_params",
        "config",
        "versions",
        "git_commit",
    ):
        assert key in stored, key
    assert stored["iters"] == 8 and stored["tokens_seen"] == 8 * 4 * 32
    assert math.isclose(stored["final_val_perplexity"], math.exp(stored["final_val_loss"]), rel_tol=1e-6)
    assert stored["best_val_loss"] <= stored["final_val_loss"]
    assert results["final_val_loss"] == stored["final_val_loss"]
    records = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train_loss" in r and "val_loss" not in r]
    eval_steps = [r["step"] for r in records if "val_loss" in r]
    assert train_steps == [2, 4, 6, 8]
    assert eval_steps == [0, 4, 8]
    assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in records if "lr" in r)


def test_weight_decay_is_applied(tiny_flags) -> None:
    """With lr>0 and zero gradients, only >=2-D weights shrink, by lr*wd."""
    cfg = resolve(dict(tiny_flags, weight_decay=0.5, learning_rate=0.1, warmup_steps=0, grad_clip=0.0))
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for p in trainer.model.parameters():
        p.grad = torch.zeros_like(p)
    trainer.step_fn.set_lr(0.1)
    trainer.optimizer.step()
    for n, p in trainer.model.named_parameters():
        expected = before[n] * (1 - 0.1 * 0.5) if p.dim() >= 2 else before[n]
        torch.testing.assert_close(p.detach(), expected, msg=n)


def test_max_time_stops_early(tiny_flags) -> None:
    results = train_once(resolve(dict(tiny_flags, max_iters=100000, max_time=2)))
    assert results["stop_reason"] == "max_time"
    assert 0 < results["iters"] < 100000
    assert results["wall_time_s"] < 30


def test_num_epochs_sets_iterations(tiny_flags) -> None:
    flags = {k: v for k, v in tiny_flags.items() if k != "max_iters"}
    cfg = resolve(dict(flags, num_epochs=0.01), explicit=set(flags) | {"num_epochs"})
    trainer = Trainer(cfg)
    trainer._setup_data()
    tokens = trainer.data.num_tokens("train")
    assert trainer.max_iters == math.ceil(0.01 * tokens / (4 * 32))


def test_dry_run_needs_no_data(tmp_path) -> None:
    cfg = resolve(
        dict(
            model_name="tiny",
            dry_run=True,
            device="cpu",
            dataset="finewebedu",
            data_dir=str(tmp_path / "nothing"),
        )
    )
    info = Trainer(cfg).dry_run()
    assert math.isfinite(info["loss"]) and info["n_params"] > 0
    assert not (tmp_path / "nothing").exists()


def test_bf16_training_follows_fp32(tiny_flags, tmp_path) -> None:
    """CPU bf16 autocast (bf16 head matmuls, fp32 softmax, fp32 short attention) learns like fp32."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        flags = dict(
            tiny_flags, dtype=dtype, max_iters=40, log_interval=1, eval_interval=40, output_dir=str(out)
        )
        results = train_once(resolve(flags))
        assert results["dtype"] == dtype
        assert results["loss_kernel"] == ("fused" if build.compiler() else "aten")
        runs[dtype] = (_losses(out / "metrics.jsonl"), results["final_val_loss"])
    (fp32, fp32_val), (bf16, bf16_val) = runs["float32"], runs["bfloat16"]
    assert fp32[40] < fp32[1] - 1.0  # both learn ...
    for step in (1, 10, 20, 30, 40):  # ... along the same curve
        assert abs(fp32[step] - bf16[step]) < 0.02, (step, fp32[step], bf16[step])
    assert abs(fp32_val - bf16_val) < 0.02
