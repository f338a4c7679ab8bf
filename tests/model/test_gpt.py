"""Tests of the GPT-2 model (spec §2): causality, HF parity, shapes, init, training, generation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt2.model import GPT, GPTConfig


def tiny_config(**overrides) -> GPTConfig:
    """A 2-layer, 4-head, 64-wide model with a 96-token vocab and 32-token context."""
    cfg = dict(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=True)
    cfg.update(overrides)
    return GPTConfig(**cfg)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides)).to(dtype).eval()


def random_tokens(cfg: GPTConfig, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=g)


# --------------------------------------------------------------------------------------------
# 1. Causality
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(bias: bool) -> None:
    """Position i's logits depend only on tokens 0..i; positions >= the edit do change."""
    model = tiny_model(dtype=torch.float64, bias=bias)
    cfg = model.config
    idx = random_tokens(cfg, 2, cfg.block_size)
    with torch.no_grad():
        base = model(idx)
        for t in (0, 1, cfg.block_size // 2, cfg.block_size - 1):
            edited = idx.clone()
            edited[:, t] = (edited[:, t] + 1) % cfg.vocab_size
            out = model(edited)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-12)
            # every position from t onwards sees the changed token
            diff = (out[:, t:] - base[:, t:]).abs().amax(dim=-1)
            assert (diff > 1e-6).all(), f"positions >= {t} did not react to the edit at {t}"


def test_gradient_of_a_position_never_reaches_future_embeddings() -> None:
    """d loss_i / d token-embedding_j is exactly zero for every j > i (no leak through any path)."""
    model = tiny_model(dtype=torch.float64)
    cfg = model.config
    T = 12
    idx = random_tokens(cfg, 1, T)
    emb = model.transformer.wte(idx).detach().requires_grad_(True)
    captured = {}

    def swap_embedding(_module, _inputs, _output):
        captured["used"] = True
        return emb

    handle = model.transformer.wte.register_forward_hook(swap_embedding)
    try:
        logits = model(idx)
    finally:
        handle.remove()
    assert captured["used"]
    for i in range(T):
        (grad,) = torch.autograd.grad(logits[0, i].sum(), emb, retain_graph=True)
        per_pos = grad[0].abs().sum(dim=-1)
        assert torch.all(per_pos[i + 1 :] == 0), f"position {i} depends on a later position"
        assert torch.all(per_pos[: i + 1] > 0), f"position {i} ignores an earlier position"


# --------------------------------------------------------------------------------------------
# 2. Hugging Face parity
# --------------------------------------------------------------------------------------------


def hf_to_gpt_state_dict(hf_state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """Map a transformers ``GPT2LMHeadModel`` state dict onto ours.

    HF's ``Conv1D`` stores weights as (in, out), the transpose of ``nn.Linear``; the LM head is
    tied to ``wte`` in both models.
    """
    conv1d = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    out = {
        "transformer.wte.weight": hf_state["transformer.wte.weight"],
        "transformer.wpe.weight": hf_state["transformer.wpe.weight"],
        "transformer.ln_f.weight": hf_state["transformer.ln_f.weight"],
        "transformer.ln_f.bias": hf_state["transformer.ln_f.bias"],
        "lm_head.weight": hf_state["transformer.wte.weight"],
    }
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[p + ln + ".weight"] = hf_state[p + ln + ".weight"]
            out[p + ln + ".bias"] = hf_state[p + ln + ".bias"]
        for name in conv1d:
            out[p + name + ".weight"] = hf_state[p + name + ".weight"].t().contiguous()
            out[p + name + ".bias"] = hf_state[p + name + ".bias"]
    return out


def test_logits_and_loss_match_huggingface_gpt2(tmp_path, monkeypatch) -> None:
    """With HF GPT-2's weights (exact GELU, no dropout), our logits and loss equal HF's."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    cfg = tiny_config()
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(123)
    hf = transformers.GPT2LMHeadModel(hf_cfg)
    # Randomise every tensor (biases and LayerNorm affine too) so a mis-mapped one shows up.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1 if name.endswith("bias") else 0.05)
    hf.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path, local_files_only=True, attn_implementation="eager"
    ).eval()
    assert hf.config.activation_function == "gelu"

    ours = GPT(cfg).eval()
    ours.load_state_dict(hf_to_gpt_state_dict(hf.state_dict(), cfg.n_layer), strict=True)
    assert ours.lm_head.weight is ours.transformer.wte.weight

    idx = random_tokens(cfg, 3, cfg.block_size, seed=7)
    with torch.no_grad():
        hf_out = hf(input_ids=idx, labels=idx)
        logits = ours(idx)
        loss = ours(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
    assert logits.shape == hf_out.logits.shape == (3, cfg.block_size, cfg.vocab_size)
    torch.testing.assert_close(logits, hf_out.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, hf_out.loss, rtol=1e-6, atol=1e-6)
    # the comparison is not vacuous: logits are far from uniform
    assert logits.std() > 0.1


# --------------------------------------------------------------------------------------------
# 3. Parameter count and tying
# --------------------------------------------------------------------------------------------


def test_gpt2_parameter_count_and_tied_head() -> None:
    """GPT-2 small (vocab 50304) has 123,689,472 params without wpe, 124,475,904 in total."""
    model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_params() == 123_689_472
    assert model.num_params(non_embedding=False) == 124_475_904
    assert f"{model.num_params() / 1e6:.2f}M" == "123.69M"


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_matches_the_closed_form(bias: bool) -> None:
    """Per block 12C² (+13C biases/LN with bias, +2C LN weights without); head shares wte."""
    cfg = tiny_config(bias=bias)
    C, L, V, T = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.block_size
    per_block = 12 * C * C + (13 * C if bias else 2 * C)
    ln_f = 2 * C if bias else C
    expected = V * C + L * per_block + ln_f
    model = GPT(cfg)
    assert model.num_params() == expected
    assert model.num_params(non_embedding=False) == expected + T * C
    assert len({id(p) for p in model.parameters()}) == len(list(model.parameters()))
    assert "lm_head.weight" not in dict(model.named_parameters())  # counted once, under wte


# --------------------------------------------------------------------------------------------
# 4. Initialisation
# --------------------------------------------------------------------------------------------


def test_init_statistics() -> None:
    """Linear/Embedding weights ~N(0, 0.02), residual c_proj ~N(0, 0.02/√(2L)), biases 0, LN = (1, 0)."""
    L = 4
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=2048, n_layer=L, n_head=4, n_embd=256))
    resid_std = 0.02 / math.sqrt(2 * L)
    seen_resid = seen_plain = 0
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - resid_std) < 0.05 * resid_std, name
            assert abs(p.mean().item()) < 0.05 * resid_std, name
            seen_resid += 1
        elif p.dim() == 2:  # c_attn, c_fc, wte (= lm_head), wpe
            assert abs(p.std().item() - 0.02) < 0.05 * 0.02, name
            assert abs(p.mean().item()) < 0.05 * 0.02, name
            seen_plain += 1
        elif ".ln_" in name or "ln_f" in name:
            expected = 1.0 if name.endswith("weight") else 0.0
            assert torch.all(p == expected), name
        else:
            assert name.endswith(".bias"), name
            assert torch.all(p == 0), name
    assert seen_resid == 2 * L
    assert seen_plain == 2 * L + 2


def test_no_bias_config_has_no_bias_parameters() -> None:
    """bias=False removes every bias: Linears and LayerNorms alike."""
    model = GPT(tiny_config(bias=False))
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if n.endswith("bias")]
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.LayerNorm)):
            assert m.bias is None
    with torch.no_grad():
        assert model(random_tokens(model.config, 1, 8)).shape == (1, 8, model.config.vocab_size)


# --------------------------------------------------------------------------------------------
# 5. Training signal
# --------------------------------------------------------------------------------------------


def test_loss_respects_ignore_index_and_equals_cross_entropy() -> None:
    """The loss is the mean CE over targets != -1 of the returned logits."""
    model = tiny_model()
    cfg = model.config
    idx = random_tokens(cfg, 2, 16, seed=3)
    targets = random_tokens(cfg, 2, 16, seed=4)
    targets[0, :5] = -1
    targets[1, 10:] = -1
    with torch.no_grad():
        logits = model(idx)
        loss = model(idx, targets)
    keep = targets != -1
    expected = F.cross_entropy(logits[keep], targets[keep])
    assert loss.dim() == 0
    torch.testing.assert_close(loss, expected)
    # a fresh model predicts roughly uniformly
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.5


def test_loss_accepts_non_contiguous_targets() -> None:
    """Targets sliced from one (B, T+1) buffer (x = d[:, :-1], y = d[:, 1:]) give the same loss."""
    model = tiny_model()
    data = random_tokens(model.config, 2, 17, seed=6)
    x, y = data[:, :-1], data[:, 1:]
    assert not y.is_contiguous()
    with torch.no_grad():
        expected = model(x.contiguous(), y.contiguous())
        torch.testing.assert_close(model(x, y), expected, rtol=0, atol=0)


def test_tiny_model_overfits_a_fixed_batch() -> None:
    """150 AdamW steps on one batch take the loss from ~ln(V) to below 0.1."""
    model = tiny_model(seed=0, vocab_size=64, block_size=16)
    model.train()
    cfg = model.config
    data = random_tokens(cfg, 4, cfg.block_size + 1, seed=5)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = model(x, y).item()
    assert abs(first - math.log(cfg.vocab_size)) < 0.5
    for _ in range(150):
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = model.eval()(x, y).item()
    assert final < 0.1, f"loss only fell from {first:.3f} to {final:.3f}"


# --------------------------------------------------------------------------------------------
# 6. Generation
# --------------------------------------------------------------------------------------------


def test_generate_shape_prefix_and_range() -> None:
    """generate appends exactly max_new_tokens valid ids and keeps the prompt."""
    model = tiny_model()
    cfg = model.config
    idx = random_tokens(cfg, 2, 5)
    g = torch.Generator().manual_seed(0)
    out = model.generate(idx, 7, generator=g)
    assert out.shape == (2, 12)
    assert out.dtype == idx.dtype
    assert torch.equal(out[:, :5], idx)
    assert out.min() >= 0 and out.max() < cfg.vocab_size
    assert model.generate(idx, 0).shape == idx.shape


def test_generate_crops_long_context_to_block_size() -> None:
    """A prompt longer than block_size works and only the last block_size tokens are seen."""
    model = tiny_model()
    cfg = model.config
    idx = random_tokens(cfg, 2, 2 * cfg.block_size + 3)
    lengths = []
    handle = model.transformer.wte.register_forward_hook(lambda _m, inp, _o: lengths.append(inp[0].shape[1]))
    try:
        out = model.generate(idx, 4, temperature=0.0)
    finally:
        handle.remove()
    assert out.shape == (2, idx.shape[1] + 4)
    assert lengths == [cfg.block_size] * 4
    with torch.no_grad():
        expected_first = model(idx[:, -cfg.block_size :])[:, -1].argmax(-1)
    assert torch.equal(out[:, idx.shape[1]], expected_first)


def test_greedy_generation_is_deterministic_and_matches_argmax() -> None:
    """temperature=0 picks argmax of the last-position logits at every step, identically each call."""
    model = tiny_model()
    cfg = model.config
    idx = random_tokens(cfg, 3, 4)
    a = model.generate(idx, 10, temperature=0.0)
    b = model.generate(idx, 10, temperature=0.0)
    assert torch.equal(a, b)
    ref = idx
    with torch.no_grad():
        for _ in range(10):
            nxt = model(ref)[:, -1].argmax(-1, keepdim=True)
            ref = torch.cat([ref, nxt], dim=1)
    assert torch.equal(a, ref)


def test_top_k_one_equals_greedy_and_top_k_restricts_samples() -> None:
    """top_k=1 sampling is greedy for any seed; top_k=3 only ever draws one of the 3 best tokens."""
    model = tiny_model()
    cfg = model.config
    idx = random_tokens(cfg, 3, 4)
    greedy = model.generate(idx, 8, temperature=0.0)
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(model.generate(idx, 8, temperature=1.0, top_k=1, generator=g), greedy)

    prompt = random_tokens(cfg, 1, 6, seed=9).expand(500, -1)
    with torch.no_grad():
        top3 = set(model(prompt[:1])[0, -1].topk(3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    drawn = set(model.generate(prompt, 1, temperature=2.0, top_k=3, generator=g)[:, -1].tolist())
    assert drawn <= top3
    assert len(drawn) > 1  # it really samples, at high temperature more than one token appears


def test_sampling_is_reproducible_with_a_generator() -> None:
    """The same generator seed gives the same samples; different seeds differ."""
    model = tiny_model()
    idx = random_tokens(model.config, 4, 4)
    run = lambda seed: model.generate(idx, 16, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


# --------------------------------------------------------------------------------------------
# 7. Config validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(n_embd=66, n_head=4), r"n_embd \(66\).*divisible by n_head \(4\)"),
        (dict(attention="no-such-attention"), r"unknown attention variant 'no-such-attention'"),
        (dict(mlp="no-such-mlp"), r"unknown MLP variant 'no-such-mlp'"),
        (dict(n_layer=0), r"n_layer must be positive"),
        (dict(dropout=1.0), r"dropout"),
    ],
)
def test_invalid_config_raises_value_error(overrides, message) -> None:
    """Impossible configurations fail at construction with a message naming the field."""
    with pytest.raises(ValueError, match=message):
        GPT(tiny_config(**overrides))


def test_sequence_longer_than_block_size_raises() -> None:
    """forward with T > block_size raises ValueError naming both lengths; T == block_size works."""
    model = tiny_model()
    cfg = model.config
    with torch.no_grad():
        assert model(random_tokens(cfg, 1, cfg.block_size)).shape[1] == cfg.block_size
    too_long = random_tokens(cfg, 1, cfg.block_size + 1)
    with pytest.raises(ValueError, match=rf"{cfg.block_size + 1}.*block_size {cfg.block_size}"):
        model(too_long)
    with pytest.raises(ValueError, match="block_size"):
        model(too_long, too_long)


# --------------------------------------------------------------------------------------------
# 8. Dropout
# --------------------------------------------------------------------------------------------


def test_dropout_is_off_in_eval_and_on_in_train() -> None:
    """eval(): deterministic and equal to the dropout-free model; train(): two calls differ."""
    model = tiny_model(dropout=0.2)
    cfg = model.config
    idx = random_tokens(cfg, 2, 16)
    reference = GPT(tiny_config(dropout=0.0)).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, b = model(idx), model(idx)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, reference(idx), rtol=0, atol=0)
        model.train()
        torch.manual_seed(0)
        c = model(idx)
        d = model(idx)
    assert not torch.allclose(c, d)
    assert not torch.allclose(c, a)


def test_embedding_dropout_is_applied_before_the_first_block() -> None:
    """In train mode about a fraction p of the summed embeddings reaching block 0 are zeroed."""
    p = 0.5
    model = tiny_model(dropout=p).train()
    seen = []
    handle = model.transformer.h[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            model(random_tokens(model.config, 4, 32))
    finally:
        handle.remove()
    zero_fraction = (seen[0] == 0).float().mean().item()
    assert abs(zero_fraction - p) < 0.05


def test_short_bf16_cpu_attention_runs_in_fp32_and_matches_bf16_sdpa() -> None:
    """The fp32 detour for short bf16 sequences on CPU gives bf16 SDPA's result, in bf16, with grads."""
    from gpt2.model.attention import SHORT_BF16_CPU, CausalSelfAttention

    attn = CausalSelfAttention(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=SHORT_BF16_CPU))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 8, generator=g).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn.attend(q, k, v)
    assert out.dtype == torch.bfloat16
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))


def _tied_gradient(model, x, y, micro_steps: int) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    for _ in range(micro_steps):
        model(x, y).backward()
    return model.lm_head.weight.grad.clone()


@pytest.mark.parametrize("micro_steps", [1, 2])
def test_tied_weight_gradient_with_the_sparse_lookup_equals_the_dense_one(micro_steps, monkeypatch) -> None:
    """On CPU the lookup's gradient is sparse and lands inside the head's dense one: the weight's
    gradient is the same dense tensor as with the plain lookup, also accumulated over micro-steps,
    and no (vocab x C) gradient is zero-filled for the lookup."""
    from tests.conftest import OpNames

    class OpNames(OpNames):  # an embedding's dense backward, named with its row count
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__ == "embedding_dense_backward.default":
                self.names.append(f"dense lookup gradient, {args[2]} rows")
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=1, n_head=2, n_embd=16))
    x, y = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    with OpNames() as ops:
        sparse = _tied_gradient(model, x, y, micro_steps)
    assert not model.lm_head.weight.grad.is_sparse
    assert "dense lookup gradient, 97 rows" not in ops.names
    monkeypatch.setattr(model.transformer.wte, "tied_to_head", False)
    with OpNames() as ops:
        dense = _tied_gradient(model, x, y, micro_steps)
    assert "dense lookup gradient, 97 rows" in ops.names  # (the check above can fail)
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-7)
