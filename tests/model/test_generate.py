"""Generation with a KV cache: the same tokens as recomputing the whole context for every token."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gpt2.model import GPT
from gpt2.model.attention import KVCache
from gpt2.model.steps import apply_step
from tests.conftest import small_gpt_config


def _model(step: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(apply_step(small_gpt_config(block_size=32), step)).eval()
    with torch.no_grad():  # spread the logits, so greedy decoding has no near-ties
        model.transformer.wte.weight.mul_(20.0)
        for block in model.transformer.h:
            if getattr(block.attn, "rwr_alpha", None) is not None:
                block.attn.rwr_alpha.fill_(0.3)  # self-restart visibly on
    return model


@pytest.mark.parametrize("step", ["V0", "V1", "V2", "V3", "V6"])
@pytest.mark.parametrize("new", [20, 45], ids=["within-block", "past-the-block"])
def test_greedy_decoding_with_the_cache_gives_the_uncached_tokens(step, new) -> None:
    model = _model(step)
    prompt = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    cached = model.generate(prompt, new, temperature=0.0)
    uncached = model.generate(prompt, new, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape == (2, 5 + new)


@pytest.mark.parametrize("step", ["V0", "V2"])
def test_one_position_at_a_time_gives_the_full_forward_hidden_states(step) -> None:
    model = _model(step)
    idx = torch.randint(0, 96, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model.hidden_states(idx)
        cache = KVCache(model.config.n_layer, 32)
        parts = [model.hidden_states(idx[:, :7], cache)]
        parts += [model.hidden_states(idx[:, t : t + 1], cache) for t in range(7, 32)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_a_prefill_after_cached_positions_masks_causally() -> None:
    model = _model("V1")
    idx = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model.hidden_states(idx)
        cache = KVCache(model.config.n_layer, 32)
        a = model.hidden_states(idx[:, :8], cache)
        b = model.hidden_states(idx[:, 8:], cache)  # 12 positions after 8 cached ones
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_pruning_generates_without_a_cache() -> None:
    model = GPT(replace(apply_step(small_gpt_config(block_size=32), "V14"), kv_keep=0.25, kv_recent=0.125))
    assert not model.supports_kv_cache
    prompt = torch.randint(0, 96, (1, 4))
    out = model.eval().generate(prompt, 10, temperature=0.0)
    assert torch.equal(out, model.generate(prompt, 10, temperature=0.0, use_cache=False))
