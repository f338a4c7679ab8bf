"""The GPT-2 model and its architecture variants, chosen by :class:`GPTConfig` at construction."""

from gpt2._lazy import lazy_attributes
from gpt2.model.config import GPTConfig

__all__ = ["GPT", "GPTConfig"]
__getattr__ = lazy_attributes(__name__, {"GPT": "gpt"})  # GPT pulls in torch: `--help` stays fast
