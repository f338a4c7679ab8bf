"""The fused softmax cross-entropy kernel: hand-computed rows, equality with PyTorch, the build."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2.kernels import build, xent

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def kernel():
    if build.compiler() is None:
        pytest.skip("no C compiler here: the loss runs on ATen's ops (tested in tests/model/test_loss.py)")
    xent._kernel.cache_clear()
    if not xent.fused_xent_available():
        pytest.fail("a C compiler is here, yet the fused loss kernel did not build")
    yield
    xent._kernel.cache_clear()


def reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's per-row loss and logit gradient, in fp32."""
    x = logits.float().requires_grad_()
    nll = F.cross_entropy(x, targets, reduction="none")
    nll.sum().backward()
    return nll.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hand_computed_row(dtype) -> None:
    """Logits (0, ln 3, -inf): probabilities 1/4, 3/4, 0; target 0: loss ln 4, gradient -3/4, 3/4, 0."""
    logits = torch.tensor([[0.0, math.log(3.0), -math.inf]]).to(dtype)
    out = torch.empty_like(logits)
    nll = xent.xent_rows(logits, torch.tensor([0]), out)
    # ln 3 rounded to bf16 moves the probabilities a little; fp32 is exact to rounding
    tol = 1e-6 if dtype == torch.float32 else 4e-3
    assert abs(nll.item() - math.log(4.0)) < tol
    torch.testing.assert_close(out.float(), torch.tensor([[-0.75, 0.75, 0.0]]), atol=tol, rtol=0)
    assert out[0, 2].item() == 0.0  # a masked logit gets exactly no probability


@pytest.mark.parametrize("vocab", [1, 3, 17, 1000, 50304])
def test_fp32_equals_pytorch(vocab) -> None:
    g = torch.Generator().manual_seed(vocab)
    logits = 4 * torch.randn(9, vocab, generator=g)
    targets = torch.randint(0, vocab, (9,), generator=g)
    ref_nll, ref_grad = reference(logits, targets)
    out = torch.empty_like(logits)
    nll = xent.xent_rows(logits, targets, out)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(out, ref_grad, rtol=1e-5, atol=1e-7)
    in_place = logits.clone()  # the form the loss uses: gradient over the logits
    torch.testing.assert_close(xent.xent_rows(in_place, targets, in_place), nll, rtol=0, atol=0)
    torch.testing.assert_close(in_place, out, rtol=0, atol=0)


def test_bf16_is_the_fp32_result_rounded() -> None:
    """bf16 logits: the loss is fp32's on the same logits, the gradient fp32's rounded to bf16 (to
    the nearest, ties to even; at most one bf16 step off where the exp differs in its last bit)."""
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(33, 50304, generator=g)).bfloat16()
    targets = torch.randint(0, 50304, (33,), generator=g)
    ref_nll, ref_grad = reference(logits, targets)
    out = torch.empty_like(logits)
    nll = xent.xent_rows(logits, targets, out)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-6, atol=2e-6)
    rounded = ref_grad.bfloat16()
    steps = (out.view(torch.int16).int() - rounded.view(torch.int16).int()).abs()
    assert steps.max() <= 1 and (steps == 0).float().mean() > 0.99


def test_strided_rows_and_a_separate_output() -> None:
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(5, 120, generator=g)
    logits, out = wide[:, :100], torch.zeros(5, 200)[:, 50:150]
    targets = torch.tensor([0, 99, 5, 50, 7])
    nll = xent.xent_rows(logits, targets, out)
    ref_nll, ref_grad = reference(logits, targets)
    torch.testing.assert_close(nll, ref_nll)
    torch.testing.assert_close(out, ref_grad)
    assert torch.equal(
        wide[:, 100:], torch.randn(5, 120, generator=torch.Generator().manual_seed(2))[:, 100:]
    )


def test_extreme_rows() -> None:
    """A NaN poisons its own row only; a target 200 nats down has loss 200, not inf."""
    logits = torch.zeros(3, 40)
    logits[0, 3] = math.nan
    logits[1, 0] = 200.0
    out = torch.empty_like(logits)
    nll = xent.xent_rows(logits, torch.tensor([0, 5, 1]), out)
    assert math.isnan(nll[0]) and out[0].isnan().all()
    assert abs(nll[1].item() - 200.0) < 1e-4 and torch.isfinite(out[1]).all()
    assert abs(nll[2].item() - math.log(40)) < 1e-6


def test_refuses_mismatched_buffers() -> None:
    with pytest.raises(ValueError, match="same dtype"):
        xent.xent_rows(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        xent.xent_rows(torch.zeros(3, 2).t(), torch.tensor([0, 1]), torch.zeros(2, 3))


def test_isa_limit_sets_the_target() -> None:
    env = dict(os.environ)
    try:
        os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
        limited = build.arch_flags()
        os.environ.pop("ATEN_CPU_CAPABILITY")
        native = build.arch_flags()
    finally:
        os.environ.clear()
        os.environ.update(env)
    if native:  # x86
        assert limited == ["-march=x86-64-v3"] and native == ["-march=native"]


def _load_in_process(cache: Path, **env: str) -> subprocess.CompletedProcess:
    code = (
        "import torch; from gpt2.kernels import xent; "
        "x = torch.randn(4, 300); t = torch.tensor([0, 1, 2, 299]); o = torch.empty_like(x); "
        "n = xent.xent_rows(x, t, o); r = torch.nn.functional.cross_entropy(x, t, reduction='none'); "
        "print(xent.fused_xent_available(), float((n - r).abs().max()))"
    )
    full = {**os.environ, "GPT2_KERNEL_CACHE": str(cache), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True)


def test_built_once_per_machine_and_by_concurrent_processes(tmp_path) -> None:
    """Two processes building into an empty cache at once both load a working library (atomic
    rename, no lock to wait on); a third reuses it; nothing half-written is left behind."""
    code = "from gpt2.kernels import xent; print(xent.fused_xent_available())"
    env = {**os.environ, "GPT2_KERNEL_CACHE": str(tmp_path)}
    run = [sys.executable, "-c", code]
    procs = [subprocess.Popen(run, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.communicate()[0].strip() for p in procs] == ["True", "True"]
    (built,) = tmp_path.iterdir()
    stamp = built.stat().st_mtime_ns
    done = _load_in_process(tmp_path)
    assert done.stdout.split()[0] == "True" and float(done.stdout.split()[1]) < 1e-5
    assert [p.name for p in tmp_path.iterdir()] == [built.name] and built.stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({"CC": "/bin/false"}, "/bin/false failed"),
        ({"GPT2_KERNEL_CACHE": "/proc/no/such"}, "cannot write to"),
    ],
)
def test_without_a_working_build_it_says_so_and_uses_pytorch(env, why, tmp_path) -> None:
    """A compiler that fails, or a cache that cannot be written: one warning saying why, ATen's
    ops with the same result, and nothing half-built left behind."""
    done = _load_in_process(tmp_path, **env)
    assert done.returncode == 0, done.stderr
    assert "fused loss kernel unavailable" in done.stderr and why in done.stderr, done.stderr
    assert done.stdout.split()[0] == "False" and float(done.stdout.split()[1]) < 1e-5
    assert not list(tmp_path.iterdir())
