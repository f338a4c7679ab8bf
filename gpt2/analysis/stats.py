"""Paired comparisons of arms against the control, from ``scipy.stats``: intervals, tests, Holm's
correction across arms, the minimum detectable effect, and the sequential rule that says when
enough seeds have run.

The sequential rule is a group-sequential design with alpha spending (Lan and DeMets, 1983, with
Pocock's spending function ``alpha * ln(1 + (e - 1) * t)``). Look k, after n_k of at most K seeds,
spends ``alpha_k = f(n_k / K) - f(n_{k-1} / K)`` of the error rate. At that look an arm is decided
when its Holm-adjusted p-value is at most ``alpha_k``: a *difference* (the paired t-test of Δ = 0) or
*no difference larger than E* (the two one-sided tests of |Δ| >= E). Since the alphas of the looks
add up to ``alpha``, the chance of any false call over all looks and arms is at most ``alpha``
whatever the looks' correlation (a union bound: conservative, and valid without the normal
approximation of the classical boundaries).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

ALPHA = 0.05
POWER = 0.8
N_MIN = 2  # seeds of the first look (a paired t-test needs two)
METHOD = (
    "group-sequential paired t-tests, Lan-DeMets alpha spending (Pocock-type) over the looks, "
    "Holm-Bonferroni across arms at each look"
)


def _t():
    from scipy import stats

    return stats.t


@functools.lru_cache(maxsize=4096)
def t_quantile(q: float, df: int) -> float:
    """Student's t quantile (cached: the sequential rule asks for the same ones at every look)."""
    return float(_t().ppf(q, df))


@dataclass(frozen=True)
class Paired:
    """Δ = arm - control over seeds: its mean, spread and the tests of it."""

    n: int
    mean: float
    sd: float | None
    se: float | None
    ci: tuple[float, float] | None  # at 1 - alpha
    p: float | None  # two-sided, Δ = 0
    p_equivalent: float | None  # two one-sided tests of |Δ| >= margin (None without a margin)
    mde: float | None  # smallest |Δ| found with probability POWER by a two-sided test at alpha

    def to_dict(self) -> dict:
        return asdict(self)


def paired(deltas: Sequence[float], alpha: float = ALPHA, margin: float | None = None) -> Paired:
    """The paired comparison of ``deltas`` (one per seed) at level ``alpha``; ``margin``: E, for
    the equivalence test."""
    n = len(deltas)
    mean = math.fsum(deltas) / n if n else math.nan
    if n < 2:
        return Paired(n, mean, None, None, None, None, None, None)
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in deltas) / (n - 1))
    se = sd / math.sqrt(n)
    t, df = _t(), n - 1
    half = t_quantile(1 - alpha / 2, df) * se
    mde = (t_quantile(1 - alpha / 2, df) + t_quantile(POWER, df)) * se
    if se == 0:  # every seed gave the same Δ
        p = 1.0 if mean == 0 else 0.0
        p_eq = None if margin is None else (0.0 if abs(mean) < margin else 1.0)
        return Paired(n, mean, sd, se, (mean, mean), p, p_eq, 0.0)
    p = float(2 * t.sf(abs(mean) / se, df))
    p_eq = None
    if margin is not None:  # H0: Δ <= -E or Δ >= E; both one-sided tests must reject
        p_eq = float(max(t.sf((mean + margin) / se, df), t.cdf((mean - margin) / se, df)))
    return Paired(n, mean, sd, se, (mean - half, mean + half), p, p_eq, float(mde))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (step-down; None stays None and is not counted)."""
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m, out, running = len(present), list(pvalues), 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def spent(n: int, n_max: int, alpha: float = ALPHA, n_min: int = N_MIN) -> float:
    """The alpha spent by looks up to ``n`` seeds (Pocock-type spending over seeds n_min..n_max)."""
    if n < n_min:
        return 0.0
    t = min(1.0, (n - n_min + 1) / (n_max - n_min + 1))
    return alpha * math.log(1 + (math.e - 1) * t)


def look_alpha(n: int, n_max: int, alpha: float = ALPHA, n_min: int = N_MIN) -> float:
    """The alpha of the look at ``n`` seeds: what the spending function adds there."""
    return spent(n, n_max, alpha, n_min) - spent(n - 1, n_max, alpha, n_min)


@dataclass(frozen=True)
class Verdict:
    """One arm against the control at one look."""

    arm: str
    paired: Paired
    p_adjusted: float | None
    p_equivalent_adjusted: float | None
    alpha: float  # this look's level
    decision: str  # "difference", "no difference > E", "undecided" or "no test" (fewer than 2 seeds)
    ruled_out: float | None  # effects larger than this are excluded at the look's level


def decide(
    deltas: dict[str, Sequence[float]], alpha: float, margin: float | None = None
) -> dict[str, Verdict]:
    """Verdicts for every arm at level ``alpha`` (one look), Holm-adjusted across the arms."""
    arms = list(deltas)
    tests = {a: paired(deltas[a], alpha, margin) for a in arms}
    p_adj = dict(zip(arms, holm([tests[a].p for a in arms]), strict=True))
    eq_adj = dict(zip(arms, holm([tests[a].p_equivalent for a in arms]), strict=True))
    out = {}
    for a in arms:
        t = tests[a]
        if t.p is None:
            decision, ruled_out = "no test", None
        else:
            if p_adj[a] is not None and p_adj[a] <= alpha:
                decision = "difference"
            elif eq_adj[a] is not None and eq_adj[a] <= alpha:
                decision = f"no difference > {margin:g}"
            else:
                decision = "undecided"
            # the (1 - 2 alpha) interval's far end: TOST at alpha rules out every effect beyond it
            half = t_quantile(1 - alpha, t.n - 1) * t.se
            ruled_out = abs(t.mean) + half
        out[a] = Verdict(a, t, p_adj[a], eq_adj[a], alpha, decision, ruled_out)
    return out


def sequential(
    deltas: dict[str, Sequence[float]],
    max_seeds: int,
    alpha: float = ALPHA,
    margin: float | None = None,
    n_min: int = N_MIN,
) -> dict[str, Verdict]:
    """The sequential rule's verdicts after every look so far: the look at n seeds tests each arm's
    first n deltas (in seed order) at :func:`look_alpha`; an arm keeps the first decisive verdict it
    got, an undecided one the last look's. Recomputed from the data alone, so a rerun agrees."""
    n_done = min((len(d) for d in deltas.values()), default=0)
    final: dict[str, Verdict] = {}
    for n in range(n_min, min(n_done, max_seeds) + 1):
        look = decide(
            {a: list(d)[:n] for a, d in deltas.items()}, look_alpha(n, max_seeds, alpha, n_min), margin
        )
        for a, v in look.items():
            if a not in final or final[a].decision in ("undecided", "no test"):
                final[a] = v
    if not final:  # fewer than n_min seeds: no look yet
        final = decide({a: list(d) for a, d in deltas.items()}, alpha, margin)
    return final


def decided(verdicts: dict[str, Verdict]) -> bool:
    """Whether every arm has a decisive verdict (a difference, or none larger than the margin)."""
    return all(v.decision not in ("undecided", "no test") for v in verdicts.values())
