"""Causal self-attention variants.

Each variant is an ``nn.Module`` built from a :class:`GPTConfig` and registered in
``ATTENTION`` under the name that ``GPTConfig.attention`` uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt2.model.config import GPTConfig
from gpt2.model.gates import add_reciprocal_gate, coupled_w_rec

# Below this sequence length, bf16 attention on CPU runs in fp32 (see CausalSelfAttention.attend).
SHORT_BF16_CPU = 256


class KVCache:
    """Every layer's keys and values of the positions seen so far, for generation: the prompt is
    prefilled once, then each new token adds one position (buffers of ``capacity`` positions)."""

    def __init__(self, n_layer: int, capacity: int) -> None:
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0  # positions held (advanced by the model after its last layer)

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' (B, H, T, D) keys and values; returns all of them so far."""
        end = self.length + k.shape[-2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, {end} asked")
        if self.keys[layer] is None:
            shape = (*k.shape[:-2], self.capacity, k.shape[-1])
            self.keys[layer], self.values[layer] = k.new_empty(shape), v.new_empty(shape)
        keys, values = self.keys[layer], self.values[layer]
        assert keys is not None and values is not None
        keys[..., self.length : end, :] = k
        values[..., self.length : end, :] = v
        return keys[..., :end, :], values[..., :end, :]


def causal_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, offset: int
) -> torch.Tensor:
    """SDPA where query i sits at position ``offset + i`` of the keys (0: the usual causal case)."""
    if offset == 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if q.shape[-2] == 1:  # one new position sees every key
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    i = torch.arange(q.shape[-2], device=q.device).view(-1, 1) + offset
    mask = torch.arange(k.shape[-2], device=q.device).view(1, -1) <= i
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


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

    supports_kv_cache = True  # generation may prefill once and then add one position per token

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """(B, H, T, D) queries, (B, H, offset + T, D) keys and values -> (B, H, T, D) causal
        attention output; ``offset`` cached positions come before the queries."""
        p = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] < SHORT_BF16_CPU:
            # torch's CPU flash-attention backward is 3-5x slower in bf16 than in fp32 for short
            # sequences (T=64: 5.2 vs 1.5 ms forward+backward incl. casts); from T=256 bf16 wins.
            with torch.autocast("cpu", enabled=False):
                out = causal_sdpa(q.float(), k.float(), v.float(), p, offset)
            return out.to(q.dtype)
        return causal_sdpa(q, k, v, p, offset)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with ``cache``, the T positions follow the cached ones."""
        B, T, C = x.shape
        q, k, v = self.project(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if cache is None:
            y = self.attend(q, k, v)
        else:
            offset = cache.length
            k, v = cache.extend(layer, k, v)
            y = self.attend(q, k, v, offset)
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
        add_reciprocal_gate(self, gate_shape, scheduled=config.gate_schedule != "none")
        self.rwr_alpha = nn.Parameter(torch.full((config.n_head,), 0.05)) if config.self_restart else None

    def query_scale(self) -> torch.Tensor:
        """(C,) per-channel query gains: w_std on each head's first D - R channels, w_rec on the last R."""
        H = self.n_head
        g_std = self.w_std.reshape(-1, 1).expand(H, self.d_std)
        g_rec = coupled_w_rec(self).reshape(-1, 1).expand(H, self.rank)
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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if not self.fold_gates(q.shape[0] * q.shape[2]):
            q = q * self.query_scale().view(1, self.n_head, 1, self.head_dim).to(q.dtype)
        y = super().attend(q, k, v, offset)
        alpha = self.restart_alpha()
        if alpha is None:
            return y
        own = v[..., -q.shape[-2] :, :]  # each query's own value (the latest positions under a cache)
        return torch.lerp(y, own, alpha.view(1, -1, 1, 1).to(y.dtype))  # y + a·(v - y), one kernel

    def gates(self) -> dict[str, torch.Tensor]:
        """Learned gate values by name ((H,) per head, 0-dim per layer), for gate statistics."""
        out = {"attn_w_std": self.w_std, "attn_w_rec": self.w_rec}
        if self.rec_coupling is not None:
            out["attn_rec_coupling"] = self.rec_coupling
        alpha = self.restart_alpha()
        if alpha is not None:
            out["attn_restart_alpha"] = alpha
        return out


class PrunedKVAttention(CausalSelfAttention):
    """KV pruning (reference §4.3, V14-V19, C1-C3): each query attends to its ``k`` most important
    keys plus its ``r`` latest positions, ``k = round(kv_keep * block_size)`` (391 of 1024) and
    ``r = round(kv_recent * block_size)`` (64 of 1024).

    A key's importance for query i is the mean attention it received from queries 0..i (a
    cumulative mean over the query axis), so the selection, like everything else, sees no later
    token: strictly causal (tested by perturbing later tokens). ``k`` follows the block size, not
    the batch's length, so a prefix's outputs do not depend on what follows. With ``k`` at least
    the sequence length this is standard attention exactly (it then calls SDPA).

    - ``attention="kv_pruned"``: the softmax runs over the kept keys only (K and V pruned).
    - ``attention="v_pruned"`` (V19): the softmax runs over all keys, but only the kept keys'
      values are summed (V pruned; the weights of the dropped ones are not given back).
    - ``kv_learned``: the keep ratio is a parameter (init ``kv_keep``). A hard top-k has no
      gradient in k, so the kept set is a soft rank mask ``sigmoid((ratio * block_size - rank) / tau)``
      (rank 0 = most important, ``tau`` = 2% of the block size), applied as ``log(mask)`` on the
      scores (kv) or as a factor on the weights (v): the loss then pulls the ratio by how much the
      next-ranked keys matter. Nothing pushes it down: it is a measurement, not a budget.
    - ``kv_v_rank > 0`` (C1-C3): values pass through a learned D -> r -> D map (shared by the heads),
      initialised to the projection onto r of the D channels.
    - ``kv_gather``: the kept keys are gathered (B, H, T, k + recent, D) instead of masking the
      (B, H, T, T) scores; the same result, another cost (measured in the README).

    Costs more than SDPA: the full score matrix is formed twice (importance, then the pruned softmax).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.values_only = config.attention == "v_pruned"
        self.block_size = config.block_size
        self.keep = max(1, round(config.kv_keep * config.block_size))
        self.recent = round(config.kv_recent * config.block_size)
        self.gather = config.kv_gather
        self.keep_ratio = nn.Parameter(torch.tensor(config.kv_keep)) if config.kv_learned else None
        if config.kv_v_rank:
            basis = torch.eye(self.head_dim)[: config.kv_v_rank]
            # plain parameters: GPT's N(0, 0.02) init of Linears would start V near zero
            self.v_down = nn.Parameter(basis.t().clone())  # (D, r)
            self.v_up = nn.Parameter(basis.clone())  # (r, D)
        else:
            self.v_down = self.v_up = None

    supports_kv_cache = False  # the kept keys of a query depend on every earlier query's attention

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if offset:
            raise ValueError("KV pruning attention has no KV cache: generate without one")
        if self.v_down is not None:
            v = v @ self.v_down.to(v.dtype) @ self.v_up.to(v.dtype)
        T = q.shape[-2]
        if self.keep_ratio is None and self.keep >= T:
            return super().attend(q, k, v)  # every key is kept: standard attention
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        scores = scores.masked_fill(~causal, float("-inf"))
        rank = self._importance_rank(scores, causal)  # (B, H, T, T), 0 = kept first; causal only
        if self.gather:
            return self._gathered(q, k, v, rank)
        if self.keep_ratio is None:
            kept = (rank < self.keep + self.recent) & causal
            weight = kept.float()
            log_weight = torch.zeros_like(weight).masked_fill(~kept, float("-inf"))
        else:  # in fp32: in fp16, 1e-30 is 0 and log(0) would give the ratio a NaN gradient
            weight = self._soft_keep(rank, causal)
            log_weight = weight.clamp_min(1e-30).log()
        if self.values_only:
            probs = self._dropout(scores.float().softmax(dim=-1)) * weight
        else:
            probs = self._dropout((scores.float() + log_weight).softmax(dim=-1))
        return probs.to(v.dtype) @ v

    def _dropout(self, probs: torch.Tensor) -> torch.Tensor:
        return F.dropout(probs, self.dropout, training=self.training)

    @torch.no_grad()
    def _importance_rank(self, scores: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        """For each query i, each visible key's rank: the ``r`` latest first, then by mean
        received attention over queries 0..i (descending); later keys get rank T."""
        T = scores.shape[-1]
        probs = scores.float().softmax(dim=-1)
        seen = torch.arange(1, T + 1, device=scores.device, dtype=probs.dtype).view(T, 1)
        importance = probs.cumsum(dim=-2) / seen  # row i: mean over queries <= i
        i = torch.arange(T, device=scores.device)
        recent = causal & (i.view(1, T) > i.view(T, 1) - self.recent)
        importance = importance.masked_fill(recent, float("inf")).masked_fill(~causal, float("-inf"))
        order = importance.argsort(dim=-1, descending=True, stable=True)
        rank = order.argsort(dim=-1)
        return rank.masked_fill(~causal, T)

    def _soft_keep(self, rank: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        """The learned variant's mask: 1 for the recent keys, a sigmoid in rank for the others."""
        T = rank.shape[-1]
        n_recent = torch.clamp(torch.arange(1, T + 1, device=rank.device), max=self.recent).view(T, 1)
        tau = max(1.0, 0.02 * self.block_size)
        limit = self.keep_ratio.clamp(0.0, 1.0) * self.block_size
        soft = torch.sigmoid((limit - (rank - n_recent).float()) / tau)
        return torch.where(rank < n_recent, torch.ones_like(soft), soft) * causal

    def _gathered(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: torch.Tensor
    ) -> torch.Tensor:
        """Fixed-k KV pruning by gathering each query's kept keys and values."""
        B, H, T, D = q.shape
        n = min(self.keep + self.recent, T)
        kept = rank.argsort(dim=-1)[..., :n]  # (B, H, T, n) key positions, kept first (later keys last)
        valid = rank.gather(-1, kept) < self.keep + self.recent
        flat = kept.reshape(B, H, T * n, 1).expand(-1, -1, -1, D)
        ks = k.gather(2, flat).view(B, H, T, n, D)
        vs = v.gather(2, flat).view(B, H, T, n, D)
        scores = (ks @ q.unsqueeze(-1)).squeeze(-1) * (1.0 / math.sqrt(D))  # (B, H, T, n)
        valid &= kept <= torch.arange(T, device=q.device).view(T, 1)
        probs = self._dropout(scores.masked_fill(~valid, float("-inf")).softmax(dim=-1))
        return (probs.unsqueeze(-2) @ vs).squeeze(-2)

    def gates(self) -> dict[str, torch.Tensor]:
        """The learned keep ratio, where there is one (for gate statistics)."""
        return {} if self.keep_ratio is None else {"kv_keep_ratio": self.keep_ratio}


ATTENTION: dict[str, type[CausalSelfAttention]] = {
    "standard": CausalSelfAttention,
    "unified_ra": UnifiedRAttention,
    "kv_pruned": PrunedKVAttention,
    "v_pruned": PrunedKVAttention,
}
