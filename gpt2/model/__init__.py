"""The GPT-2 model and its architecture variants, chosen by :class:`GPTConfig` at construction."""

from gpt2.model.config import GPTConfig
from gpt2.model.gpt import GPT

__all__ = ["GPT", "GPTConfig"]
