"""Optimizers, parameter groups and the learning-rate schedule; they work with any model."""

from gpt2.optim.adamwprune import AdamWPrune
from gpt2.optim.factory import OPTIMIZER_BUILDERS, build_optimizer, param_groups
from gpt2.optim.schedule import lr_at
from gpt2.optim.spam import AdamWSPAM

__all__ = ["OPTIMIZER_BUILDERS", "AdamWPrune", "AdamWSPAM", "build_optimizer", "lr_at", "param_groups"]
