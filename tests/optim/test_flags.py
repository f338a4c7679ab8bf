"""Optimizer and pruning flags: derived defaults, refusals, and what the factory builds from them."""

from __future__ import annotations

import typing

import pytest
import torch

from gpt2.config import OptimSection, resolve
from gpt2.errors import ConfigError
from gpt2.model import GPT, GPTConfig
from gpt2.optim import OptimSettings, build_optimizer
from gpt2.optim.adamwprune import AdamWPrune
from gpt2.optim.prune import Pruner, prunable_parameters
from gpt2.optim.spam import AdamWSPAM
from gpt2.trainer.extensions.pruning import PruningExtension


def cfg(**values):
    return resolve({"model_name": "tiny", **values})


def test_ramp_end_defaults_to_most_of_the_run():
    c = cfg(pruning_method="magnitude", max_iters=1000, pruning_warmup=100)
    assert c.pruning.pruning_ramp_end == 800
    short = cfg(pruning_method="magnitude", max_iters=2, pruning_warmup=0)
    assert short.pruning.pruning_ramp_end == 1  # the last iteration (0-based), so the target is reached


@pytest.mark.parametrize(
    ("values", "shape"),
    [
        (dict(pruning_method="movement"), "linear"),  # the reference's ramp for each method
        (dict(pruning_method="magnitude"), "cubic"),
        (dict(pruning_method="state", optimizer="adamwprune"), "cubic"),
        (dict(pruning_method="movement", pruning_schedule="cubic"), "cubic"),  # set: like for like
        (dict(pruning_method="magnitude", pruning_schedule="linear"), "linear"),
    ],
)
def test_pruning_schedule_resolves_to_the_shape_used(values, shape, tmp_path):
    from gpt2 import config_file

    c = cfg(max_iters=1000, pruning_warmup=100, **values)
    assert c.pruning.pruning_schedule == shape
    assert f'pruning-schedule = "{shape}"' in config_file.to_toml(c)  # recorded in the run's config.toml
    assert PruningExtension.from_config(c).schedule.shape == shape  # and the ramp the run follows
    assert cfg().pruning.pruning_schedule == "auto"  # no pruning: nothing to resolve


def test_pruning_schedule_help_names_each_methods_ramp():
    from gpt2.cli import build_parser

    action = next(a for a in build_parser()._actions if a.dest == "pruning_schedule")
    assert action.choices == ("auto", "linear", "cubic")
    assert "magnitude cubic, movement linear, state cubic" in action.help


@pytest.mark.parametrize(("variant", "iters"), [("bitter0", 10000), ("bitter2", 12100), ("bitter3", 13000)])
def test_variant_iteration_bump_only_without_explicit_max_iters(variant, iters):
    values = dict(optimizer="adamwprune", pruning_method="state", adamwprune_variant=variant)
    c = resolve({"model_name": "tiny", **values}, explicit=set(values))
    assert c.train.max_iters == iters
    assert c.pruning.pruning_ramp_end == 8000  # the ramp keeps the un-extended length
    given = cfg(optimizer="adamwprune", pruning_method="state", adamwprune_variant=variant, max_iters=10000)
    assert given.train.max_iters == 10000


def test_adamwprune_hyperparameters_default_to_the_general_ones():
    c = cfg(optimizer="adamwprune", pruning_method="state", beta2=0.95, weight_decay=0.05)
    assert (c.optim.adamwprune_beta2, c.optim.adamwprune_weight_decay) == (0.95, 0.05)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (dict(optimizer="adamw", spam_enable_clip=True), "needs --optimizer adamwspam"),
        (dict(optimizer="adamw", adamwprune_variant="bitter3"), "needs --optimizer adamwprune"),
        (dict(pruning_frequency=10), "needs --pruning-method"),
        (dict(pruning_schedule="linear"), "needs --pruning-method"),
        (dict(pruning_method="magnitude", max_iters=100), "must be below the pruning ramp end"),
        (dict(pruning_method="magnitude", max_iters=2000, pruning_ramp_end=3000), "never be reached"),
        (dict(pruning_method="magnitude", max_iters=2000, pruning_ramp_end=2000), "the last is 1999"),
        (dict(pruning_method="state"), "needs --optimizer adamwprune"),
        (dict(optimizer="adamw", spam_variant="paper"), "needs --optimizer adamwspam"),
        (dict(optimizer="adamwspam", spam_variant="paper", spam_amsgrad=True), "has no AMSGrad"),
        (dict(pruning_method="magnitude", parallel="fsdp"), "use --parallel ddp"),
    ],
)
def test_inconsistent_flags_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        cfg(**values)


def test_factory_builds_spam_and_adamwprune_with_the_flags():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    spam = build_optimizer(model, cfg(optimizer="adamwspam", spam_interval=500, spam_enable_clip=True).optim)
    assert isinstance(spam, AdamWSPAM)
    assert (spam.interval, spam.warmup_steps, spam.enable_clip) == (500, 100, True)
    assert [g["weight_decay"] for g in spam.param_groups] == [0.1, 0.0]  # decay on >= 2-D weights only
    prune = build_optimizer(model, cfg(optimizer="adamwprune", pruning_method="state").optim)
    assert isinstance(prune, AdamWPrune) and prune.interval == 0 and not prune.enable_clip  # AdamW base
    assert [g["weight_decay"] for g in prune.param_groups] == [0.1, 0.0]  # not silently 0
    pruner = Pruner(prunable_parameters(model), prune.variant, optimizer=prune)  # the masks' one owner
    assert len(pruner.masks) == 8 and all(m.dtype == torch.bool for m in pruner.masks.masks)
    on_spam = build_optimizer(
        model,
        cfg(optimizer="adamwprune", pruning_method="state", adamwprune_base_optimizer_name="adamwspam").optim,
    )
    assert on_spam.interval == 1000


def test_spam_variant_reaches_the_optimizer_with_its_eps():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    ref = build_optimizer(model, cfg(optimizer="adamwspam").optim)
    paper = build_optimizer(model, cfg(optimizer="adamwspam", spam_variant="paper").optim)
    assert (ref.spam_variant, ref.defaults["eps"]) == ("reference", 1e-8)
    assert (paper.spam_variant, paper.defaults["eps"], paper.defaults["fused"]) == ("paper", 1e-6, False)
    values = dict(optimizer="adamwprune", pruning_method="state", adamwprune_base_optimizer_name="adamwspam")
    on_paper = build_optimizer(model, cfg(spam_variant="paper", **values).optim)
    assert isinstance(on_paper, AdamWPrune) and on_paper.spam_variant == "paper"
    assert (
        build_optimizer(model, cfg(optimizer="adamwprune", pruning_method="state").optim).defaults["eps"]
        == 1e-8
    )


def test_a_spam_rewarmup_as_long_as_the_interval_is_accepted_with_a_warning(capsys):
    """The earlier system's B200 setting (interval 1000, re-warmup 1000): it runs, and says what happens."""
    from gpt2.cli import parse

    c = parse(["--optimizer", "adamwspam", "--spam-interval", "1000", "--spam-warmup-steps", "1000"])
    assert (c.optim.spam_interval, c.optim.spam_warmup_steps) == (1000, 1000)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "stays in re-warmup" in err[0]
    assert cfg(optimizer="adamwspam", spam_interval=1000, spam_warmup_steps=999).warnings == ()


def test_the_optim_section_provides_every_setting_the_factory_reads():
    """The factory names its settings in a protocol (it may not import the config); the section must
    keep providing them, every one resolved (not None)."""
    wanted = typing.get_type_hints(OptimSettings)
    section = typing.get_type_hints(OptimSection)
    assert set(wanted) <= set(section), sorted(set(wanted) - set(section))
    for optimizer in ("adamw", "adamwspam", "adamwprune", "muon"):
        resolved = cfg(optimizer=optimizer, pruning_method="state" if optimizer == "adamwprune" else "none")
        assert all(getattr(resolved.optim, name) is not None for name in wanted), optimizer
