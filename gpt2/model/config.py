"""Model configuration: shapes plus the names of the attention and MLP variants."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class GPTConfig:
    """Everything the model needs; nothing about training.

    ``attention`` and ``mlp`` name entries of the variant registries in
    :mod:`gpt2.model.attention` and :mod:`gpt2.model.mlp`, so a new variant is a
    registered class plus config fields, never a patch applied after construction.
    """

    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64 for fast matmuls
    # Few positions have a target (synthetic probe tasks): the CPU loss runs the LM head on those rows
    # only. Exact either way; off for text, where finding them would cost a host read per step.
    sparse_targets: bool = False
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    attention: str = "standard"
    mlp: str = "standard"
    mlp_expansion: float = 4.0  # hidden width = int(mlp_expansion * n_embd), for every MLP variant
    # Unified RA (attention="unified_ra"): R of each head's D channels are reciprocal.
    ra_rank: int = 4
    ra_per_head_gates: bool = True  # False: one (w_std, w_rec) pair per layer
    self_restart: bool = False  # out = (1-a)·attention + a·V, per-head a in [0, 0.5]
    # Reciprocal MLP (mlp="reciprocal"): R_ff of the hidden channels form the low path.
    rmlp_rank: int = 64
    rmlp_mixer: bool = False  # R_ff x R_ff linear map on the low path
    rmlp_gates: bool = False  # extra learned scalar gate_alpha on the low path
    # "delayed" or "variance": the reciprocal gates (RA and R-MLP w_rec) start frozen at 0 with a
    # coupling buffer at 0; a training schedule opens them (the model only holds the state).
    gate_schedule: str = "none"
    # KV pruning (attention="kv_pruned" or "v_pruned"): each query keeps its top-k keys by mean
    # received attention, k = round(kv_keep * block_size), plus the round(kv_recent * block_size)
    # latest positions; both scale with the block size.
    kv_keep: float = 0.382  # ~ 1/(1 + phi): 391 of 1024
    kv_recent: float = 0.0625  # 64 of 1024
    kv_learned: bool = False  # the keep ratio is a learned parameter (soft rank mask), init kv_keep
    kv_gather: bool = False  # compute the kept keys by gathering them rather than masking scores
    kv_v_rank: int = 0  # > 0: V compressed to this many dims per head by a learned map (C1-C3)

    def __post_init__(self) -> None:
        if self.attention != "unified_ra":  # the gate layout means nothing without RA gates
            self.ra_per_head_gates = True

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        """Hidden width of the MLP (3072 for GPT-2 small at 4x)."""
        return int(self.mlp_expansion * self.n_embd)

    def validate(self) -> None:
        """Raise ``ValueError`` with one readable line when the shapes cannot work."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_expansion <= 0 or self.mlp_width < 1:
            raise ValueError(f"mlp_expansion must give a positive width, got {self.mlp_expansion}")
        if self.attention == "unified_ra" and not 0 < self.ra_rank < self.head_dim:
            raise ValueError(f"ra_rank must be in [1, head_dim={self.head_dim}), got {self.ra_rank}")
        if self.self_restart and self.attention != "unified_ra":
            raise ValueError("self_restart needs attention='unified_ra'")
        if self.mlp == "reciprocal" and not 0 < self.rmlp_rank < self.mlp_width:
            raise ValueError(f"rmlp_rank must be in [1, MLP width={self.mlp_width}), got {self.rmlp_rank}")
        if (self.rmlp_mixer or self.rmlp_gates) and self.mlp != "reciprocal":
            raise ValueError("rmlp_mixer and rmlp_gates need mlp='reciprocal'")
        if self.gate_schedule not in ("none", "delayed", "variance"):
            raise ValueError(f"gate_schedule must be none, delayed or variance, got {self.gate_schedule!r}")
        if self.gate_schedule != "none" and not self.has_reciprocal_gates:
            raise ValueError(
                "gate_schedule needs reciprocal gates (attention='unified_ra' or mlp='reciprocal')"
            )
        if self.attention in ("kv_pruned", "v_pruned"):
            if not 0 < self.kv_keep <= 1 or not 0 <= self.kv_recent <= 1:
                k, r = self.kv_keep, self.kv_recent
                raise ValueError(f"kv_keep must be in (0, 1] and kv_recent in [0, 1], got {k}, {r}")
            if not 0 <= self.kv_v_rank <= self.head_dim:
                raise ValueError(f"kv_v_rank must be in [0, head_dim={self.head_dim}], got {self.kv_v_rank}")
            if self.kv_gather and (self.kv_learned or self.attention != "kv_pruned"):
                raise ValueError("kv_gather computes fixed-k KV pruning only (attention='kv_pruned')")

    @property
    def has_reciprocal_gates(self) -> bool:
        return self.attention == "unified_ra" or self.mlp == "reciprocal"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a dict, ignoring unknown keys (checkpoints from newer versions)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
