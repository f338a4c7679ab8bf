"""Causal self-attention variants.

Each variant is an ``nn.Module`` built from a :class:`GPTConfig` and registered in
``ATTENTION`` under the name that ``GPTConfig.attention`` uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpt2.model.config import GPTConfig

# Below this sequence length, bf16 attention on CPU runs in fp32 (see CausalSelfAttention.attend).
SHORT_BF16_CPU = 256


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with one fused QKV projection and PyTorch SDPA.

    Subclasses change the fused projection (:meth:`project`) or what happens between the
    projection and the output projection (:meth:`attend`), so the modules, their init and
    dropout stay identical across variants (a fair comparison needs exactly that).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True  # read by GPT._init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, 3C): the fused [q | k | v] projection."""
        return self.c_attn(x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) queries, keys, values -> (B, H, T, D) causal attention output."""
        p = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] < SHORT_BF16_CPU:
            # torch's CPU flash-attention backward is 3-5x slower in bf16 than in fp32 for short
            # sequences (T=64: 5.2 vs 1.5 ms forward+backward incl. casts); from T=256 bf16 wins.
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), dropout_p=p, is_causal=True
                )
            return out.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        q, k, v = self.project(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        y = self.attend(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class UnifiedRAttention(CausalSelfAttention):
    """Unified Reciprocal Attention (reference §3) in the folded layout, at the baseline's cost.

    The fused projection's three C-wide blocks are read as ``Qf | Kf | V``; within each head the
    first ``D - R`` channels of Qf / Kf are Q_std / K_std and the last R are K_low / Q_low, so one
    causal SDPA call with scale 1/√D scores

        S_ij = (w_std·<q_std_i, k_std_j> + w_rec·<k_low_i, q_low_j>) / √D.

    The gates multiply the query side only (the same scores as √w on both sides). Where a
    micro-batch has at least 3C token rows (any GPU run) they are folded into the Qf rows of the
    projection's weight and bias, a (3C, C) product per forward; with fewer rows (GPT-2 124M on
    CPU: 1,024 rows against 2,304) they scale the (B, H, T, D) queries instead, which is cheaper
    there. Both give the same result (tested). They are not clamped: without the reference's
    square root a gate may cross zero (a sign the Q_low weights could express anyway), and a
    clamp would freeze its gradient there for good.

    Modules, init and dropout are the base class's, so with gates (1, 1) this is exactly
    standard attention, and with the same seed V1's weights equal V0's. Self-restart
    (``config.self_restart``) mixes each head's output with its own value vector:
    ``(1 - a)·attention + a·V``, ``a = clamp(rwr_alpha, 0, 0.5)`` per head.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.rank = config.ra_rank
        self.d_std = self.head_dim - self.rank
        gate_shape = (config.n_head,) if config.ra_per_head_gates else ()
        self.w_std = nn.Parameter(torch.full(gate_shape, 0.9))
        self.w_rec = nn.Parameter(torch.full(gate_shape, 0.1))
        self.rwr_alpha = nn.Parameter(torch.full((config.n_head,), 0.05)) if config.self_restart else None

    def query_scale(self) -> torch.Tensor:
        """(C,) per-channel query gains: w_std on each head's first D - R channels, w_rec on the last R."""
        H = self.n_head
        g_std = self.w_std.reshape(-1, 1).expand(H, self.d_std)
        g_rec = self.w_rec.reshape(-1, 1).expand(H, self.rank)
        return torch.cat([g_std, g_rec], dim=1).reshape(-1)

    def restart_alpha(self) -> torch.Tensor | None:
        """(H,) the self-restart mix actually applied, or None without self-restart."""
        return None if self.rwr_alpha is None else self.rwr_alpha.clamp(0.0, 0.5)

    def fold_gates(self, rows: int) -> bool:
        """Whether a micro-batch of ``rows`` = B x T tokens gets the gates in the weight (else in q)."""
        return rows >= 3 * self.n_embd

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fold_gates(x.shape[0] * x.shape[1]):
            return self.c_attn(x)
        scale = F.pad(self.query_scale(), (0, 2 * self.n_embd), value=1.0)  # K and V rows keep gain 1
        weight = self.c_attn.weight * scale[:, None]
        bias = None if self.c_attn.bias is None else self.c_attn.bias * scale
        return F.linear(x, weight, bias)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.fold_gates(q.shape[0] * q.shape[2]):
            q = q * self.query_scale().view(1, self.n_head, 1, self.head_dim).to(q.dtype)
        y = super().attend(q, k, v)
        alpha = self.restart_alpha()
        if alpha is None:
            return y
        return torch.lerp(y, v, alpha.view(1, -1, 1, 1).to(y.dtype))  # y + a·(v - y), one kernel

    def gates(self) -> dict[str, torch.Tensor]:
        """Learned gate values by name ((H,) per head, 0-dim per layer), for gate statistics."""
        out = {"attn_w_std": self.w_std, "attn_w_rec": self.w_rec}
        alpha = self.restart_alpha()
        if alpha is not None:
            out["attn_restart_alpha"] = alpha
        return out


ATTENTION: dict[str, type[CausalSelfAttention]] = {
    "standard": CausalSelfAttention,
    "unified_ra": UnifiedRAttention,
}
