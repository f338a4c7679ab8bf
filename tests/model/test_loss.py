"""The chunked LM loss equals the plain cross-entropy: value and both gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2.kernels import build, xent
from gpt2.model import loss as lm
from tests.conftest import OpNames


@pytest.fixture(params=["fused", "aten"], autouse=True)
def loss_path(request, monkeypatch) -> str:
    """Every test here runs on the fused kernel and on ATen's formulation it replaces."""
    if request.param == "aten":
        monkeypatch.setenv(xent.FUSED_ENV, "0")
    if request.param == "fused" and build.compiler() is None:
        pytest.skip("no C compiler here: the loss runs on ATen's ops")
    xent._kernel.cache_clear()
    if request.param == "fused" and not xent.fused_xent_available():
        pytest.fail("a C compiler is here, yet the fused loss kernel did not build")
    yield request.param
    xent._kernel.cache_clear()


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_chunked_loss_and_gradients_equal_plain_cross_entropy(chunk_rows, sparse, monkeypatch) -> None:
    monkeypatch.setattr(lm, "CHUNK_BYTES", chunk_rows * 4 * 97)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, dtype=torch.float32, requires_grad=True)
    w = (0.3 * torch.randn(97, 16, generator=g)).requires_grad_()
    t = torch.randint(0, 97, (50,), generator=g)
    t[[3, 17, 40]] = -1  # ignored positions

    loss = lm.lm_loss(h, w, t, sparse)
    (2.5 * loss).backward()  # a non-unit upstream gradient must scale both gradients
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-1)
    (2.5 * ref).backward()

    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)


class _MatmulRows(OpNames):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("mm."):
            self.names.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


def test_sparse_targets_run_the_head_on_the_scored_rows_only() -> None:
    h = torch.randn(64, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    t = torch.full((64,), -1)
    t[[9, 30, 41, 60]] = torch.tensor([1, 2, 3, 4])
    with _MatmulRows() as rows:
        loss = lm.lm_loss(h, w, t, sparse=True)
    assert rows.names and max(rows.names) <= 50, rows.names  # (the weight gradient's mm has 50 rows)
    assert 4 in rows.names and 64 not in rows.names
    loss.backward()
    assert h.grad[t == -1].abs().max() == 0  # the unscored rows still get their (zero) gradient


def test_no_gradient_work_under_no_grad() -> None:
    """Evaluation (no_grad) of a model whose weights require grad must not compute gradients."""
    h = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(11, 4, requires_grad=True)
    t = torch.randint(0, 11, (8,))
    with torch.no_grad(), OpNames() as ops:
        out = lm.lm_loss(h, w, t)
    assert sum(n.startswith("mm.") for n in ops.names) == 1, ops.names
    with torch.no_grad():
        torch.testing.assert_close(out, F.cross_entropy(h @ w.t(), t))
    with OpNames() as ops:  # the same call with grad enabled does the gradient work
        lm.lm_loss(h, w, t)
    assert sum(n.startswith("mm.") for n in ops.names) == 3, ops.names


def test_loss_exact_where_the_target_probability_underflows() -> None:
    """A target ~200 nats below the best logit has softmax probability 0 in fp32: the loss must
    still be that 200-odd (exact logsumexp route), not inf, and the gradient finite."""
    h = torch.zeros(3, 2)
    h[:, 0] = 1.0
    w = torch.tensor([[100.0, 0.0], [-100.0, 0.0], [0.0, 0.0]], requires_grad=True)
    t = torch.tensor([1, 0, 2])  # row 0: p = exp(-200), far below fp32's smallest number
    loss = lm.lm_loss(h, w, t)
    ref = F.cross_entropy(h @ w.t(), t)
    assert torch.isfinite(loss) and loss.item() > 60
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert torch.isfinite(w.grad).all()


def _autocast_reference(h, w, t):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(h, w)
    return F.cross_entropy(logits.float(), t, ignore_index=-1)


@pytest.mark.parametrize("chunk_rows", [7, 64])
def test_bf16_chunked_loss_matches_autocast_cross_entropy(chunk_rows, monkeypatch) -> None:
    """Under CPU bf16 autocast: bf16 matmuls, fp32 softmax; the same as autocast's linear + CE."""
    monkeypatch.setattr(lm, "CHUNK_BYTES", chunk_rows * 2 * 97)  # (bf16 rows)
    lm._kept_buffers.clear()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(97, 16, generator=g)).requires_grad_()
    t = torch.randint(0, 97, (50,), generator=g)
    t[[0, 9]] = -1

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm.lm_loss(h, w, t)
    (3.0 * loss).backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = _autocast_reference(h, w, t)
    (3.0 * ref).backward()

    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)  # same bf16 logits, fp32 softmax
    # gradients differ from autocast's only by where bf16 rounding happens (the logit gradient)
    torch.testing.assert_close(gh, h.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw, w.grad, rtol=2e-2, atol=2e-3)
    # ... and their overall scale is fp32's: bf16 rounding averages out over the elements, a
    # uniform error (1/count rounded to bf16 is 0.2% off for count 48) does not
    h.grad = w.grad = None
    F.cross_entropy(h @ w.t(), t, ignore_index=-1).mul(3.0).backward()
    for ours, fp32 in ((gh, h.grad), (gw, w.grad)):
        assert abs(float((ours * fp32).sum() / (fp32 * fp32).sum()) - 1) < 1e-3
    lm._kept_buffers.clear()


def test_second_backward_fails_loudly() -> None:
    """The gradients are scaled in place on the first backward; a second must not rescale them."""
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    loss = lm.lm_loss(h, w, torch.randint(0, 9, (6,)))
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_with_the_chunked_loss_traces_as_one_graph(dtype) -> None:
    """--compile on CPU: one graph, no breaks, same loss as eager, in fp32 and under bf16 autocast."""
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=1, n_head=2, n_embd=16))
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        loss = compiled(x, y)
        ref = model(x, y)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    assert model.lm_head.weight.grad is not None


def test_compiled_bf16_loss_keeps_no_fp32_logits_for_backward() -> None:
    """The compiled path (what CUDA runs with --compile): between forward and backward the 50k-wide
    logits are kept once, in bf16, with two per-row statistics; never as fp32 log-probabilities.

    The backend below is inductor's front half (its decompositions and its min-cut partitioner),
    recording what the forward graph saves; without the decompositions the partitioner would keep
    the fp32 log-softmax (twice the memory), so this checks a property of the whole compiled path.
    """
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.decomposition import select_decomp_table

    saved: list[torch.Tensor] = []

    def forward_compiler(gm, _inputs):
        (outputs,) = (n.args[0] for n in gm.graph.nodes if n.op == "output")
        saved.extend(o.meta["val"] for o in outputs if hasattr(o, "meta") and "val" in o.meta)
        return make_boxed_func(gm.forward)

    def backend(gm, inputs):
        return aot_module_simplified(
            gm,
            inputs,
            fw_compiler=forward_compiler,
            bw_compiler=lambda g, _: make_boxed_func(g.forward),
            partition_fn=min_cut_rematerialization_partition,
            decompositions=select_decomp_table(),
        )

    n, c, v = 64, 16, 1000
    h, w = torch.randn(n, c, requires_grad=True), torch.randn(v, c, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.compile(lm.lm_loss, backend=backend, fullgraph=True)(h, w, targets)
    loss.backward()
    wide = [t for t in saved if t.dim() == 2 and t.shape[1] == v and t.shape[0] == n]
    assert [t.dtype for t in wide] == [torch.bfloat16], [(tuple(t.shape), t.dtype) for t in saved]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), targets)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
