"""Build an optimizer by name with decay / no-decay parameter groups.

The factory reads its settings through :class:`OptimSettings`, not the run configuration's class:
the configuration imports this package's score registry, so this package must not import it back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from gpt2.optim.adamwprune import AdamWPrune
from gpt2.optim.spam import PAPER_EPS, AdamWSPAM


class OptimSettings(Protocol):
    """The optimizer settings the builders read; :class:`gpt2.config.OptimSection`, once resolved
    (no field left ``None``), is one."""

    optimizer: str
    learning_rate: float
    weight_decay: float
    beta1: float
    beta2: float
    muon_momentum: float
    muon_ns_dtype: str
    spam_theta: float
    spam_interval: int
    spam_warmup_steps: int
    spam_enable_clip: bool
    spam_spike_detection: bool
    spam_amsgrad: bool
    spam_variant: str
    adamwprune_variant: str
    adamwprune_base_optimizer_name: str
    adamwprune_beta1: float
    adamwprune_beta2: float
    adamwprune_weight_decay: float
    adamwprune_amsgrad: bool


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay >=2-D weights (Linear weights, the tied embedding); never biases, norms or gates.

    Tied parameters appear once (``named_parameters`` de-duplicates them).
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _fused_ok(model: nn.Module) -> bool:
    """Fused Adam kernels need every parameter on one floating-point CUDA/CPU device."""
    devices = {p.device.type for p in model.parameters()}
    return len(devices) == 1 and devices <= {"cuda", "cpu"}


def _adamw(model: nn.Module, cfg: OptimSettings, compile: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        eps=1e-8,
        fused=_fused_ok(model),
    )


def _adam(model: nn.Module, cfg: OptimSettings, compile: bool) -> torch.optim.Optimizer:
    # Plain Adam would couple decay into the gradient (L2); as in the reference it gets none.
    return torch.optim.Adam(
        param_groups(model, 0.0),
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        eps=1e-8,
        fused=_fused_ok(model),
    )


def _sgd(model: nn.Module, cfg: OptimSettings, compile: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, momentum=0.9)


def _spam_settings(cfg: OptimSettings, compile: bool) -> dict[str, Any]:
    return dict(
        eps=PAPER_EPS if cfg.spam_variant == "paper" else 1e-8,  # each variant's own Adam eps
        spam_variant=cfg.spam_variant,
        compile_clip=compile,
        theta=cfg.spam_theta,
        interval=cfg.spam_interval,
        warmup_steps=cfg.spam_warmup_steps,
        enable_clip=cfg.spam_enable_clip,
        spike_detection=cfg.spam_spike_detection,
    )


def _adamwspam(model: nn.Module, cfg: OptimSettings, compile: bool) -> torch.optim.Optimizer:
    return AdamWSPAM(
        param_groups(model, cfg.weight_decay),
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        amsgrad=cfg.spam_amsgrad,
        fused=_fused_ok(model),
        **_spam_settings(cfg, compile),
    )


def _adamwprune(model: nn.Module, cfg: OptimSettings, compile: bool) -> torch.optim.Optimizer:
    spam = (
        _spam_settings(cfg, compile) if cfg.adamwprune_base_optimizer_name == "adamwspam" else {"eps": 1e-8}
    )
    return AdamWPrune(
        param_groups(model, cfg.adamwprune_weight_decay),
        variant=cfg.adamwprune_variant,
        lr=cfg.learning_rate,
        betas=(cfg.adamwprune_beta1, cfg.adamwprune_beta2),
        amsgrad=cfg.adamwprune_amsgrad,
        fused=_fused_ok(model),
        **spam,
    )


def muon_ns_dtype(name: str, device: torch.device) -> torch.dtype:
    """Muon's Newton-Schulz precision: ``auto`` is bf16 where its matmuls are fast (CUDA, AMX CPUs)."""
    if name != "auto":
        return getattr(torch, name)
    from gpt2.runtime import cpu_has_native_bf16

    return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32


def muon_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon's, AdamW's): the blocks' 2-D weights, and everything else (embeddings and the head
    tied to them, LayerNorms, biases, gates)."""
    muon, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (muon if p.dim() == 2 and name.startswith("transformer.h.") else rest).append(p)
    return muon, rest


def _muon(model: nn.Module, cfg: OptimSettings, compile: bool) -> torch.optim.Optimizer:
    from gpt2.optim.muon import Muon, MuonWithAdamW

    matrices, rest = muon_params(model)
    device = next(model.parameters()).device
    muon = Muon(
        matrices,
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        momentum=cfg.muon_momentum,
        adjust_lr_fn="match_rms_adamw",
        ns_dtype=muon_ns_dtype(cfg.muon_ns_dtype, device),
    )
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        eps=1e-8,
        fused=_fused_ok(model),
    )
    return MuonWithAdamW(muon, adamw)


OPTIMIZER_BUILDERS: dict[str, Callable[[nn.Module, OptimSettings, bool], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamwspam": _adamwspam,
    "adamwprune": _adamwprune,
    "adam": _adam,
    "sgd": _sgd,
    "muon": _muon,
}


def build_optimizer(model: nn.Module, cfg: OptimSettings, compile: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, over ``model``'s trainable parameters.

    ``compile``: the run compiles (``--compile``), so optimizer work that torch.compile fuses
    (SPAM's clipping) is compiled too.
    """
    try:
        builder = OPTIMIZER_BUILDERS[cfg.optimizer]
    except KeyError:
        known = sorted(OPTIMIZER_BUILDERS)
        raise ValueError(f"optimizer {cfg.optimizer!r} is not available; known: {known}") from None
    return builder(model, cfg, compile)
