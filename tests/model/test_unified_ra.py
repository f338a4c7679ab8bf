"""Unified Reciprocal Attention (reference §3, §5.1): exact scores, identities, fairness, cost, gates."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gpt2.model import GPT, GPTConfig
from gpt2.model.attention import CausalSelfAttention, UnifiedRAttention
from gpt2.model.gates import gate_stats
from gpt2.model.steps import apply_step
from tests.conftest import small_gpt_config


def ra_config(**overrides) -> GPTConfig:
    """4 heads of D=16 channels, 64 wide, 2 layers."""
    return small_gpt_config(**({"attention": "unified_ra"} | overrides))


EVERYTHING_ON = dict(self_restart=True, mlp="reciprocal", rmlp_rank=16, rmlp_mixer=True, rmlp_gates=True)


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter (weights, biases, gates) drawn at random, so no term can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def naive_unified_ra(m: UnifiedRAttention, x: torch.Tensor) -> torch.Tensor:
    """S_ij = (w_std·<q_std_i,k_std_j> + w_rec·<k_low_i,q_low_j>)/√D; causal softmax; A·V; restart; c_proj."""
    B, T, C = x.shape
    H, D, R = m.n_head, m.head_dim, m.rank
    qf, kf, v = (x @ m.c_attn.weight.T + m.c_attn.bias).split(C, dim=-1)
    heads = lambda t: t.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    qf, kf, v = heads(qf), heads(kf), heads(v)
    q_std, k_low = qf[..., : D - R], qf[..., D - R :]
    k_std, q_low = kf[..., : D - R], kf[..., D - R :]
    w_std, w_rec = m.w_std.reshape(-1), m.w_rec.reshape(-1)  # (H,) per head or (1,) per layer
    scores = torch.zeros(B, H, T, T, dtype=x.dtype)
    for i in range(T):
        for j in range(T):
            std = (q_std[:, :, i] * k_std[:, :, j]).sum(-1)
            rec = (k_low[:, :, i] * q_low[:, :, j]).sum(-1)
            scores[:, :, i, j] = (w_std * std + w_rec * rec) / math.sqrt(D)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    attn = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v
    if m.rwr_alpha is not None:
        a = m.rwr_alpha.clamp(0.0, 0.5).view(1, H, 1, 1)
        attn = (1 - a) * attn + a * v
    y = attn.transpose(1, 2).reshape(B, T, C)
    return y @ m.c_proj.weight.T + m.c_proj.bias


@pytest.mark.parametrize("rank", [2, 4, 8])
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("restart", [False, True])
@pytest.mark.parametrize("fold", [True, False])
def test_folded_single_sdpa_equals_naive_score_formula(
    rank: int, per_head: bool, restart: bool, fold: bool
) -> None:
    """Random weights and gates: the module equals the explicit per-pair score computation,
    with the gates in the projection weight or on the queries."""
    m = UnifiedRAttention(ra_config(ra_rank=rank, ra_per_head_gates=per_head, self_restart=restart)).double()
    m.fold_gates = lambda rows: fold
    randomize(m, seed=rank)
    if restart:  # values below 0, inside, and above 0.5: the clamp is part of the definition
        with torch.no_grad():
            m.rwr_alpha.copy_(torch.tensor([-0.3, 0.05, 0.4, 2.0]))
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(m(x), naive_unified_ra(m, x), rtol=0, atol=1e-12)


def test_unified_ra_is_causal() -> None:
    """Output at position t depends on inputs 0..t only; later edits change nothing before them."""
    m = UnifiedRAttention(ra_config(self_restart=True)).double().eval()
    randomize(m, seed=3)
    x = torch.randn(1, 10, 64, dtype=torch.float64)
    base = m(x)
    for t in (0, 4, 9):
        edited = x.clone()
        edited[:, t] += 1.0
        out = m(edited)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-6


@pytest.mark.parametrize("bias", [True, False])
def test_gates_one_equals_standard_attention_with_the_same_weights(bias: bool) -> None:
    """Reference §3.4: with w_std = w_rec = 1 the layer is standard causal attention."""
    cfg = ra_config(bias=bias)
    std = CausalSelfAttention(cfg).double()
    randomize(std, seed=5)
    ra = UnifiedRAttention(cfg).double()
    ra.load_state_dict(std.state_dict(), strict=False)
    with torch.no_grad():
        ra.w_std.fill_(1.0)
        ra.w_rec.fill_(1.0)
    x = torch.randn(3, 12, 64, dtype=torch.float64)
    torch.testing.assert_close(ra(x), std(x), rtol=0, atol=1e-14)
    if bias:  # training mode with dropout: the same dropout in the same places (same RNG draws)
        cfg = ra_config(bias=bias, dropout=0.2)
        std_d, ra_d = CausalSelfAttention(cfg).double().train(), UnifiedRAttention(cfg).double().train()
        std_d.load_state_dict(std.state_dict())
        ra_d.load_state_dict(ra.state_dict())
        torch.manual_seed(9)
        expected = std_d(x)
        torch.manual_seed(9)
        torch.testing.assert_close(ra_d(x), expected, rtol=0, atol=1e-14)
        torch.manual_seed(10)
        assert (ra_d(x) - expected).abs().max() > 1e-6  # dropout is really on
    with torch.no_grad():  # and the default gates (0.9, 0.1) really change it
        ra.w_std.fill_(0.9)
        ra.w_rec.fill_(0.1)
    assert (ra(x) - std(x)).abs().max() > 1e-4


def test_self_restart_with_alpha_zero_leaves_the_layer_unchanged() -> None:
    """rwr_alpha = 0 gives exactly the module without self-restart; alpha 0.5 (clamped) gives ½(attn + V)."""
    plain = UnifiedRAttention(ra_config()).double()
    randomize(plain, seed=7)
    restart = UnifiedRAttention(ra_config(self_restart=True)).double()
    restart.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    with torch.no_grad():
        restart.rwr_alpha.zero_()
        torch.testing.assert_close(restart(x), plain(x), rtol=0, atol=0)
        restart.rwr_alpha.fill_(0.05)
        assert (restart(x) - plain(x)).abs().max() > 1e-6


def test_same_seed_gives_v1_exactly_v0s_weights_bias_and_dropout() -> None:
    """Fair comparison: V1 = V0's modules, init, biases and dropout; only the gates are added."""
    base = ra_config(attention="standard", dropout=0.1)
    torch.manual_seed(0)
    v0 = GPT(apply_step(base, "V0"))
    torch.manual_seed(0)
    v1 = GPT(apply_step(base, "V1"))
    s0, s1 = v0.state_dict(), v1.state_dict()
    extra = set(s1) - set(s0)
    assert extra == {f"transformer.h.{i}.attn.{g}" for i in range(2) for g in ("w_std", "w_rec")}
    assert set(s0) <= set(s1)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    for block in v1.transformer.h:
        assert isinstance(block.attn, UnifiedRAttention)
        assert block.attn.c_attn.bias is not None and block.attn.c_proj.bias is not None
        assert block.attn.resid_dropout.p == 0.1 and block.attn.dropout == 0.1
    # Scaled residual init (N(0, 0.02/√(2L))) on the output projection, as the baseline.
    torch.manual_seed(1)
    big = GPT(ra_config(n_layer=4, n_embd=256, n_head=4))
    c_proj = torch.cat([b.attn.c_proj.weight.flatten() for b in big.transformer.h])
    assert abs(c_proj.std().item() - 0.02 / math.sqrt(8)) < 2e-4


def _forward_backward_flops(model: GPT, idx: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(idx, idx).backward()
    return counter.get_total_flops()


def test_v1_has_v0s_parameter_count_and_flops_up_to_the_gates() -> None:
    base = ra_config(attention="standard")
    v0, v1, v7 = (GPT(apply_step(base, s)) for s in ("V0", "V1", "V7"))
    assert v1.num_params() - v0.num_params() == 2 * base.n_head * base.n_layer
    assert v7.num_params() == v1.num_params()  # R moves the split, not the shapes
    idx = torch.randint(0, 96, (2, 32))
    flops = [_forward_backward_flops(m, idx) for m in (v0, v1, v7)]
    assert flops[0] > 0 and flops[0] == flops[1] == flops[2]


def test_per_layer_gates_are_scalars() -> None:
    m = UnifiedRAttention(ra_config(ra_per_head_gates=False))
    assert m.w_std.shape == () and m.w_rec.shape == ()
    m = UnifiedRAttention(ra_config())
    assert m.w_std.shape == (4,) and m.w_rec.shape == (4,)
    assert torch.all(m.w_std == 0.9) and torch.all(m.w_rec == 0.1)


def test_gates_and_restart_alpha_receive_gradients() -> None:
    m = UnifiedRAttention(ra_config(self_restart=True))
    randomize(m, seed=11)
    m(torch.randn(2, 8, 64)).square().sum().backward()
    for p in (m.w_std, m.w_rec, m.rwr_alpha):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_compiles_as_one_graph_with_every_mechanism_on() -> None:
    """No data-dependent Python branch and no .item(): dynamo traces the whole model without a break."""
    model = GPT(ra_config(**EVERYTHING_ON))
    idx = torch.randint(0, 96, (2, 16))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(idx, idx), model(idx, idx))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(ra_rank=16), r"ra_rank must be in \[1, head_dim=16\), got 16"),
        (dict(ra_rank=0), r"ra_rank"),
        (dict(attention="standard", self_restart=True), r"self_restart needs attention='unified_ra'"),
    ],
)
def test_invalid_unified_ra_config_raises(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        GPT(ra_config(**overrides))


def test_gate_stats_keys_and_values(monkeypatch) -> None:
    cfg = ra_config(self_restart=True, mlp="reciprocal", rmlp_rank=16, rmlp_gates=True)
    model = GPT(cfg)
    with torch.no_grad():
        model.transformer.h[1].attn.w_rec[2] = 0.7
        model.transformer.h[0].attn.rwr_alpha[3] = 0.9  # reported clamped: 0.5
        model.transformer.h[1].mlp.w_std.fill_(0.5)
    calls = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(t.shape) or real_tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("gate_stats used .item()"))
    stats = gate_stats(model)
    assert len(calls) == 1, "gates must be read from the device in one copy"
    assert stats["gates/L1/attn_w_rec_h2"] == pytest.approx(0.7)
    assert stats["gates/L0/attn_w_rec_h2"] == pytest.approx(0.1)
    assert stats["gates/attn_w_rec_mean"] == pytest.approx((7 * 0.1 + 0.7) / 8)
    assert stats["gates/attn_w_rec_max"] == pytest.approx(0.7)
    assert stats["gates/L0/attn_restart_alpha_h3"] == pytest.approx(0.5)
    assert stats["gates/L1/mlp_w_std"] == pytest.approx(0.5)
    assert stats["gates/mlp_w_std_mean"] == pytest.approx(0.7)
    assert stats["gates/mlp_gate_alpha_std"] == 0.0
    assert "gates/mlp_w_rec_mean" in stats and "gates/L0/mlp_gate_alpha" in stats
    assert all(isinstance(v, float) for v in stats.values())
    # per-layer gates: one key per layer, no head suffix; a model without gates has none
    per_layer = gate_stats(GPT(ra_config(ra_per_head_gates=False)))
    assert "gates/L0/attn_w_std" in per_layer and "gates/L0/attn_w_std_h0" not in per_layer
    assert gate_stats(GPT(ra_config(attention="standard"))) == {}
    assert gate_stats(GPT(ra_config(n_layer=1, ra_per_head_gates=False)))["gates/attn_w_std_std"] == 0.0


def test_bfloat16_autocast_forward_backward() -> None:
    """The gates fold into the weights under autocast too (dtype mixing must not fail)."""
    model = GPT(ra_config(**EVERYTHING_ON))
    idx = torch.randint(0, 96, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and model.transformer.h[0].attn.rwr_alpha.grad is not None


def test_gates_in_the_weight_or_on_the_queries_give_the_same_gradients() -> None:
    """The two placements of the gates are one function: equal outputs and every gradient."""
    grads = []
    for fold in (True, False):
        m = UnifiedRAttention(ra_config(self_restart=True)).double()
        randomize(m, seed=3)
        m.fold_gates = lambda rows, fold=fold: fold
        x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        m(x).square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-12, msg=name)


def test_gates_go_where_they_cost_least() -> None:
    m = UnifiedRAttention(ra_config())  # 64 wide: the weight has 192 rows
    assert m.fold_gates(16 * 1024) and m.fold_gates(192) and not m.fold_gates(191)
