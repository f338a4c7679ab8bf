"""Optimizers, parameter groups and the learning-rate schedule; they work with any model.

Names load lazily: the command line reads the score registry (``prune.scores``) before torch
is imported.
"""

from gpt2._lazy import lazy_attributes

_HOME = {
    "AdamWPrune": "adamwprune",
    "AdamWSPAM": "spam",
    "OPTIMIZER_BUILDERS": "factory",
    "OptimSettings": "factory",
    "build_optimizer": "factory",
    "param_groups": "factory",
    "lr_at": "schedule",
}
__all__ = sorted(_HOME)
__getattr__ = lazy_attributes(__name__, _HOME)
