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
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    attention: str = "standard"
    mlp: str = "standard"
    mlp_expansion: float = 4.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        """Raise ``ValueError`` with one readable line when the shapes cannot work."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_expansion <= 0:
            raise ValueError(f"mlp_expansion must be positive, got {self.mlp_expansion}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a dict, ignoring unknown keys (checkpoints from newer versions)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
