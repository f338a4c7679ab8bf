"""The pruning mechanism: schedule values, thresholds and ties, no regrowth, the prunable set."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpt2.model import GPT, GPTConfig
from gpt2.model.attention import ATTENTION
from gpt2.optim.prune import MaskSet, SparsitySchedule, importance, layer_sparsity, prunable_parameters
from gpt2.optim.prune import masks as masks_module
from gpt2.optim.prune.masks import count


# ------------------------------------------------------------------ schedule
def test_cubic_schedule_values():
    s = SparsitySchedule(target=0.5, warmup=100, ramp_end=1100, frequency=50)
    assert s.sparsity_at(0) == 0.0 and s.sparsity_at(100) == 0.0
    assert s.sparsity_at(600) == pytest.approx(0.0625)  # 0.5 * (500/1000)^3
    assert s.sparsity_at(1100) == 0.5 and s.sparsity_at(5000) == 0.5


def test_linear_schedule_values():
    """Movement's reference ramp (spec §7.2): halfway through, half the target (cubic: an eighth)."""
    s = SparsitySchedule(target=0.5, warmup=100, ramp_end=1100, frequency=50, shape="linear")
    assert s.sparsity_at(100) == 0.0 and s.sparsity_at(1100) == 0.5
    assert s.sparsity_at(600) == 0.25  # 0.5 * 500/1000
    assert s.sparsity_at(350) == 0.125  # 0.5 * 250/1000
    with pytest.raises(ValueError, match="ramp shape"):
        SparsitySchedule(target=0.5, warmup=0, ramp_end=10, shape="exponential")


def test_each_method_has_its_reference_ramp():
    from gpt2.optim.prune.scores import OPTIMIZER_SCORES, SCORES

    assert SCORES["movement"].ramp == "linear" and SCORES["magnitude"].ramp == "cubic"
    assert {SCORES[name].ramp for name in OPTIMIZER_SCORES} == {"cubic"}  # AdamWPrune: cubic for all


def test_masks_update_every_frequency_steps_and_once_at_the_ramp_end():
    s = SparsitySchedule(target=0.5, warmup=100, ramp_end=1075, frequency=50)
    assert not s.due(100, 0.0)  # nothing to prune yet
    assert s.due(150, 0.0) and not s.due(151, 0.0)
    applied = s.sparsity_at(1050)
    assert s.due(1075, applied)  # off the frequency grid, but the ramp ends here: reach the target
    assert not s.due(1100, 0.5) and not s.due(2000, 0.5)  # then hold


# Masks over a run's steps, hand-computed: 16 weights w0 = 1, entry i's gradient i/16 at every SGD
# step (lr 1), so after t steps a kept entry is w = 1 - t·i/16: magnitude |w| = |16 - t·i|/16,
# movement w·(w - w0) = t·i·(t·i - 16)/256. Target 0.5, warm-up 0, ramp end 4, frequency 2: the
# masks change after the steps of iterations 2 and 4 (steps 3 and 5), to s(2) then 0.5 = 8 of 16.
PRUNED_AFTER_STEPS_3_AND_5 = {
    # linear: s(2) = 0.25, 4 entries; t = 3 scores of i = 3, 2, 4, 1: -63, -60, -48, -39 (i = 0: 0)
    ("movement", "linear"): ({1, 2, 3, 4}, set(range(8))),  # t = 5: i = 0, 5, 6, 7 score 0, 225, 420, 665
    # cubic: s(2) = 0.5 / 8, 1 entry; t = 3: |16 - 3i| is least (1) at i = 5
    ("magnitude", "cubic"): (
        {5},
        set(range(8)),
    ),  # t = 5: |16 - 5i| = 1, 4, 6, 11, 14, 16, 19 (i = 3, 4, 2, ...)
    ("movement", "cubic"): ({3}, set(range(8))),  # --pruning-schedule overrides either way
    ("magnitude", "linear"): ({4, 5, 6, 7}, set(range(8))),  # |16 - 3i| = 4, 1, 2, 5 for i = 4..7
}


def pruned_after_each_step(score: str, shape: str, steps: int = 6) -> list[set[int]]:
    """The pruned entries after each of ``steps`` steps of the run described above."""
    from gpt2.trainer.extensions.pruning import PruningExtension

    layer = nn.Linear(4, 4, bias=False)
    nn.init.ones_(layer.weight)
    model, grad = nn.Sequential(layer), torch.arange(16.0).view(4, 4) / 16
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ext = PruningExtension(score, SparsitySchedule(0.5, warmup=0, ramp_end=4, frequency=2, shape=shape))
    pruned = []
    for step in range(1, steps + 1):  # the loop's order of calls around one step
        layer.weight.grad = grad.clone()
        ext.before_optimizer_step(model, opt)
        opt.step()
        ext.after_optimizer_step(model, opt)
        ext.on_step_end(step, model, opt)
        pruned.append(set((~ext.masks.masks[0]).view(-1).nonzero().view(-1).tolist()))
    return pruned


@pytest.mark.parametrize(("score", "shape"), list(PRUNED_AFTER_STEPS_3_AND_5))
def test_masks_of_a_run_at_each_step(score, shape):
    mid, end = PRUNED_AFTER_STEPS_3_AND_5[score, shape]
    # nothing until iteration 2 (after step 3), then held until iteration 4, then held at the target
    assert pruned_after_each_step(score, shape) == [set(), set(), mid, mid, end, end]


def test_bitter4_layer_sparsities():
    assert [layer_sparsity(0.5, i, 3) for i in range(3)] == pytest.approx([0.35, 0.5, 0.65])
    assert layer_sparsity(0.9, 2, 3) == 0.95  # capped


# ---------------------------------------------------------------- thresholds
def mask_set(*tensors: torch.Tensor) -> MaskSet:
    return MaskSet([(f"w{i}", nn.Parameter(t.clone())) for i, t in enumerate(tensors)])


def test_ties_with_the_threshold_are_pruned():
    masks = mask_set(torch.tensor([1.0, 2.0, 2.0, 3.0]))
    masks.update(lambda i: masks.params[i].detach().abs(), 0.5)  # k = 2: threshold 2, keep > 2
    assert masks.masks[0].tolist() == [False, False, False, True]


def test_exactly_int_s_n_pruned_across_layers_without_ties():
    gen = torch.Generator().manual_seed(0)
    masks = mask_set(torch.randn(30, 20, generator=gen), torch.randn(400, generator=gen))
    masks.update(lambda i: masks.params[i].detach().abs(), 0.37)
    assert sum(int((~m).sum()) for m in masks.masks) == int(0.37 * 1000)
    every = torch.cat([p.detach().abs().flatten() for p in masks.params])
    kept = torch.cat([p.detach().abs().flatten()[m.flatten()] for p, m in zip(masks.params, masks.masks)])
    assert kept.min() > every.kthvalue(370).values  # one global threshold


def brute_force_keep(scores: list[torch.Tensor], masks: MaskSet, sparsity: float) -> list[torch.Tensor]:
    masked = [s.masked_fill(~m, float("-inf")) for s, m in zip(scores, masks.masks)]
    flat = torch.cat([s.flatten() for s in masked])
    threshold = flat.kthvalue(count(sparsity, flat.numel())).values
    return [s > threshold for s in masked]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bracket", [4.0, -1.0], ids=["bracketed", "missed-bracket"])
def test_streamed_threshold_equals_one_global_kthvalue(seed, bracket, monkeypatch):
    monkeypatch.setattr(masks_module, "BRACKET_SIGMAS", bracket)  # -1: the fallback path
    gen = torch.Generator().manual_seed(seed)
    masks = mask_set(*(torch.randn(n, generator=gen) for n in (50_000, 120_000, 30_000)))
    scores = [torch.randn(p.shape, generator=gen).round(decimals=5) for p in masks.params]  # a few ties
    for sparsity in (0.2, 0.2 + 0.3 * torch.rand((), generator=gen).item(), 0.9):
        expected = brute_force_keep(scores, masks, sparsity)
        masks.update(lambda i: scores[i], sparsity, seed=seed)
        assert all(torch.equal(m, e) for m, e in zip(masks.masks, expected)), sparsity
    assert masks.threshold_fallbacks == (0 if bracket > 0 else 3)


def test_pruned_weights_never_come_back():
    masks = mask_set(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    masks.update(lambda i: masks.params[i].detach().abs(), 0.5)
    assert masks.masks[0].tolist() == [True, True, False, False]
    flipped = torch.tensor([0.0, 0.1, 9.0, 9.0])  # the pruned ones now score best
    masks.update(lambda i: flipped, 0.5)
    assert masks.masks[0].tolist() == [True, True, False, False]
    masks.update(lambda i: flipped, 0.75)
    assert masks.masks[0].tolist() == [False, True, False, False]


def test_sampled_threshold_is_close():
    gen = torch.Generator().manual_seed(0)
    masks = mask_set(torch.randn(100_000, generator=gen))
    masks.update(lambda i: masks.params[i].detach().abs(), 0.5, sample_fraction=0.05, seed=3)
    assert masks.mask_sparsity() == pytest.approx(0.5, abs=0.01)


def test_apply_zeroes_weights_grads_and_same_shaped_optimizer_state():
    masks = mask_set(torch.tensor([1.0, -2.0, 3.0]))
    p = masks.params[0]
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    opt.step()
    masks.update(lambda i: torch.tensor([3.0, 1.0, 2.0]), 0.34)
    masks.apply_to_weights()
    masks.apply_to_state(opt)
    p.grad = torch.ones(3)
    masks.apply_to_grads()
    assert p.grad.tolist() == [1.0, 0.0, 1.0] and p.detach()[1] == 0
    assert opt.state[p]["momentum_buffer"][1] == 0


def test_movement_score_prefers_weights_moving_away_from_zero():
    w = torch.tensor([0.5, 0.5, -0.5])
    w0 = torch.tensor([0.1, 0.9, -0.1])  # grew, shrank, grew (negative)
    assert importance("movement", w, {"initial": w0}).tolist() == pytest.approx([0.2, -0.2, 0.2])


# ------------------------------------------------------------- what is prunable
def tiny_gpt(**kw) -> GPT:
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, **kw))


def test_only_block_linear_weights_are_prunable_by_default():
    model = tiny_gpt()
    names = [n for n, _ in prunable_parameters(model)]
    layers = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert names == [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in layers]
    with_head = [n for n, _ in prunable_parameters(model, include_embeddings=True)]
    assert with_head == [*names, "lm_head.weight"]  # the tied token embedding, by opt-in only


@pytest.mark.skipif("unified_ra" not in ATTENTION, reason="Unified RA attention not built")
def test_unified_ra_gates_are_never_pruned():
    model = tiny_gpt(attention="unified_ra")
    names = [n for n, _ in prunable_parameters(model, include_embeddings=True)]
    assert not any("w_std" in n or "w_rec" in n or "alpha" in n for n in names)
    gates = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() < 2}
    masks = MaskSet(prunable_parameters(model))
    masks.update(lambda i: masks.params[i].detach().abs(), 0.5)
    masks.apply_to_weights()
    for n, p in model.named_parameters():
        if n in gates:
            assert torch.equal(p, gates[n]), n
