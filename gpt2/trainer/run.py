"""Run a validated configuration: dry run, a single training run (ablation mode comes with issue 3)."""

from __future__ import annotations

import json

from gpt2.config import RunConfig
from gpt2.trainer.extension import Extension


def extensions_for(cfg: RunConfig) -> list[Extension]:
    """The extensions a run's architecture and optimizer need (none for plain vanilla training)."""
    return []


def run(cfg: RunConfig) -> int:
    """Entry point below the CLI; returns the process exit status."""
    from gpt2.trainer.loop import Trainer

    trainer = Trainer(cfg, extensions_for(cfg))
    if cfg.train.dry_run:
        info = trainer.dry_run()
        print(json.dumps({"config": cfg.to_dict(), "model_config": trainer.gpt_config.to_dict()}, indent=2))
        print(
            f"dry run ok: {info['n_params'] / 1e6:.2f}M parameters, one step on {info['device']} "
            f"({info['dtype']}), loss {info['loss']:.4f}"
        )
        return 0
    trainer.fit()
    if cfg.output.sample_tokens > 0 and not cfg.train.quiet:
        print("---- sample ----")
        print(trainer.sample(cfg.output.sample_tokens))
        print("----------------")
    print("Training complete!")
    return 0
