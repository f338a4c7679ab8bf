"""Boolean pruning masks over a model's prunable weights: update by score, apply, measure.

A :class:`MaskSet` holds one ``torch.bool`` keep-mask per prunable weight (one byte per
weight; no float masks or copies). Pruned entries never come back: a mask update can only
add pruned entries (no regrowth), so "once pruned, stays pruned" holds for every score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def prunable_parameters(model: nn.Module, include_embeddings: bool = False) -> list[tuple[str, nn.Parameter]]:
    """``(name, weight)`` of every ``nn.Linear`` weight that is pruned by default, in module order.

    Left out: biases, LayerNorms, gates and other plain parameters, position embeddings, and
    any Linear whose weight is also an ``nn.Embedding``'s or that is named ``lm_head`` (GPT-2's
    output head is tied to the token embedding; pruning it prunes the embedding).
    ``include_embeddings=True`` puts such heads back in.
    For GPT-2 small that is the 4 projections of each block: 84,934,656 weights.
    """
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in seen:
            continue
        head = id(module.weight) in embedded or name.rsplit(".", 1)[-1] == "lm_head"
        if head and not include_embeddings:
            continue
        seen.add(id(module.weight))
        out.append((f"{name}.weight" if name else "weight", module.weight))
    return out


def short_name(name: str) -> str:
    """``transformer.h.3.attn.c_attn.weight`` -> ``h.3.attn.c_attn`` (for metric keys)."""
    if name.startswith("transformer."):
        name = name[len("transformer.") :]
    return name.removesuffix(".weight")


@torch.no_grad()
def zero_fraction(tensors: Sequence[Tensor]) -> list[float]:
    """Fraction of exactly-zero entries of each tensor, read back in one transfer."""
    if not tensors:
        return []
    counts = torch.stack([(t == 0).sum() for t in tensors]).tolist()
    return [c / t.numel() for c, t in zip(counts, tensors)]


SAMPLE_MIN = 1 << 16  # live scores drawn to bracket the global threshold
BRACKET_SIGMAS = 4.0  # half-width of the bracket, in standard errors of the sample quantile


def count(fraction: float, n: int) -> int:
    """``int(fraction·n)``, immune to float error just below an integer (0.5·1.3·100 is 64.999...)."""
    return int(fraction * n * (1 + 1e-12))


class MaskSet:
    """Keep-masks (``True`` = kept) for a list of named weights; all kept at first."""

    def __init__(self, named: Sequence[tuple[str, Tensor]]) -> None:
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.masks = [torch.ones_like(p, dtype=torch.bool) for p in self.params]
        # The same bytes as uint8: multiplying by them is ~2x faster on CPU than by bool.
        self._factors = [m.view(torch.uint8) for m in self.masks]
        self.active = False  # any entry pruned; while False the apply_* calls do nothing
        self.threshold_fallbacks = 0  # global thresholds that needed every live score (rare)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.masks)

    def same_params(self, named: Sequence[tuple[str, Tensor]]) -> bool:
        return len(named) == len(self.params) and all(p is q for (_, p), q in zip(named, self.params))

    # ----------------------------------------------------------------- apply
    @torch.no_grad()
    def apply_to_weights(self) -> None:
        if self.active:
            for p, f in zip(self.params, self._factors):
                p.mul_(f)

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        if self.active:
            for p, f in zip(self.params, self._factors):
                if p.grad is not None:
                    p.grad.mul_(f)

    @torch.no_grad()
    def apply_to_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the pruned entries of every per-weight optimizer state tensor (m, v, momentum ...)."""
        if not self.active:
            return
        for p, f in zip(self.params, self._factors):
            for v in optimizer.state.get(p, {}).values():
                if isinstance(v, Tensor) and v.shape == p.shape:
                    v.mul_(f)

    # ---------------------------------------------------------------- update
    @torch.no_grad()
    def update(
        self,
        score: Callable[[int], Tensor],
        sparsity: float,
        *,
        layer_sparsity: Callable[[float, int, int], float] | None = None,
        sample_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        """Prune the lowest-scoring weights until ``sparsity`` of all masked weights are pruned.

        ``score(i)`` gives the scores of weight ``i`` (same shape); it is called a few times per
        update, one weight at a time, so no score tensor for all weights ever exists. Already
        pruned entries count first (they score −inf), so masks only grow. One global threshold
        over all weights: the k-th smallest score, ``k = int(sparsity·N)``, and
        ``mask = score > threshold`` (ties with the threshold are pruned: exactly k entries
        when there are none). With ``layer_sparsity(s, i, n)`` each weight instead gets its own
        sparsity and threshold. ``sample_fraction > 0`` takes the threshold from that random
        fraction of the scores (seeded by ``seed``) instead; the count is then approximate.
        """
        if not self.params or sparsity <= 0:
            return
        if layer_sparsity is not None:
            for i in range(len(self)):
                s = self._scores(score, i)
                k = count(layer_sparsity(sparsity, i, len(self)), s.numel())
                if 0 < k < s.numel():
                    self.masks[i].copy_((s > torch.kthvalue(s, k).values).view_as(self.masks[i]))
        else:
            k = count(sparsity, self.numel)
            pruned = self.numel - sum(int(m.sum()) for m in self.masks)
            if k <= pruned:  # the −inf entries already make up the k smallest
                return
            threshold = self._kth(score, k, pruned, sample_fraction, seed)
            for i in range(len(self)):
                self.masks[i].copy_((self._scores(score, i) > threshold).view_as(self.masks[i]))
        self.active = True

    def _scores(self, score: Callable[[int], Tensor], i: int) -> Tensor:
        """Flat float32 scores of weight ``i``, −inf where it is already pruned."""
        s = score(i).reshape(-1).float()
        return s.masked_fill_(~self.masks[i].reshape(-1), float("-inf"))

    def _kth(
        self, score: Callable[[int], Tensor], k: int, pruned: int, sample_fraction: float, seed: int
    ) -> Tensor:
        """The k-th smallest score of all weights (``pruned`` of them −inf), one weight at a time.

        Sample-select: the quantile of a random sample of the live scores brackets the answer;
        one more pass counts the live scores below the bracket and keeps those inside it, and
        the k-th value is selected among those few (about 1% of the weights). A bracket that
        misses (about 1 in 10^4 updates) falls back to all live scores. With ``sample_fraction``
        the sample's quantile itself is the threshold.
        """
        n, live = self.numel, self.numel - pruned
        exact = not 0 < sample_fraction < 1
        draws = min(n, max(SAMPLE_MIN * n // live, int(n * (sample_fraction if not exact else 0.0))))
        gen = torch.Generator(device=self.params[0].device).manual_seed(seed)
        parts = []
        for i, p in enumerate(self.params):
            size = (max(1, round(draws * p.numel() / n)),)
            idx = torch.randint(p.numel(), size, generator=gen, device=gen.device)
            drawn = self._scores(score, i)[idx]
            parts.append(drawn[drawn > float("-inf")])
        sample = torch.cat(parts)
        m, q = sample.numel(), (k - pruned) / live
        if not exact:
            return torch.kthvalue(sample, min(m, max(1, round(q * m)))).values
        margin = BRACKET_SIGMAS * math.sqrt(q * (1 - q) / m) + 2.0 / m
        lo_rank, hi_rank = math.floor((q - margin) * m), math.ceil((q + margin) * m)
        lo = torch.kthvalue(sample, lo_rank).values if lo_rank >= 1 else torch.tensor(float("-inf"))
        hi = torch.kthvalue(sample, hi_rank).values if hi_rank <= m else torch.tensor(float("inf"))
        below, inside = 0, []
        for i in range(len(self)):
            s = self._scores(score, i)
            below += int((s < lo).sum())
            inside.append(s[(s >= lo) & (s <= hi) & (s > float("-inf"))])
        below -= pruned if lo > float("-inf") else 0  # live scores below the bracket
        candidates = torch.cat(inside)
        if below < k - pruned <= below + candidates.numel():
            return torch.kthvalue(candidates, k - pruned - below).values
        self.threshold_fallbacks += 1
        every = torch.cat([self._scores(score, i) for i in range(len(self))])  # the rare miss
        return torch.kthvalue(every, k).values

    # --------------------------------------------------------------- measure
    def mask_sparsity(self) -> float:
        """Fraction of entries the masks prune."""
        if not self.params:
            return 0.0
        return 1.0 - float(sum(m.sum() for m in self.masks)) / self.numel

    def weight_sparsity(self) -> tuple[float, dict[str, float]]:
        """(overall, per weight name) fraction of prunable weights that are exactly zero."""
        fractions = zero_fraction(self.params)
        total = sum(f * p.numel() for f, p in zip(fractions, self.params))
        overall = total / self.numel if self.params else 0.0
        return overall, dict(zip(self.names, fractions))

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "masks": list(self.masks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(
                f"checkpoint masks are for weights {state['names'][:3]}..., "
                f"this model prunes {self.names[:3]}..."
            )
        for m, saved in zip(self.masks, state["masks"]):
            m.copy_(saved.to(device=m.device, dtype=torch.bool))
        self.active = not all(bool(m.all()) for m in self.masks)
