"""The plan of an ablation: its arms, and one job per (arm, seed) with the run's own configuration.

An arm is a set of setting values on top of the ablation's own settings: one V-step
(``--ablation-mode --ablation-steps``) or one combination of the ``--ablate KEY=V1,V2`` axes.
Each (arm, seed) is an ordinary run of ``gpt2/train.py`` on a configuration resolved afresh from the
ablation's inputs plus the arm's values (so derived settings follow the arm), written to
``<output-dir>/<arm>[/seed<N>]/config.toml``; the job is that file, whatever runs it.
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from gpt2 import config_file
from gpt2.config import (
    AblationSection,
    LauncherSection,
    RunConfig,
    ablation_axes,
    flatten,
    resolve,
    with_implied,
)
from gpt2.errors import ConfigError, UserError
from gpt2.model.steps import get_step, parse_steps

BASELINE = "V0"
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Arm:
    """One arm of an ablation: its name (folder, row), setting values and what it is."""

    name: str
    values: dict[str, Any]
    description: str


def _label(value: Any) -> str:
    """A value as part of a folder name: short, and no path separators."""
    text = repr(value) if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+=-]+", "-", text).strip("-.") or "arm"


def arms_of(cfg: RunConfig) -> tuple[list[Arm], str]:
    """The arms of ``cfg``'s ablation and the name of its control."""
    if cfg.ablation.ablate:
        axes = ablation_axes(cfg.ablation.ablate)
        arms = []
        for combo in itertools.product(*[[(k, v) for v in values] for k, values in axes]):
            values = with_implied(dict(combo))  # (an architecture axis wins)
            name = "_".join(f"{k}={_label(v)}" for k, v in combo) if len(axes) > 1 else _label(combo[0][1])
            desc = get_step(values["ra_step"]).description if len(axes) == 1 and "ra_step" in values else ""
            arms.append(Arm(name, values, desc or ", ".join(f"{k} = {_label(v)}" for k, v in combo)))
        names = [a.name for a in arms]
        if len(set(names)) < len(names):
            raise UserError(f"--ablate: two arms would share a folder name ({', '.join(names)})")
        return arms, arms[0].name
    steps = parse_steps(cfg.ablation.ablation_steps or "")
    arms = [Arm(s, with_implied({"ra_step": s}), get_step(s).description) for s in steps]
    return arms, (BASELINE if BASELINE in steps else steps[0])


def step_dir(out: Path, step: str, seed: int, several_seeds: bool) -> Path:
    return out / step / f"seed{seed}" if several_seeds else out / step


# Settings of the ablation itself, never of one of its runs.
_ABLATION_ONLY = {f.name for section in (AblationSection, LauncherSection) for f in fields(section)} | {
    "json_output"
}


def arm_config(
    cfg: RunConfig, arm: Arm, seed: int, output_dir: Path, threads: int | None = None
) -> RunConfig:
    """A fresh configuration for one run of ``arm``: the ablation's inputs plus the arm's values,
    resolved again (derived settings follow the arm); ``cfg`` itself is never changed. ``threads``
    (the launcher's share of the cores) is recorded unless the ablation set ``--threads`` itself."""
    flat = flatten(cfg)
    inputs = {k: flat[k] for k in cfg.explicit if k in flat and k not in _ABLATION_ONLY}
    inputs |= arm.values | {"seed": seed, "output_dir": str(output_dir)}
    if threads is not None and "threads" not in cfg.explicit:
        inputs["threads"] = threads
    if not cfg.train.dry_run:
        inputs["resume"] = "auto"  # an interrupted arm continues where its checkpoint left off
        inputs["save_checkpoint"] = True  # so that there is a checkpoint to continue from
    if cfg.track.tracker_run_name or cfg.track.tracker != "none":
        suffix = f"-{arm.name}" + (f"-seed{seed}" if cfg.ablation.ablation_seeds != 1 else "")
        inputs["tracker_run_name"] = (cfg.track.tracker_run_name or "ablation") + suffix
    try:
        return resolve(inputs, explicit=set(inputs))
    except ConfigError as e:
        raise UserError(f"ablation arm {arm.name}: {e}") from None


@dataclass(frozen=True)
class Job:
    """One (arm, seed) run: where it runs, its configuration, and what the summary calls it."""

    index: int  # 1-based, in plan order
    arm: Arm
    seed: int
    config: RunConfig

    @property
    def name(self) -> str:
        return f"{self.arm.name} (seed {self.seed})"

    @property
    def dir(self) -> Path:
        return Path(self.config.output.output_dir)

    @property
    def config_path(self) -> Path:
        return self.dir / config_file.CONFIG_TOML

    @property
    def log_path(self) -> Path:
        """The run's stdout and stderr, appended by every attempt, whatever launched it."""
        return self.dir / "job.log"

    @property
    def results_path(self) -> Path:
        return self.dir / "results.json"

    def write_config(self) -> None:
        """The run's configuration where the job reads it (and where the run keeps it)."""
        config_file.write(self.config, self.config_path)

    def command(self, gpus: int = 1) -> list[str]:
        """The job's command line: ``gpt2/train.py --config`` its file; under torchrun with ``gpus`` > 1."""
        script = str(REPO / "gpt2" / "train.py")
        if gpus > 1:
            launch = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={gpus}",
            ]
            return [*launch, script, "--config", str(self.config_path)]
        return [sys.executable, script, "--config", str(self.config_path)]


def plan(cfg: RunConfig, threads: int | None = None) -> tuple[list[Job], list[Arm], str, list[int]]:
    """Every (arm, seed) job of ``cfg``'s ablation, checked before any trains; with its arms, the
    control's name and the seeds."""
    arms, control = arms_of(cfg)
    count = cfg.ablation.ablation_seeds or cfg.ablation.max_seeds  # auto: as many as the rule may need
    seeds = [cfg.train.seed + k for k in range(count)]
    out = Path(cfg.output.output_dir)
    several = len(seeds) > 1
    jobs = [
        Job(i, arm, seed, arm_config(cfg, arm, seed, step_dir(out, arm.name, seed, several), threads))
        for i, (arm, seed) in enumerate(itertools.product(arms, seeds), 1)
    ]
    return jobs, arms, control, seeds
