"""Causal self-attention variants.

Each variant is an ``nn.Module`` built from a :class:`GPTConfig` and registered in
``ATTENTION`` under the name that ``GPTConfig.attention`` uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpt2.model.config import GPTConfig


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with one fused QKV projection and PyTorch SDPA.

    Subclasses change what happens between the projection and the output projection
    by overriding :meth:`attend`, so projections, init and dropout stay identical
    across variants (a fair comparison needs exactly that).
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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) queries, keys, values -> (B, H, T, D) causal attention output."""
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        y = self.attend(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


ATTENTION: dict[str, type[CausalSelfAttention]] = {"standard": CausalSelfAttention}
