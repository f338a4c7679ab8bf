"""Named model presets as data: shapes for the model, and training defaults that suit them.

A flag the user gives always wins over a preset's training default; a preset's default wins
over the global one. ``why`` says where the numbers come from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    n_layer: int
    n_head: int
    n_embd: int
    why: str
    train: dict[str, Any] = field(default_factory=dict)  # RunConfig field name -> default
    # optimizer -> its peak LR where it differs from train["learning_rate"] (not given: that one)
    lr_by_optimizer: dict[str, float] = field(default_factory=dict)


# GPT-2 recipe of the earlier system (reference section 1): block 1024, batch 8 x accum 8, lr 6e-4.
_GPT2_TRAIN = dict(
    block_size=1024,
    batch_size=8,
    gradient_accumulation=8,
    learning_rate=6e-4,
    min_lr=6e-5,
    warmup_steps=200,
    dropout=0.1,
    eval_interval=100,
    eval_samples=200,
    log_interval=10,
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        4,
        4,
        128,
        why=(
            "CPU preset for the quickstart and tests. Chosen by validation loss after 90 s of "
            "training on 2 AMD EPYC cores, fp32 (experiments/tiny-preset-sweep.toml; the README's "
            "Performance section has the table): Muon at lr 8e-3 reached 5.09, against 5.25 at "
            "4e-3, 5.10 at 1.6e-2 and AdamW's best 5.77 (lr 1e-3; 5.78 at 2e-3, the previous "
            "preset, kept as the LR of every other optimizer); batch 16 against 8 and 32 (5.21 "
            "each). No dropout (the model underfits); beta2 0.99 because runs are only hundreds of "
            "steps long. Evaluation: 8 batches per split every 200 steps, capped by --eval-budget "
            "under --max-time."
        ),
        train=dict(
            block_size=64,
            batch_size=16,
            gradient_accumulation=1,
            optimizer="muon",
            learning_rate=2e-3,  # AdamW's and the others' (the previous preset's)
            warmup_steps=50,
            dropout=0.0,
            beta2=0.99,
            eval_interval=200,
            eval_samples=8,
            log_interval=10,
        ),
        lr_by_optimizer=dict(muon=8e-3),
    ),
    "gpt2": Preset(12, 12, 768, why="GPT-2 small (124M).", train=_GPT2_TRAIN),
    "gpt2-medium": Preset(24, 16, 1024, why="GPT-2 medium (350M).", train=_GPT2_TRAIN),
    "gpt2-large": Preset(36, 20, 1280, why="GPT-2 large (774M).", train=_GPT2_TRAIN),
    "gpt2-xl": Preset(48, 25, 1600, why="GPT-2 XL (1.5B).", train=_GPT2_TRAIN),
}
