"""One optimizer step: accumulate micro-batch gradients, clip, step. Shared by loop and bench."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from gpt2 import faults
from gpt2.runtime import autocast
from gpt2.trainer.extension import Extension

Batch = tuple[torch.Tensor, torch.Tensor]


class StepOutput(NamedTuple):
    """What a step leaves on the device; the loop reads these only at log steps."""

    loss: torch.Tensor  # mean micro-batch loss
    grad_norm: torch.Tensor  # global gradient norm before clipping
    applied: torch.Tensor  # 1.0, or 0.0 when the step was skipped for a non-finite gradient


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` takes GradScaler's ``found_inf`` and then changes nothing.

    torch's fused AdamW does; AdamWSPAM and AdamWPrune say so themselves (``skips_on_device``).
    """
    own = getattr(optimizer, "skips_on_device", None)
    if own is not None:
        return bool(own)
    return type(optimizer) is torch.optim.AdamW and bool(optimizer.defaults.get("fused"))


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly FSDP DTensor) gradient norm."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class TrainStep:
    """Runs one optimizer step over ``accumulation`` micro-batches.

    The loss of each micro-batch is divided by ``accumulation`` before backward, so the
    accumulated gradient equals that of one batch ``accumulation`` times larger (all
    micro-batches have the same number of tokens). Nothing here reads a value back from
    the device when the optimizer :func:`skips_on_device` (fused AdamW, AdamWSPAM, AdamWPrune):
    a non-finite gradient norm is handed to it as ``found_inf`` (the flag GradScaler uses), and
    it then leaves weights, moments and step counts untouched. Other optimizers keep one host
    read for that check.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        dtype: torch.dtype,
        accumulation: int,
        grad_clip: float,
        forward_model: nn.Module | None = None,
        extensions: Sequence[Extension] = (),
        skip_nonfinite: bool = True,
        cudagraphs: bool = False,
    ) -> None:
        self.model = model
        self.forward_model = forward_model if forward_model is not None else model
        self.optimizer = optimizer
        self.device = device
        self.dtype = dtype
        self.accumulation = accumulation
        self.grad_clip = grad_clip
        self.extensions = list(extensions)
        self.skip_nonfinite = skip_nonfinite
        self.cudagraphs = cudagraphs  # the compiled model replays CUDA graphs (reduce-overhead)
        # Where a stop signal may abandon the micro-steps (the caller rewinds what they consumed);
        # the optimizer update after them always completes.
        self.cancellable: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.device_skip = (
            skip_nonfinite
            and not self.scaler.is_enabled()
            and skips_on_device(optimizer)
            and not hasattr(model, "set_requires_gradient_sync")  # FSDP2: DTensor params
        )

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def __call__(self, next_batch: Callable[[], Batch], lr: float) -> StepOutput:
        """Run the step at learning rate ``lr``.

        A non-finite gradient norm skips the optimizer step (weights and optimizer state stay
        as they were): on the device when the optimizer allows, else by one host read; with fp16 the
        gradient scaler makes that decision itself, as usual.
        """
        self.set_lr(lr)
        total = torch.zeros((), device=self.device)
        with self.cancellable():
            for micro in range(self.accumulation):
                faults.point("micro_step")
                if self.cudagraphs:  # each micro-step's graph outputs may overwrite the previous ones
                    torch.compiler.cudagraph_mark_step_begin()
                x, y = next_batch()
                last = micro == self.accumulation - 1
                with self._sync_context(last=last), autocast(self.device, self.dtype):
                    loss = self.forward_model(x, y) / self.accumulation
                self.scaler.scale(loss).backward()
                total += loss.detach()
        faults.point("optimizer_step")
        for ext in self.extensions:
            ext.before_optimizer_step(self.model, self.optimizer)
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self._params if p.grad is not None]
        raw_finite = None
        if getattr(self.optimizer, "clips_gradients", False):  # spike clipping would turn inf finite
            raw_finite = torch.isfinite(_full(torch.nn.utils.get_total_norm(grads, foreach=True)))
        prepare = getattr(self.optimizer, "prepare_gradients", None)
        if prepare is not None:  # e.g. SPAM's spike clipping and detection, on the unclipped gradients
            prepare()
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        full_norm = _full(grad_norm)
        finite = torch.isfinite(full_norm) if raw_finite is None else raw_finite & torch.isfinite(full_norm)
        applied = finite.float()  # 1.0, or 0.0 for a step to skip
        if self.skip_nonfinite and not self.device_skip and not self.scaler.is_enabled() and not applied:
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutput(total, full_norm, applied)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self._params, self.grad_clip, grad_norm, foreach=True)
        if self.device_skip:
            self.optimizer.found_inf = 1.0 - applied  # type: ignore[attr-defined]
            try:
                self.optimizer.step()
            finally:
                self.optimizer.found_inf = None  # type: ignore[attr-defined]
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        for ext in self.extensions:
            ext.after_optimizer_step(self.model, self.optimizer)
        checked = self.skip_nonfinite and not self.scaler.is_enabled()  # fp16: the scaler's business
        return StepOutput(total, full_norm, applied if checked else torch.ones((), device=self.device))

    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        """Reduce gradients across ranks only on the last micro-step (DDP and FSDP2)."""
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        no_sync = getattr(self.forward_model, "no_sync", None)
        if no_sync is None or last:
            return contextlib.nullcontext()
        return no_sync()
