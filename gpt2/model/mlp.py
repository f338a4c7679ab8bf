"""Feed-forward variants, registered in ``MLP`` under the name ``GPTConfig.mlp`` uses."""

from __future__ import annotations

import torch
from torch import nn

from gpt2.model.config import GPTConfig


def hidden_width(config: GPTConfig) -> int:
    """Width of the MLP's hidden layer (4x n_embd for GPT-2)."""
    return int(config.mlp_expansion * config.n_embd)


class MLP(nn.Module):
    """GPT-2 MLP: Linear -> exact GELU -> Linear -> dropout."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        width = hidden_width(config)
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True  # read by GPT._init_weights
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


MLP_VARIANTS: dict[str, type[nn.Module]] = {"standard": MLP}
