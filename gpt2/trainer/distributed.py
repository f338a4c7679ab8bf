"""Process groups for ``torchrun``: one process per device, NCCL on CUDA, gloo on CPU.

A single process (no ``WORLD_SIZE`` in the environment) gets a trivial :class:`DistInfo` and
never touches ``torch.distributed``. The group is created once per process and reused, so an
ablation that trains several models in one process does not re-initialise it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env() -> DistInfo:
    """Rank and world size as torchrun sets them (a single process otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)


def init(info: DistInfo, device: torch.device, timeout_s: float = 600.0) -> torch.device:
    """Join the process group if needed; returns this rank's device.

    A collective that waits longer than ``timeout_s`` for another rank fails (gloo and NCCL
    alike); NCCL's watchdog then tears the process down (``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``
    unless set otherwise), so a dead or stuck rank never leaves the others hanging.
    """
    if not info.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        # Each torchrun restart in its own key space: the store may outlive the workers (shared
        # with the launcher's rendezvous), and a restarted rank must never read a dead one's address.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            store=dist.PrefixStore(f"gpt2/attempt_{attempt}", store),
            rank=rank,
            world_size=world,
            device_id=device if device.type == "cuda" else None,
            timeout=timeout,
        )
    return device


def shutdown(failed: bool = False) -> None:
    """Leave the process group. After a failure it is left to the process exit: destroying it
    would wait on collectives that the failed rank's peers may never finish."""
    if not failed and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``t`` over ranks (``t`` itself for a single process)."""
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` for a single process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def max_over_ranks(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Each value's maximum over the ranks (the values themselves for a single process)."""
    if not info.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def any_rank(flags: list[bool], info: DistInfo, device: torch.device) -> list[bool]:
    """Each flag, true on every rank where it is true on at least one (so all ranks act together)."""
    return [v > 0 for v in max_over_ranks([1.0 if f else 0.0 for f in flags], info, device)]


def parallelize(
    model: nn.Module,
    info: DistInfo,
    device: torch.device,
    *,
    parallel: str = "ddp",
    compile: bool = False,
    compile_mode: str = "default",
    find_unused_parameters: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """Shard, compile and wrap ``model`` for this process; returns ``(eval_model, forward_model)``.

    Under torchrun ``parallel="fsdp"`` shards each block, then the rest (embeddings, tied head,
    final norm), in place (FSDP2): build the optimizer after this. ``eval_model`` is the
    (compiled) model; ``forward_model`` is what training calls, DDP-wrapped under torchrun.
    """
    if info.enabled and parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    mode = None if compile_mode == "default" else compile_mode
    eval_model = torch.compile(model, mode=mode) if compile else model
    forward_model = eval_model
    if info.enabled and parallel != "fsdp":
        from torch.nn.parallel import DistributedDataParallel

        forward_model = DistributedDataParallel(
            eval_model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
    return eval_model, forward_model
