"""Run a validated configuration: list steps, dry run, ablation study, or a single training run."""

from __future__ import annotations

import json

from gpt2.config import RunConfig
from gpt2.trainer.extension import Extension


def extensions_for(cfg: RunConfig) -> list[Extension]:
    """The extensions a run's architecture and pruning method need (none for plain vanilla training)."""
    exts: list[Extension] = []
    if cfg.model.architecture == "unified-ra":
        from gpt2.trainer.extensions.unified_ra import UnifiedRAExtension

        exts.append(UnifiedRAExtension.from_config(cfg))
    if cfg.pruning.pruning_method != "none":
        from gpt2.trainer.extensions.pruning import PruningExtension

        exts.append(PruningExtension.from_config(cfg))
    return exts


def train_once(cfg: RunConfig) -> dict:
    """One training run (or dry run) of ``cfg``; returns its results (the dry-run summary for a dry run)."""
    from gpt2.trainer.loop import Trainer

    trainer = Trainer(cfg, extensions_for(cfg))
    if cfg.train.dry_run:
        info = trainer.dry_run()
        print(json.dumps({"config": cfg.to_dict(), "model_config": trainer.gpt_config.to_dict()}, indent=2))
        print(
            f"dry run ok: {info['n_params'] / 1e6:.2f}M parameters, one step on {info['device']} "
            f"({info['dtype']}), loss {info['loss']:.4f}"
        )
        return info
    results = trainer.fit()
    if cfg.output.sample_tokens > 0 and not cfg.train.quiet:
        print("---- sample ----")
        print(trainer.sample(cfg.output.sample_tokens))
        print("----------------")
    return results


def run(cfg: RunConfig) -> int:
    """Entry point below the CLI; returns the process exit status."""
    if cfg.ablation.list_steps:
        from gpt2.model.steps import format_steps_table

        print(format_steps_table())
        return 0
    from gpt2.trainer import distributed

    try:
        if cfg.ablation.ablation_mode:
            from gpt2.trainer.ablation import run_ablation

            run_ablation(cfg)
        else:
            train_once(cfg)
    finally:
        distributed.shutdown()
    if not cfg.train.dry_run and distributed.from_env().is_main:
        print("Training complete!")
    return 0
