"""Synthetic probe tasks: fixed sets of examples generated from a seed, scored only where there is an answer.

Each example is one sequence of ``seq_len`` input ids and as many targets; a target is
:data:`NO_ANSWER` (the loss's ignore index) wherever nothing is asked, so the loss and the accuracy
count the answer positions only. The same ``(task, parameters, task seed)`` gives the same train and
val examples on every machine and for every training seed (the training seed orders them), so the
arms and seeds of an ablation see one dataset, as with a prepared corpus. Nothing is written to disk.

- ``mqar``: multi-query associative recall, as defined by Zoology (Arora et al. 2023, "Zoology:
  Measuring and Improving Recall in Efficient Language Models"; HazyResearch/zoology,
  ``zoology/data/multiquery_ar.py``): ``k`` key-value pairs (keys from the lower half of the
  vocabulary, values from the upper half, distinct within an example) open the sequence; each key is
  queried once later, at an even offset of the rest drawn from a power law that favours short gaps
  (``power_a``); the answer, the key's value, is the target at the query's position. Positions that
  are neither pairs nor queries hold token 0 (Zoology's Figure 2 setting) or random tokens
  (``random_non_queries``). Differences from Zoology's generator: numpy's ``Generator`` instead of the
  global seed, so the examples differ from Zoology's for the same seed (the distribution is the same:
  its weighted draws without replacement are drawn here as Gumbel top-k, the same law), and the
  train and val sets come from two streams of one task seed.
- ``copy``: copying (as in Jelassi et al. 2024, "Repeat After Me"): ``seq_len / 2`` random tokens, a
  separator, then the same tokens again; every token of the copy is an answer. It needs position- or
  induction-based lookup, like MQAR, without a key-value structure.

This module imports only numpy (and that lazily), so the configuration can read the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

NO_ANSWER = -1  # the target of a position that is not scored (lm_loss's ignore index)
SPLIT_STREAMS = {"train": 0, "val": 1}  # the seed stream of each split


@dataclass(frozen=True)
class TaskParams:
    """What a synthetic task is generated from (the run config's ``[data]`` task keys)."""

    vocab_size: int
    seq_len: int
    kv_pairs: int = 4  # mqar
    power_a: float = 0.01  # mqar: the query-gap power law
    random_non_queries: bool = False  # mqar


@dataclass(frozen=True)
class Task:
    """A synthetic task by name: ``generate(rng, count, params) -> (inputs, targets)``, both int64
    ``(count, seq_len)``; ``problem(params)`` says why the parameters cannot work (None: they can)."""

    name: str
    description: str
    generate: Callable[[np.random.Generator, int, TaskParams], tuple[np.ndarray, np.ndarray]]
    problem: Callable[[TaskParams], str | None]


def _distinct_rows(rng: np.random.Generator, count: int, k: int, low: int, high: int) -> np.ndarray:
    """(count, k) ints in [low, high), distinct within each row, uniform over such rows (rows with a
    repeat are drawn again: the same law as drawing without replacement)."""
    import numpy as np

    out = rng.integers(low, high, size=(count, k))
    redo = np.arange(count)
    while True:
        rows = np.sort(out[redo], axis=1)
        redo = redo[(rows[:, 1:] == rows[:, :-1]).any(axis=1)]
        if not len(redo):
            return out
        out[redo] = rng.integers(low, high, size=(len(redo), k))


def _mqar(rng: np.random.Generator, count: int, p: TaskParams) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    k, T, V = p.kv_pairs, p.seq_len, p.vocab_size
    context = 2 * k
    keys = _distinct_rows(rng, count, k, 1, V // 2)
    values = _distinct_rows(rng, count, k, V // 2, V)
    seq = np.zeros((count, T + 1), dtype=np.int64)
    seq[:, 0:context:2], seq[:, 1:context:2] = keys, values
    # Query gaps: k distinct slots of the (T - context) / 2 even offsets, weighted by Zoology's power law
    # a * i^(a-1); a weighted draw without replacement is the top k of log-weights plus Gumbel noise.
    space = (T - context) // 2
    log_w = np.log(p.power_a) + (p.power_a - 1) * np.log(np.arange(1, space + 1))
    gaps = np.argsort(-(log_w + rng.gumbel(size=(count, space))), axis=1)[:, :k]
    rows = np.arange(count)[:, None]
    seq[rows, context + 2 * gaps] = keys
    labels = np.full((count, T + 1), NO_ANSWER, dtype=np.int64)
    labels[rows, context + 2 * gaps + 1] = values
    inputs, targets = seq[:, :-1], labels[:, 1:]
    if p.random_non_queries:
        empty = inputs == 0
        inputs[empty] = rng.integers(0, V, size=int(empty.sum()))
    return np.ascontiguousarray(inputs), np.ascontiguousarray(targets)


def _mqar_problem(p: TaskParams) -> str | None:
    if p.seq_len % 2:
        return f"mqar needs an even sequence length (--block-size), got {p.seq_len}"
    if p.vocab_size <= p.seq_len:
        return f"mqar needs a vocabulary larger than the sequence: {p.vocab_size} <= {p.seq_len}"
    if p.kv_pairs < 1 or 4 * p.kv_pairs > p.seq_len:
        return f"mqar needs 1 <= key-value pairs <= block size / 4 = {p.seq_len // 4}, got {p.kv_pairs}"
    if p.kv_pairs >= p.vocab_size // 2:
        return f"mqar draws {p.kv_pairs} distinct keys from {p.vocab_size // 2 - 1}: raise the vocabulary"
    if not 0 < p.power_a <= 1:
        return f"mqar's power law needs 0 < a <= 1, got {p.power_a}"
    return None


COPY_SEPARATOR = 1  # copied tokens are drawn from 2.. (0 stays free, as in MQAR)


def _copy(rng: np.random.Generator, count: int, p: TaskParams) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    n = p.seq_len // 2
    tokens = rng.integers(COPY_SEPARATOR + 1, p.vocab_size, size=(count, n))
    seq = np.concatenate([tokens, np.full((count, 1), COPY_SEPARATOR), tokens], axis=1)  # T + 1 ids
    inputs, targets = seq[:, :-1].copy(), seq[:, 1:].copy()
    targets[:, :n] = NO_ANSWER  # the first half and the separator are not asked; the copy is
    return inputs, targets


def _copy_problem(p: TaskParams) -> str | None:
    if p.seq_len % 2 or p.seq_len < 2:
        return f"copy needs an even sequence length (--block-size) of at least 2, got {p.seq_len}"
    if p.vocab_size < COPY_SEPARATOR + 2:
        return f"copy needs a vocabulary of at least {COPY_SEPARATOR + 2} tokens, got {p.vocab_size}"
    return None


TASKS = {
    t.name: t
    for t in (
        Task(
            "mqar",
            "multi-query associative recall (Zoology): recall the value of each queried key",
            _mqar,
            _mqar_problem,
        ),
        Task(
            "copy",
            "copying: repeat block/2 random tokens after a separator",
            _copy,
            _copy_problem,
        ),
    )
}


def examples(
    task: str, params: TaskParams, split: str, count: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` examples of ``split``: inputs and targets, int64 ``(count, seq_len)``; the same for the
    same arguments on every machine (one seed stream per split, so train and val differ)."""
    import numpy as np

    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_STREAMS[split]]))
    return TASKS[task].generate(rng, count, params)
