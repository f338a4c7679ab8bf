"""AdamWPrune and its Pruner: each bitter score picks the expected weights; pruned entries stay zero."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gpt2.model import GPT, GPTConfig
from gpt2.optim.adamwprune import VARIANTS, AdamWPrune
from gpt2.optim.prune import Pruner, SparsitySchedule, prunable_parameters
from gpt2.trainer.extensions.pruning import PruningExtension

# One 2x3 weight with chosen Adam moments after one step (t = 1, beta1 = 0.9); prune half (3 of 6).
W = [[-0.4, 0.5, -0.2], [0.1, 0.3, 0.25]]
M = [[0.01, -0.02, 0.01], [-0.3, -0.3, 0.2]]
V = [[0.0025, 0.16, 0.16], [0.09, 0.04, 0.04]]  # sqrt(v) = .05 .4 .4 / .3 .2 .2
T, F = True, False  # short, for the tables below

# Scores by hand (entries in row order), and the three kept (highest) entries.
EXPECTED_KEEP = {
    # w^2|m|/sqrt(v): .032 .0125 .001 .01 .135 .0625
    "bitter0": [[T, F, F], [F, T, T]],
    # |w|: .4 .5 .2 .1 .3 .25
    "bitter1": [[T, T, F], [F, T, F]],
    "bitter2": [[T, T, F], [F, T, F]],
    # |w| sqrt|m|: .04 .0707 .02 .0548 .1643 .1118
    "bitter3": [[F, T, F], [F, T, T]],
    # -sign(w) m/sqrt(v) + .1|w|: .24 .1 .045 1.01 1.53 -.975 (the earlier "+" sign keeps 1, 2, 5)
    "bitter5": [[T, F, F], [T, T, F]],
    # bitter3 * |m|/sqrt(v): .008 .0035 .0005 .0548 .2465 .1118
    "bitter6": [[F, F, F], [T, T, T]],
    # |w| v^(1/4): .0894 .3162 .1265 .0548 .1342 .1118
    "bitter7": [[F, T, T], [F, T, F]],
    # |w| sqrt(|m|/(1 - .9)): .1265 .2236 .0632 .1732 .5196 .3536
    "bitter8": [[F, T, F], [F, T, T]],
    # bitter3 - .1 sign(w) m/sqrt(v): .06 .0757 .0225 .1548 .3143 .0118 (the "+" sign keeps 0, 1, 5)
    "bitter9": [[F, T, F], [T, T, F]],
}


def optimizer_with_state(variant: str, weights: list[torch.Tensor], ms, vs, step: float = 1.0):
    params = [nn.Parameter(w.clone()) for w in weights]
    opt = AdamWPrune(params, variant=variant)
    for p, m, v in zip(params, ms, vs):
        opt.state[p] = {"step": torch.tensor(step), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    return params, Pruner([(f"w{i}", p) for i, p in enumerate(params)], variant, optimizer=opt)


@pytest.mark.parametrize("variant", sorted(EXPECTED_KEEP))
def test_each_variant_selects_the_expected_weights(variant):
    (p,), pruner = optimizer_with_state(variant, [torch.tensor(W)], [torch.tensor(M)], [torch.tensor(V)])
    pruner.prune(0.5)
    keep = torch.tensor(EXPECTED_KEEP[variant])
    assert torch.equal(pruner.masks.masks[0], keep)
    assert torch.equal(p.detach() != 0, keep)  # pruned weights zeroed, the rest untouched
    assert torch.equal(p.detach()[keep], torch.tensor(W)[keep])
    for key in ("exp_avg", "exp_avg_sq"):
        assert (pruner.optimizer.state[p][key][~keep] == 0).all()


SCORES_BY_HAND = {  # the values behind the masks above, in row order
    "bitter0": [0.032, 0.0125, 0.001, 0.01, 0.135, 0.0625],
    "bitter1": [0.4, 0.5, 0.2, 0.1, 0.3, 0.25],
    "bitter3": [0.04, 0.070711, 0.02, 0.054772, 0.16432, 0.1118],
    "bitter5": [0.24, 0.1, 0.045, 1.01, 1.53, -0.975],
    "bitter6": [0.008, 0.0035355, 0.0005, 0.054772, 0.24648, 0.1118],
    "bitter7": [0.089443, 0.31623, 0.12649, 0.054772, 0.13416, 0.1118],
    "bitter8": [0.12649, 0.22361, 0.063246, 0.17321, 0.51962, 0.35355],
    "bitter9": [0.06, 0.075711, 0.0225, 0.15477, 0.31432, 0.011803],
}


@pytest.mark.parametrize("variant", sorted(SCORES_BY_HAND))
def test_each_variant_scores_the_hand_computed_values(variant):
    (_,), pruner = optimizer_with_state(variant, [torch.tensor(W)], [torch.tensor(M)], [torch.tensor(V)])
    assert pruner.scores(0).flatten().tolist() == pytest.approx(SCORES_BY_HAND[variant], rel=1e-4)


def test_every_registered_variant_is_tested():
    assert set(VARIANTS) == set(EXPECTED_KEEP) | {"bitter4"}


def test_scores_fall_back_to_magnitude_before_the_first_step():
    p = nn.Parameter(torch.tensor(W))
    pruner = Pruner([("w", p)], "bitter0", optimizer=AdamWPrune([p], variant="bitter0"))
    pruner.prune(0.5)
    assert torch.equal(pruner.masks.masks[0], torch.tensor(EXPECTED_KEEP["bitter1"]))


def test_bitter4_prunes_each_layer_at_its_own_sparsity():
    gen = torch.Generator().manual_seed(0)
    shapes = [(10, 10)] * 3
    ws = [torch.randn(s, generator=gen) for s in shapes]
    ms = [torch.randn(s, generator=gen) for s in shapes]
    vs = [torch.rand(s, generator=gen) for s in shapes]
    for s, expected in ((0.5, [35, 50, 65]), (0.9, [63, 90, 95])):  # s*(0.7, 1.0, 1.3), capped at 0.95
        params, pruner = optimizer_with_state("bitter4", ws, ms, vs)
        pruner.prune(s)
        assert [int((~m).sum()) for m in pruner.masks.masks] == expected
        assert [int((p == 0).sum()) for p in params] == expected


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, pruner: Pruner | None = None) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(32, 8, generator=gen)
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if pruner is not None:  # as the pruning extension does before every step
            pruner.masks.apply_to_grads()
        opt.step()


SPAM_ON = dict(interval=3, warmup_steps=1, enable_clip=True, spike_detection=True)


@pytest.mark.parametrize("spam", [{}, SPAM_ON], ids=["adamw", "spam"])
def test_pruned_weights_grads_and_moments_stay_exactly_zero(spam):
    model = tiny_model()
    named = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    opt = AdamWPrune(model.parameters(), variant="bitter7", lr=1e-2, weight_decay=0.1, amsgrad=True, **spam)
    pruner = Pruner(named, "bitter7", optimizer=opt)
    train_steps(model, opt, 3)
    pruner.prune(0.6)
    assert pruner.masks.mask_sparsity() == pytest.approx(0.6, abs=1 / pruner.masks.numel)
    for _ in range(5):
        train_steps(model, opt, 1, pruner)
        for p, keep in zip(pruner.masks.params, pruner.masks.masks):
            assert (p.grad[~keep] == 0).all() and (p.detach()[~keep] == 0).all()
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                assert (opt.state[p][key][~keep] == 0).all(), key
            assert (p.detach()[keep] != 0).all()  # and the live weights still train


def test_masks_survive_a_state_dict_round_trip():
    model = tiny_model()
    named = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    opt = AdamWPrune(model.parameters(), variant="bitter3", lr=1e-2)
    pruner = Pruner(named, "bitter3", optimizer=opt)
    train_steps(model, opt, 2, pruner)
    pruner.prune(0.5)
    saved = copy.deepcopy((opt.state_dict(), pruner.state_dict()))  # as a checkpoint would: no tensors shared
    twin = tiny_model()
    twin.load_state_dict(model.state_dict())
    fresh_opt = AdamWPrune(twin.parameters(), variant="bitter3", lr=1e-2)
    twin_named = [(n, p) for n, p in twin.named_parameters() if p.dim() == 2]
    fresh = Pruner(twin_named, "bitter3", optimizer=fresh_opt)
    fresh_opt.load_state_dict(saved[0])
    fresh.load_state_dict(saved[1])
    assert fresh.masks.names == [n for n, _ in named]
    for a, b in zip(pruner.masks.masks, fresh.masks.masks):
        assert b.dtype == torch.bool and torch.equal(a, b)
    train_steps(model, opt, 2, pruner)
    train_steps(twin, fresh_opt, 2, fresh)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown AdamWPrune variant"):
        AdamWPrune([nn.Parameter(torch.zeros(2, 2))], variant="bitter10")


def test_prune_embeddings_widens_the_prunable_set():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    opt = AdamWPrune(model.parameters(), variant="bitter1")
    assert "lm_head.weight" not in [n for n, _ in prunable_parameters(model)]
    ext = PruningExtension("bitter1", SparsitySchedule(0.5, 0, 10, 1), include_embeddings=True)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).backward()
    ext.before_optimizer_step(model, opt)
    assert ext.masks.names[-1] == "lm_head.weight" and ext.pruner.optimizer is opt
    opt.step()
    ext.on_step_end(11, model, opt)  # iteration 10, the ramp end: the target, over blocks and tied embedding
    assert ext.masks.mask_sparsity() == pytest.approx(0.5, abs=1 / ext.masks.numel)
    assert (model.transformer.wte.weight == 0).any()
