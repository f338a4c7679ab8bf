"""Pruning: one mask mechanism (masks), one schedule (schedule), importance scores by name (scores)."""

from gpt2.optim.prune.masks import MaskSet, prunable_parameters
from gpt2.optim.prune.schedule import SparsitySchedule
from gpt2.optim.prune.scores import SCORES, importance, layer_sparsity

__all__ = ["SCORES", "MaskSet", "SparsitySchedule", "importance", "layer_sparsity", "prunable_parameters"]
