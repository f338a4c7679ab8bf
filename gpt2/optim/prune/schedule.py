"""When to prune and how much: a linear or cubic ramp from the end of the warm-up to the target, then hold."""

from __future__ import annotations

from dataclasses import dataclass

RAMPS = ("linear", "cubic")  # ramp shapes; each score's reference shape is in scores.SCORES


@dataclass(frozen=True)
class SparsitySchedule:
    """Sparsity at iteration ``it``: the 0-based index of the optimizer step just taken, the
    reference's ``iter_num`` (and the LR schedule's step), so iteration ``it`` ends ``it + 1`` steps.

    ``0`` up to ``warmup``; ``target·p`` (``shape="linear"``) or ``target·p³`` (``"cubic"``) with
    ``p = (it − warmup)/(ramp_end − warmup)`` in between; ``target`` from ``ramp_end`` on. Masks
    are updated every ``frequency`` iterations during the ramp and once more at ``ramp_end``, so
    the target is reached exactly there.
    """

    target: float
    warmup: int
    ramp_end: int
    frequency: int = 50
    shape: str = "cubic"

    def __post_init__(self) -> None:
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {self.target}")
        if self.warmup < 0 or self.ramp_end <= self.warmup:
            raise ValueError(f"need 0 <= warmup < ramp_end, got {self.warmup} and {self.ramp_end}")
        if self.frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {self.frequency}")
        if self.shape not in RAMPS:
            raise ValueError(f"ramp shape must be one of {', '.join(RAMPS)}, got {self.shape!r}")

    def sparsity_at(self, it: float) -> float:
        if it <= self.warmup:
            return 0.0
        if it >= self.ramp_end:
            return self.target
        p = (it - self.warmup) / (self.ramp_end - self.warmup)
        return self.target * (p if self.shape == "linear" else p**3)

    def due(self, it: int, applied: float, position: float | None = None) -> bool:
        """Whether the masks should be updated after iteration ``it``, when they prune ``applied`` now.

        ``position``: where the run is on the iteration axis when that is further than ``it`` (a
        time-budgeted run maps its elapsed fraction of the budget onto it, as the LR schedule
        does); updates still happen every ``frequency`` iterations, and at the ramp end.
        """
        at = it if position is None else max(it, position)
        if self.sparsity_at(at) <= applied:
            return False
        return it % self.frequency == 0 or at >= self.ramp_end
