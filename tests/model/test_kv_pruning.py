"""KV pruning attention (V14-V19, C1-C3): exact where nothing is pruned, strictly causal, a real
pruning otherwise, the gather and mask computations agree, and the learned ratio gets a gradient."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gpt2.model import GPT
from gpt2.model.attention import PrunedKVAttention
from gpt2.model.steps import apply_step
from tests.conftest import small_gpt_config

T = 32


def _config(step: str = "V19", **overrides):
    return replace(apply_step(small_gpt_config(block_size=T, dropout=0.0), step), **overrides)


def _logits(config, idx: torch.Tensor, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        return model.lm_head(model.hidden_states(idx))


@pytest.fixture
def idx() -> torch.Tensor:
    return torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("attention", ["kv_pruned", "v_pruned"])
def test_keeping_every_key_is_standard_attention_exactly(idx, attention) -> None:
    want = _logits(_config("V0"), idx)
    got = _logits(_config("V0", attention=attention, kv_keep=1.0), idx)
    assert torch.equal(got, want)


@pytest.mark.parametrize("attention", ["kv_pruned", "v_pruned"])
def test_a_mask_that_keeps_every_key_matches_standard_attention(idx, attention) -> None:
    """k + recent = T through the masked path (not the SDPA shortcut): the same function."""
    want = _logits(_config("V0"), idx)
    got = _logits(_config("V0", attention=attention, kv_keep=0.5, kv_recent=0.5), idx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


CAUSAL_VARIANTS = {
    "kv": dict(attention="kv_pruned", kv_keep=0.25, kv_recent=0.125),
    "kv-gather": dict(attention="kv_pruned", kv_keep=0.25, kv_recent=0.125, kv_gather=True),
    "v": dict(attention="v_pruned", kv_keep=0.25, kv_recent=0.125),
    "kv-learned": dict(attention="kv_pruned", kv_keep=0.25, kv_recent=0.125, kv_learned=True),
    "v-compressed": dict(attention="v_pruned", kv_keep=0.25, kv_recent=0.125, kv_v_rank=4),
}


@pytest.mark.parametrize("variant", CAUSAL_VARIANTS, ids=str)
def test_no_position_sees_a_later_token(idx, variant) -> None:
    """Changing the tokens from position t on leaves every output before t unchanged: the key
    selection too sees no later token."""
    config = _config("V0", **CAUSAL_VARIANTS[variant])
    base = _logits(config, idx)
    for t in (5, 17, 30):
        changed = idx.clone()
        changed[:, t:] = (changed[:, t:] + 7) % 64
        out = _logits(config, changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t:], base[:, t:])


def test_pruning_changes_the_function_and_keeps_k_plus_recent_keys(idx) -> None:
    config = _config("V0", attention="kv_pruned", kv_keep=0.25, kv_recent=0.125)  # k = 8, r = 4
    assert not torch.allclose(_logits(config, idx), _logits(_config("V0"), idx), atol=1e-3)
    attn = PrunedKVAttention(config)
    scores = torch.randn(1, 1, T, T).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    kept = (attn._importance_rank(scores, causal) < attn.keep + attn.recent) & causal
    counts = kept.sum(-1).flatten().tolist()
    assert counts == [min(i + 1, 12) for i in range(T)]
    i = torch.arange(T)
    recent = causal & (i.view(1, T) > i.view(T, 1) - 4)
    assert kept[0, 0][recent].all(), "the latest positions are always kept"


def test_gather_and_mask_compute_the_same_attention(idx) -> None:
    mask = _logits(_config("V0", attention="kv_pruned", kv_keep=0.25, kv_recent=0.125), idx)
    gather = _logits(_config("V0", attention="kv_pruned", kv_keep=0.25, kv_recent=0.125, kv_gather=True), idx)
    torch.testing.assert_close(gather, mask, rtol=1e-5, atol=1e-5)


def test_values_only_pruning_differs_from_kv_pruning(idx) -> None:
    kv = _logits(_config("V0", attention="kv_pruned", kv_keep=0.25, kv_recent=0.125), idx)
    v = _logits(_config("V0", attention="v_pruned", kv_keep=0.25, kv_recent=0.125), idx)
    assert not torch.allclose(kv, v, atol=1e-4)


def test_the_learned_keep_ratio_gets_a_gradient(idx) -> None:
    torch.manual_seed(0)
    model = GPT(_config("V15"))
    model(idx, idx).backward()
    ratios = [b.attn.keep_ratio for b in model.transformer.h]
    assert all(r.grad is not None and r.grad.abs() > 0 for r in ratios)


def test_full_rank_value_compression_starts_as_the_identity(idx) -> None:
    d = small_gpt_config().n_embd // small_gpt_config().n_head
    plain = _logits(_config("V19"), idx)
    compressed = _logits(_config("V19", kv_v_rank=d), idx)
    torch.testing.assert_close(compressed, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step", ["V12", "V14", "V15", "V16", "V19", "C1"])
def test_steps_compile_without_graph_breaks(idx, step) -> None:
    """The schedules change values (w_rec, the coupling buffer), never the code path."""
    torch._dynamo.reset()
    config = _config(step, kv_v_rank=4) if step == "C1" else _config(step)
    model = GPT(config)
    explanation = torch._dynamo.explain(model)(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_the_learned_ratio_gradient_is_finite_in_half_precision(idx) -> None:
    torch.manual_seed(0)
    model = GPT(_config("V15")).half()
    with torch.autocast("cpu", dtype=torch.float16, enabled=False):
        model(idx, idx).float().backward()
    assert all(torch.isfinite(b.attn.keep_ratio.grad) for b in model.transformer.h)
