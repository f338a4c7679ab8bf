"""The GPT-2 model and its architecture variants, chosen by :class:`GPTConfig` at construction."""

from __future__ import annotations

from typing import Any

from gpt2.model.config import GPTConfig

__all__ = ["GPT", "GPTConfig"]


def __getattr__(name: str) -> Any:
    # GPT pulls in torch; loading it lazily keeps `train.py --help` fast.
    if name == "GPT":
        from gpt2.model.gpt import GPT

        return GPT
    raise AttributeError(name)
