"""One training run (or dry run) of a validated configuration, with the extensions it needs."""

from __future__ import annotations

import contextlib
import json

from gpt2.config import RunConfig
from gpt2.signals import STOP
from gpt2.trainer import distributed
from gpt2.trainer.extension import Extension


def extensions_for(cfg: RunConfig) -> list[Extension]:
    """The extensions a run's architecture and pruning method need (none for plain vanilla training)."""
    exts: list[Extension] = []
    if cfg.model.architecture == "unified-ra":
        from gpt2.trainer.extensions.unified_ra import UnifiedRAExtension

        exts.append(UnifiedRAExtension.from_config(cfg))
        if cfg.gpt_config().gate_schedule != "none":
            from gpt2.trainer.extensions.gate_schedule import GateSchedule

            exts.append(GateSchedule.from_config(cfg))
    if cfg.pruning.pruning_method != "none":
        from gpt2.trainer.extensions.pruning import PruningExtension

        exts.append(PruningExtension.from_config(cfg))
    return exts


def train_once(cfg: RunConfig) -> dict:
    """One training run (or dry run) of ``cfg``; returns its results (the dry-run summary for a dry run)."""
    from gpt2.trainer.loop import Trainer

    # Under torchrun a signal must not stop one rank inside a collective of the set-up (process
    # group, DDP's broadcast): it is recorded, and the ranks agree to stop after the data is ready.
    with STOP.deferring() if distributed.from_env().enabled else contextlib.nullcontext():
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
    stopped = str(results["stop_reason"]).startswith("signal")
    # (a synthetic task's ids are not GPT-2 text: nothing to sample)
    if cfg.output.sample_tokens > 0 and not cfg.train.quiet and not stopped and cfg.task_params is None:
        with STOP.cancellable(f"while sampling: the run had finished, results in {cfg.output.output_dir}"):
            text = trainer.sample(cfg.output.sample_tokens)
        print("---- sample ----")
        print(text)
        print("----------------")
    return results
