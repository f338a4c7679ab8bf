"""Checkpoints assembled from stateful parts; the files themselves are :mod:`gpt2.checkpoint_file`'s.

A checkpoint is one flat dict. Each part of a run (model and optimizer, train state, RNG
streams, data position, extensions, ...) owns some of its keys: :func:`collect` merges the
parts' ``state_dict()`` and :func:`restore` hands the whole dict to each part's
``load_state_dict()``, which reads its own keys, as torchtitan's checkpointer does with its
``Stateful`` objects. Resuming and the self-healing restart both restore through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from gpt2.checkpoint_file import BEST, LAST, load, numbered, prune_numbered, save_atomic, step_name
from gpt2.errors import UserError

__all__ = [
    "BEST",
    "LAST",
    "Keyed",
    "ModelAndOptimizer",
    "RankRNG",
    "RunIdentity",
    "Stateful",
    "collect",
    "load",
    "numbered",
    "prune_numbered",
    "restore",
    "save_atomic",
    "step_name",
]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def collect(parts: Mapping[str, Stateful]) -> dict[str, Any]:
    """One checkpoint dict from ``parts``; their keys must not collide."""
    out: dict[str, Any] = {}
    for name, part in parts.items():
        state = part.state_dict()
        clash = out.keys() & state.keys()
        if clash:
            raise ValueError(f"checkpoint part {name!r} reuses the key(s) {sorted(clash)}")
        out.update(state)
    return out


def restore(parts: Mapping[str, Stateful], state: dict[str, Any], path: Path) -> None:
    """Load ``state`` (read from ``path``) into every part, in order; a mismatch names the file."""
    try:
        for part in parts.values():
            part.load_state_dict(state)
    except ValueError as e:
        raise UserError(f"checkpoint {path}: {e}") from None


class Keyed:
    """A part whose whole state lives under one key (``data``, ``scaler``, ...)."""

    def __init__(self, key: str, part: Any, default: Any = None) -> None:
        self.key, self.part, self.default = key, part, default

    def state_dict(self) -> dict[str, Any]:
        return {self.key: self.part.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        value = state.get(self.key, self.default)
        if value is None:
            raise ValueError(f"no {self.key!r} state")
        self.part.load_state_dict(value)


class ModelAndOptimizer:
    """The weights and the optimizer state; under FSDP, full tensors gathered to rank 0's CPU.

    The FSDP form keys the optimizer state by parameter name (``by_name``), so such a file loads
    at any world size and into a single process. Saving is collective under FSDP.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> None:
        self.model, self.optimizer, self.fsdp = model, optimizer, fsdp

    def state_dict(self) -> dict[str, Any]:
        if not self.fsdp:
            return {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "optimizer_format": "by_id",
            }
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=opts)
        return {"model": model_state, "optimizer": optim_state, "optimizer_format": "by_name"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("optimizer_format") == "by_name":  # written under FSDP; loads sharded or not
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        elif self.fsdp:
            raise ValueError("it was written without FSDP; resume it with --parallel ddp")
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])


class RankRNG:
    """Every rank's RNG state (its dropout stream), gathered to each rank: saving is collective.

    A checkpoint saved at another world size has no state for some ranks (older ones keep rank
    0's alone, as ``rng``): each rank is then seeded afresh from (seed, rank, step), never with
    rank 0's stream copied to all.
    """

    def __init__(self, dist: Any, device: torch.device, seed: int) -> None:
        self.dist, self.device, self.seed = dist, device, seed

    def state_dict(self) -> dict[str, Any]:
        from gpt2.trainer.distributed import gather_objects

        mine: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"rng_ranks": gather_objects(mine, self.dist)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank, world = self.dist.rank, self.dist.world_size
        ranks = state.get("rng_ranks")
        if ranks is not None:
            mine = ranks[rank] if len(ranks) == world else None
        else:
            mine = state.get("rng") if world == 1 else None
        if mine is None:
            torch.manual_seed(self.seed + 1_000_003 * rank + int(state["step"]))
            return
        torch.set_rng_state(mine["torch"])
        if self.device.type == "cuda" and "cuda" in mine:
            torch.cuda.set_rng_state(mine["cuda"], self.device)


class RunIdentity:
    """What was trained: the run config (for reading) and the model config (checked on load)."""

    def __init__(self, config: dict[str, Any], model_config: Any) -> None:
        self.config, self.model_config = config, model_config

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config, "model_config": self.model_config.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = type(self.model_config).from_dict(state.get("model_config", {}))
        if saved != self.model_config:
            raise ValueError(
                f"it holds a different model ({saved}) than this run builds ({self.model_config})"
            )
