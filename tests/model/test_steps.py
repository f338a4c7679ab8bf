"""The V-step registry (reference §4.2): each step builds the model its table row says, and nothing leaks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gpt2.model import GPT, GPTConfig
from gpt2.model.attention import CausalSelfAttention, UnifiedRAttention
from gpt2.model.mlp import MLP, ReciprocalMLP
from gpt2.model.steps import BASE, STEPS, apply_step, format_steps_table, get_step, parse_steps

# The reference's table, restated independently of the registry:
# step -> (RA rank or None for baseline attention, self-restart, R-MLP?, mixer, gate alpha, expansion)
TABLE = {
    "V0": (None, False, False, False, False, 4),
    "V1": (4, False, False, False, False, 4),
    "V2": (4, True, False, False, False, 4),
    "V3": (4, False, True, False, False, 4),
    "V4": (4, False, True, True, False, 4),
    "V5": (4, False, True, False, True, 4),
    "V6": (4, False, True, True, True, 4),
    "V7": (8, False, False, False, False, 4),
    "V8": (8, True, False, False, False, 4),
    "V9": (2, False, False, False, False, 4),
    "V10": (4, True, False, False, False, 6),
}

# get_num_params-style counts (no position embeddings) for GPT-2 small, vocab 50304, biases, per-head gates.
GPT2_PARAMS = {
    "V0": 123_689_472,
    "V1": 123_689_472 + 288,  # + w_std, w_rec per head (12 x 12 x 2)
    "V2": 123_689_472 + 432,  # + rwr_alpha per head
    "V3": 123_689_472 + 288 + 24,  # + R-MLP w_std, w_rec per layer
    "V4": 123_689_472 + 288 + 24 + 12 * (64 * 64 + 64),  # + mixer (with bias, as the model's Linears)
    "V5": 123_689_472 + 288 + 24 + 12,  # + gate_alpha per layer
    "V6": 123_689_472 + 288 + 24 + 12 * (64 * 64 + 64) + 12,
    "V7": 123_689_472 + 288,
    "V8": 123_689_472 + 432,
    "V9": 123_689_472 + 288,
    "V10": 123_689_472 + 432 + 12 * (2 * 768 * 1536 + 1536),  # 6x MLP: C -> 4608 -> C, 1536 wider
}


def small() -> GPTConfig:
    return GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def test_registry_holds_v0_to_v19_and_c1_to_c3_in_order() -> None:
    assert list(STEPS) == [f"V{i}" for i in range(20)] + ["C1", "C2", "C3"]
    assert list(STEPS)[:11] == list(TABLE)
    known = set(BASE) | {"rmlp_share"}  # (the golden split, resolved against the model's width)
    assert all(set(s.overrides) <= known for s in STEPS.values()), "a step sets a field BASE lacks"


# step -> (attention, MLP, R_ff at GPT-2 width or None, gate schedule, KV keep at 1024, learned, V rank)
LEGACY = {
    "V11": ("standard", "reciprocal", 64, "delayed", None, False, 0),
    "V12": ("unified_ra", "standard", None, "delayed", None, False, 0),
    "V13": ("standard", "reciprocal", 1152, "delayed", None, False, 0),
    "V14": ("kv_pruned", "reciprocal", 64, "delayed", 391, False, 0),
    "V15": ("kv_pruned", "reciprocal", 1152, "delayed", 391, True, 0),
    "V16": ("unified_ra", "standard", None, "variance", None, False, 0),
    "V17": ("kv_pruned", "reciprocal", 64, "variance", 391, False, 0),
    "V18": ("kv_pruned", "reciprocal", 1152, "variance", 391, True, 0),
    "V19": ("v_pruned", "standard", None, "none", 391, False, 0),
    "C1": ("v_pruned", "standard", None, "none", 391, False, 32),
    "C2": ("v_pruned", "standard", None, "none", 391, False, 16),
    "C3": ("v_pruned", "standard", None, "none", 391, False, 8),
}


@pytest.mark.parametrize("name", list(LEGACY))
def test_legacy_steps_build_the_configuration_of_the_reference(name: str) -> None:
    attention, mlp, r_ff, schedule, keep, learned, v_rank = LEGACY[name]
    c = apply_step(GPTConfig(), name)  # GPT-2 124M: 3072 hidden channels, block 1024
    assert (c.attention, c.mlp, c.gate_schedule, c.kv_learned, c.kv_v_rank) == (
        attention, mlp, schedule, learned, v_rank
    )  # fmt: skip
    if r_ff is not None:
        assert c.rmlp_rank == r_ff
    if keep is not None:
        assert round(c.kv_keep * c.block_size) == keep and round(c.kv_recent * c.block_size) == 64
    if c.attention == "unified_ra":
        assert c.ra_rank == 4 and c.ra_per_head_gates
    GPT(apply_step(small(), name) if v_rank <= 16 else replace(apply_step(small(), name), kv_v_rank=16))


def test_the_golden_split_follows_the_width() -> None:
    assert apply_step(GPTConfig(n_embd=128, n_head=4), "V13").rmlp_rank == 192  # 3/8 of 512


def test_list_steps_shows_every_step() -> None:
    table = format_steps_table()
    for name in STEPS:
        assert f"| {name} |" in table


@pytest.mark.parametrize("name", list(TABLE))
def test_each_step_builds_the_model_its_table_row_says(name: str) -> None:
    rank, restart, rmlp, mixer, gates, expansion = TABLE[name]
    model = GPT(apply_step(small(), name))
    C = 32
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        if rank is None:
            assert type(attn) is CausalSelfAttention
        else:
            assert type(attn) is UnifiedRAttention
            assert attn.rank == rank and attn.d_std == 16 - rank
            assert attn.w_std.shape == attn.w_rec.shape == (2,)  # per head by default
            assert (attn.rwr_alpha is not None) == restart
        if rmlp:
            assert type(mlp) is ReciprocalMLP
            assert mlp.up_low.out_features == 64 and mlp.up_std.out_features == expansion * C - 64
            assert (mlp.mixer_weight is not None) == mixer
            assert (mlp.gate_alpha is not None) == gates
        else:
            assert type(mlp) is MLP
            assert mlp.c_fc.out_features == expansion * C


@pytest.mark.parametrize("name", list(TABLE))
def test_gpt2_parameter_counts(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = GPT(apply_step(GPTConfig(), name))
    assert model.num_params() == GPT2_PARAMS[name]


def test_steps_are_applied_on_the_base_never_on_each_other() -> None:
    """The earlier ablation leaked settings: V2 then V7 gave V7 self-restart. Here it cannot."""
    cfg = GPTConfig(n_layer=3, n_head=6, n_embd=384, block_size=256, dropout=0.1, bias=False)
    chained = apply_step(apply_step(apply_step(cfg, "V6"), "V10"), "V7")
    assert chained == apply_step(cfg, "V7")
    assert not chained.self_restart and chained.mlp == "standard" and chained.mlp_expansion == 4.0
    assert (chained.n_layer, chained.n_embd, chained.block_size, chained.dropout, chained.bias) == (
        3,
        384,
        256,
        0.1,
        False,
    )
    fresh = GPTConfig(n_layer=3, n_head=6, n_embd=384, block_size=256, dropout=0.1, bias=False)
    assert apply_step(cfg, "V0") == fresh
    assert cfg == fresh  # apply_step returns a copy


def test_unknown_and_repeated_names_are_refused_with_the_known_list() -> None:
    with pytest.raises(ValueError, match=r"unknown V-step 'V20'; known steps: V0, V1, .*V19, C1, C2, C3"):
        get_step("V20")
    with pytest.raises(ValueError, match="unknown V-step 'v1'"):
        apply_step(GPTConfig(), "v1")
    with pytest.raises(ValueError, match="listed twice: V1"):
        parse_steps("V0,V1,V1")
    with pytest.raises(ValueError, match="no V-steps"):
        parse_steps(" , ")
    assert parse_steps(" V0, V3 ,V9") == ["V0", "V3", "V9"]


def test_table_has_one_row_per_step_with_its_settings() -> None:
    table = format_steps_table()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert list(rows) == list(STEPS)
    assert "| 6x |" in rows["V10"] and "| 4x |" in rows["V2"]
    assert "| unified_ra | 8 | yes |" in rows["V8"]
    assert "| standard | - | - | standard |" in rows["V0"]


def test_list_steps_and_ra_step_validation_on_the_command_line(capsys) -> None:
    from gpt2.train import main

    assert main(["--list-steps"]) == 0
    assert capsys.readouterr().out.strip() == format_steps_table()
    with pytest.raises(SystemExit) as e:
        main(["--architecture", "unified-ra", "--ra-step", "V42"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown V-step 'V42'" in err and "V10" in err
    with pytest.raises(SystemExit):
        main(["--architecture", "unified-ra", "--ablation-mode", "--ablation-steps", "V0,V99"])
    assert "unknown V-step 'V99'" in capsys.readouterr().err
    # a known step whose model cannot be built (R=8 with 8-channel heads) is refused up front too
    with pytest.raises(SystemExit) as e:
        main(["--model-name", "tiny", "--n-embd", "32", "--architecture", "unified-ra", "--ra-step", "V7"])
    assert e.value.code == 2
    assert "step V7 does not fit this model: ra_rank must be in [1, head_dim=8)" in capsys.readouterr().err


def test_run_config_builds_the_step_with_the_chosen_gate_granularity() -> None:
    from gpt2.config import resolve

    cfg = resolve(dict(architecture="unified-ra", ra_step="V8", ra_gates="per-layer", model_name="tiny"))
    built = cfg.gpt_config()  # the model follows from the run config alone
    vanilla = resolve(dict(model_name="tiny")).gpt_config()
    assert built == replace(apply_step(vanilla, "V8"), ra_per_head_gates=False)
    assert resolve(dict(architecture="unified-ra")).model.ra_step == "V1"  # the default step


def test_vanilla_and_step_v0_build_the_same_model() -> None:
    from gpt2.config import resolve

    vanilla = resolve(dict(model_name="tiny")).gpt_config()
    for gates in ("per-head", "per-layer"):
        v0 = resolve(dict(model_name="tiny", architecture="unified-ra", ra_step="V0", ra_gates=gates))
        assert v0.gpt_config() == vanilla
    assert resolve(dict(model_name="tiny", architecture="unified-ra", ra_step="V1")).gpt_config() != vanilla
