"""Entry point: ``python gpt2/train.py [flags]`` from the repository root (or ``python -m gpt2.train``).

Parse and validate every flag first (one line and exit status 2 on bad input), then run: list
the steps, an ablation study, or one training run.
"""

from __future__ import annotations

import sys

try:
    import gpt2  # noqa: F401
except ModuleNotFoundError:  # run by its path, python gpt2/train.py
    import _as_script  # noqa: F401

from gpt2.cli import main_guard, parse
from gpt2.config import RunConfig


def run(cfg: RunConfig) -> int:
    """Run a validated configuration; returns the process exit status."""
    if cfg.ablation.list_steps:
        from gpt2.model.steps import format_steps_table

        print(format_steps_table())
        return 0
    if cfg.ablation.list_experiments:
        from gpt2.experiments import format_experiments

        print(format_experiments())
        return 0
    from gpt2.signals import Stopped
    from gpt2.trainer import distributed

    failed = True
    try:
        if cfg.ablation.ablation_mode or cfg.ablation.ablate:
            from gpt2.launch.coordinator import run_ablation

            run_ablation(cfg)
            stopped = False
        else:
            from gpt2.trainer.run import train_once

            stopped = str(train_once(cfg).get("stop_reason", "")).startswith("signal")
        failed = False
    except Stopped:  # every rank stopped together: the process group can be left cleanly
        failed = False
        raise
    finally:
        distributed.shutdown(failed)
    if not cfg.train.dry_run and not stopped and distributed.from_env().is_main:
        print("Training complete!")
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_guard(lambda: run(parse(argv, prog="train.py")))


if __name__ == "__main__":
    sys.exit(main())
