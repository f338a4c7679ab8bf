"""Feed-forward variants, registered in ``MLP_VARIANTS`` under the name ``GPTConfig.mlp`` uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpt2.model.config import GPTConfig
from gpt2.model.gates import add_reciprocal_gate, coupled_w_rec


class MLP(nn.Module):
    """GPT-2 MLP: Linear C -> width (``config.mlp_width``) -> exact GELU -> Linear -> dropout."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        width = config.mlp_width
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True  # read by GPT._init_weights
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class ReciprocalMLP(nn.Module):
    """R-MLP (reference §4.1): the hidden layer split into a standard and a low-rank reciprocal path.

    ``h = [w_std·GELU(up_std x) | w_rec·α·mix(GELU(up_low x))]`` then ``down``. The widths add up
    to the baseline's (``up_std`` + ``up_low`` = ``mlp_width``), so FLOPs equal the baseline MLP's at
    the same expansion. Linears follow ``config.bias`` and GPT-2's init (``down`` is a residual
    projection). The optional mixer starts as the identity, so a mixer step starts as the same
    function as the step without it. The optional ``gate_alpha`` is one scalar per layer (as in
    the reference; it is redundant with ``w_rec`` but kept so the V-series means the same thing).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        width, rank = config.mlp_width, config.rmlp_rank
        self.d_std, self.rank = width - rank, rank
        self.up_std = nn.Linear(config.n_embd, self.d_std, bias=config.bias)
        self.up_low = nn.Linear(config.n_embd, rank, bias=config.bias)
        self.gelu = nn.GELU()
        self.down = nn.Linear(width, config.n_embd, bias=config.bias)
        self.down.residual_projection = True  # read by GPT._init_weights
        self.dropout = nn.Dropout(config.dropout)
        self.w_std = nn.Parameter(torch.tensor(0.9))
        add_reciprocal_gate(self, (), scheduled=config.gate_schedule != "none")
        if config.rmlp_mixer:
            # Plain parameters rather than nn.Linear, so GPT's N(0, 0.02) init leaves the identity alone.
            self.mixer_weight = nn.Parameter(torch.eye(rank))
            self.mixer_bias = nn.Parameter(torch.zeros(rank)) if config.bias else None
        else:
            self.mixer_weight = self.mixer_bias = None
        self.gate_alpha = nn.Parameter(torch.tensor(0.1)) if config.rmlp_gates else None

    def column_scale(self) -> torch.Tensor:
        """(width,) gains of the hidden channels: w_std on the standard ones, w_rec·α on the low ones."""
        w_rec = coupled_w_rec(self)
        low = w_rec if self.gate_alpha is None else w_rec * self.gate_alpha
        return torch.cat([self.w_std.expand(self.d_std), low.expand(self.rank)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C).

        Computed as the baseline MLP's two matmuls: the up-projections are stacked into one weight
        (one GELU over all channels), and the gates and the mixer, which all act after the
        non-linearity, are folded into ``down``'s weight and bias. Only weight-sized products
        are added; no (B, T, width) concatenation or scaling (GPT-2 124M, bf16, 2 CPU cores:
        V3's step went from 1.10x V0's to 1.04x; on a GPU's larger micro-batches the weight-sized
        products are a smaller share still).
        """
        up_w, up_b, weight, bias = self.folded()
        return self.dropout(F.linear(self.gelu(F.linear(x, up_w, up_b)), weight, bias))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(c_fc weight, c_fc bias, c_proj weight, c_proj bias) of the standard MLP that computes
        this R-MLP exactly: the up-projections stacked, the gates and the mixer in the down one."""
        up_w = torch.cat([self.up_std.weight, self.up_low.weight])
        up_b = None if self.up_std.bias is None else torch.cat([self.up_std.bias, self.up_low.bias])
        weight, bias = self.down.weight * self.column_scale(), self.down.bias
        if self.mixer_weight is not None:
            # down(... | g·(M h_low + b)) = (down_low·g) M h_low + (down_low·g) b: fold M into the columns
            low = weight[:, self.d_std :]
            weight = torch.cat([weight[:, : self.d_std], low @ self.mixer_weight], dim=1)
            if self.mixer_bias is not None:
                bias = bias + low @ self.mixer_bias
        return up_w, up_b, weight, bias

    def gates(self) -> dict[str, torch.Tensor]:
        """Learned gate values by name (0-dim tensors), for gate statistics."""
        out = {"mlp_w_std": self.w_std, "mlp_w_rec": self.w_rec}
        if self.rec_coupling is not None:
            out["mlp_rec_coupling"] = self.rec_coupling
        if self.gate_alpha is not None:
            out["mlp_gate_alpha"] = self.gate_alpha
        return out


MLP_VARIANTS: dict[str, type[nn.Module]] = {"standard": MLP, "reciprocal": ReciprocalMLP}
