"""Pruning: one mask owner (pruner), boolean masks (masks), the sparsity schedule (schedule) and
importance scores by name (scores).

Names load lazily: the command line reads ``scores`` before torch is imported.
"""

from gpt2._lazy import lazy_attributes

_HOME = {
    "MaskSet": "masks",
    "prunable_parameters": "masks",
    "Pruner": "pruner",
    "SparsitySchedule": "schedule",
    "SCORES": "scores",
    "importance": "scores",
    "layer_sparsity": "scores",
}
__all__ = sorted(_HOME)
__getattr__ = lazy_attributes(__name__, _HOME)
