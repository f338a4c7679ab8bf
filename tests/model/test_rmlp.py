"""Reciprocal MLP (reference §4.1) and the MLP width option: identities, cost, init, bias."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from gpt2.model import GPT, GPTConfig
from gpt2.model.mlp import MLP, ReciprocalMLP
from gpt2.model.steps import apply_step
from tests.conftest import small_gpt_config


def mlp_config(**overrides) -> GPTConfig:
    """64 wide, 4x -> 256 hidden channels, 16 of them reciprocal."""
    return small_gpt_config(**({"mlp": "reciprocal", "rmlp_rank": 16} | overrides))


def randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def x64(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("bias", [True, False])
def test_gates_one_equals_a_standard_mlp_with_stacked_up_projections(bias: bool) -> None:
    cfg = mlp_config(bias=bias)
    r = ReciprocalMLP(cfg).double()
    randomize(r, seed=1)
    with torch.no_grad():
        r.w_std.fill_(1.0)
        r.w_rec.fill_(1.0)
    m = MLP(mlp_config(mlp="standard", bias=bias)).double()
    with torch.no_grad():
        m.c_fc.weight.copy_(torch.cat([r.up_std.weight, r.up_low.weight]))
        m.c_proj.weight.copy_(r.down.weight)
        if bias:
            m.c_fc.bias.copy_(torch.cat([r.up_std.bias, r.up_low.bias]))
            m.c_proj.bias.copy_(r.down.bias)
    torch.testing.assert_close(r(x64()), m(x64()), rtol=0, atol=1e-13)


def test_reciprocal_gate_zero_equals_a_baseline_mlp_of_the_standard_width() -> None:
    """w_rec = 0, w_std = 1: an ordinary MLP of width D_ff - R_ff (up_std, and down's first columns)."""
    cfg = mlp_config()
    r = ReciprocalMLP(cfg).double()
    randomize(r, seed=2)
    with torch.no_grad():
        r.w_std.fill_(1.0)
        r.w_rec.fill_(0.0)
    narrow = MLP(mlp_config(mlp="standard", mlp_expansion=(256 - 16) / 64)).double()
    assert narrow.c_fc.out_features == 240
    with torch.no_grad():
        narrow.c_fc.weight.copy_(r.up_std.weight)
        narrow.c_fc.bias.copy_(r.up_std.bias)
        narrow.c_proj.weight.copy_(r.down.weight[:, :240])
        narrow.c_proj.bias.copy_(r.down.bias)
    torch.testing.assert_close(r(x64()), narrow(x64()), rtol=0, atol=1e-13)


@pytest.mark.parametrize(("mixer", "gates"), [(False, False), (True, False), (False, True), (True, True)])
def test_every_variant_equals_the_explicit_formula(mixer: bool, gates: bool) -> None:
    """h = [w_std·GELU(up_std x) | w_rec·α·(M·GELU(up_low x) + b)], y = down(h): outputs and the
    gradient of every parameter (the module folds gates and mixer into the weights)."""
    r = ReciprocalMLP(mlp_config(rmlp_mixer=mixer, rmlp_gates=gates)).double()
    randomize(r, seed=3)
    x = x64(4)
    h_std = F.gelu(x @ r.up_std.weight.T + r.up_std.bias)
    h_low = F.gelu(x @ r.up_low.weight.T + r.up_low.bias)
    if mixer:
        h_low = h_low @ r.mixer_weight.T + r.mixer_bias
    if gates:
        h_low = h_low * r.gate_alpha
    h = torch.cat([r.w_std * h_std, r.w_rec * h_low], dim=-1)
    expected = h @ r.down.weight.T + r.down.bias
    params = list(r.parameters())
    want = torch.autograd.grad((expected * expected).sum(), params)
    got = r(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    for p, g, w in zip(params, torch.autograd.grad((got * got).sum(), params), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=str(p.shape))


def test_mixer_starts_as_the_identity_so_v4_starts_as_v3() -> None:
    torch.manual_seed(0)
    v3 = GPT(apply_step(mlp_config(mlp="standard"), "V3"))
    torch.manual_seed(0)
    v4 = GPT(apply_step(mlp_config(mlp="standard"), "V4"))
    assert torch.equal(v4.transformer.h[0].mlp.mixer_weight, torch.eye(64))
    idx = torch.randint(0, 96, (2, 16))
    torch.testing.assert_close(v4(idx), v3(idx), rtol=0, atol=0)


def _flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x).sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("bias", [True, False])
def test_same_flops_and_parameters_as_the_baseline_mlp_up_to_two_gates(bias: bool) -> None:
    r, m = ReciprocalMLP(mlp_config(bias=bias)), MLP(mlp_config(mlp="standard", bias=bias))
    count = lambda mod: sum(p.numel() for p in mod.parameters())
    assert count(r) == count(m) + 2
    x = torch.randn(2, 8, 64)
    assert _flops(r, x) == _flops(m, x) > 0
    if not bias:
        assert all(p.dim() != 1 for p in r.parameters()), "bias=False must leave no bias vectors"


def test_init_follows_gpt2_scheme_with_scaled_residual_projection() -> None:
    torch.manual_seed(0)
    cfg = mlp_config(n_layer=4, n_embd=256, rmlp_rank=64)
    model = GPT(cfg)
    mlp = model.transformer.h[0].mlp
    assert abs(mlp.up_std.weight.std().item() - 0.02) < 1e-3
    assert abs(mlp.up_low.weight.std().item() - 0.02) < 2e-3
    down = torch.cat([b.mlp.down.weight.flatten() for b in model.transformer.h])
    assert abs(down.std().item() - 0.02 / math.sqrt(8)) < 2e-4
    assert torch.all(mlp.up_std.bias == 0) and torch.all(mlp.down.bias == 0)
    assert mlp.w_std.item() == pytest.approx(0.9) and mlp.w_rec.item() == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["standard", "reciprocal"])
def test_mlp_expansion_sets_the_real_hidden_width(kind: str) -> None:
    cfg = mlp_config(mlp=kind, mlp_expansion=6.0)
    mod = GPT(cfg).transformer.h[0].mlp
    if kind == "standard":
        assert mod.c_fc.out_features == mod.c_proj.in_features == 384
    else:
        assert mod.up_std.out_features + mod.up_low.out_features == mod.down.in_features == 384


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(rmlp_rank=256), r"rmlp_rank must be in \[1, MLP width=256\), got 256"),
        (dict(mlp="standard", rmlp_mixer=True), r"need mlp='reciprocal'"),
    ],
)
def test_invalid_rmlp_config_raises(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        GPT(mlp_config(**overrides))
