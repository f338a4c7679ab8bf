"""Gate statistics of a model (reference §5.2): what the reciprocal mechanisms learned.

Any attention or MLP module with a ``gates()`` method (name -> tensor) takes part, so a new
gated variant needs nothing here.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

import torch
from torch import nn


@torch.no_grad()
def gate_stats(model: nn.Module) -> dict[str, float]:
    """A flat ``name -> value`` dict of every gate of a :class:`~gpt2.model.gpt.GPT`; empty if none.

    Keys, for each gate family (``attn_w_std``, ``attn_w_rec``, ``attn_restart_alpha``,
    ``mlp_w_std``, ``mlp_w_rec``, ``mlp_gate_alpha``):

    - ``gates/<family>_{mean,std,min,max}`` over all layers (and heads); std is the population
      std, so a single value gives 0, not NaN;
    - ``gates/L<i>/<family>_h<h>`` per head, or ``gates/L<i>/<family>`` for a per-layer gate.

    Self-restart values are the clamped mix actually applied. All values are read from the
    device in one copy.
    """
    found: list[tuple[str, int, bool, torch.Tensor]] = []  # (family, layer, per_head, values)
    for layer, block in enumerate(model.transformer.h):
        for module in (block.attn, block.mlp):
            gates = getattr(module, "gates", None)
            if gates is None:
                continue
            for family, t in gates().items():
                found.append((family, layer, t.dim() > 0, t.detach().float().reshape(-1)))
    if not found:
        return {}
    flat = torch.cat([t for *_, t in found]).tolist()
    per_family: dict[str, list[float]] = defaultdict(list)
    per_layer: dict[str, float] = {}
    pos = 0
    for family, layer, per_head, t in found:
        values, pos = flat[pos : pos + t.numel()], pos + t.numel()
        per_family[family].extend(values)
        if per_head:
            per_layer.update({f"gates/L{layer}/{family}_h{h}": v for h, v in enumerate(values)})
        else:
            per_layer[f"gates/L{layer}/{family}"] = values[0]
    out: dict[str, float] = {}
    for family, values in per_family.items():
        out[f"gates/{family}_mean"] = statistics.fmean(values)
        out[f"gates/{family}_std"] = statistics.pstdev(values)
        out[f"gates/{family}_min"] = min(values)
        out[f"gates/{family}_max"] = max(values)
    out.update(per_layer)
    return out


# --------------------------------------------------------------------- scheduled reciprocal gates

W_REC_INIT = 0.1  # w_rec at init, and where a schedule sets it when it opens the gates


def add_reciprocal_gate(module: nn.Module, shape: tuple[int, ...], scheduled: bool) -> None:
    """Give ``module`` its ``w_rec`` gate; under a gate schedule it starts frozen: ``w_rec = 0``
    and a ``rec_coupling`` buffer (0) that multiplies it, so its gradient is exactly 0 too.

    The buffer is part of the state dict (a checkpoint taken mid-ramp resumes exactly); without a
    schedule there is none, and checkpoints keep their keys.
    """
    module.w_rec = nn.Parameter(torch.full(shape, 0.0 if scheduled else W_REC_INIT))
    if scheduled:
        module.register_buffer("rec_coupling", torch.zeros(()))
    else:
        module.rec_coupling = None


def coupled_w_rec(module: nn.Module) -> torch.Tensor:
    """The reciprocal gain the forward pass applies: ``w_rec``, times the coupling if scheduled."""
    return module.w_rec if module.rec_coupling is None else module.w_rec * module.rec_coupling


def scheduled_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose reciprocal gates a schedule drives (those with a ``rec_coupling``)."""
    return [m for m in model.modules() if getattr(m, "rec_coupling", None) is not None]


@torch.no_grad()
def set_reciprocal_coupling(model: nn.Module, coupling: float, *, open_at: float | None = None) -> None:
    """Set every scheduled module's coupling; ``open_at`` also sets ``w_rec`` to that value
    (the gates' opening: from then on they train)."""
    for m in scheduled_modules(model):
        m.rec_coupling.fill_(coupling)
        if open_at is not None:
            m.w_rec.fill_(open_at)
