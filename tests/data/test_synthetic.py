"""Synthetic probe tasks: the examples' structure, their law, their reproducibility, and their batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2.config import resolve
from gpt2.data.loader import ExampleBatches
from gpt2.data.synthetic import COPY_SEPARATOR, NO_ANSWER, TaskParams, examples
from gpt2.errors import ConfigError

MQAR = TaskParams(vocab_size=64, seq_len=32, kv_pairs=4)


def test_mqar_examples_are_key_value_pairs_then_queries_answered_by_their_values() -> None:
    inputs, targets = examples("mqar", MQAR, "train", 200, seed=0)
    assert inputs.shape == targets.shape == (200, 32) and inputs.dtype == np.int64
    k, half = MQAR.kv_pairs, MQAR.vocab_size // 2
    for x, y in zip(inputs, targets, strict=True):
        keys, values = x[0 : 2 * k : 2], x[1 : 2 * k : 2]
        assert len(set(keys)) == k and len(set(values)) == k  # distinct within the example
        assert ((keys >= 1) & (keys < half)).all() and ((half <= values) & (values < 64)).all()
        asked = np.flatnonzero(y != NO_ANSWER)
        assert len(asked) == k and (asked >= 2 * k).all() and ((asked - 2 * k) % 2 == 0).all()
        pairs = dict(zip(keys.tolist(), values.tolist(), strict=True))
        assert sorted(x[asked].tolist()) == sorted(keys.tolist())  # each key is queried once ...
        assert all(pairs[int(x[i])] == y[i] for i in asked)  # ... and answered by its value
        rest = np.ones(32, bool)
        rest[: 2 * k] = False
        rest[asked] = False
        assert (x[rest] == 0).all()  # Zoology Figure 2's setting: nothing between the queries


def test_mqar_query_gaps_follow_zoologys_power_law() -> None:
    """With one pair, the query's gap i (in position pairs) has probability a * (i+1)^(a-1), normalised."""
    p = TaskParams(vocab_size=64, seq_len=22, kv_pairs=1, power_a=0.3)
    _, targets = examples("mqar", p, "train", 40_000, seed=1)
    gaps = (np.flatnonzero(targets != NO_ANSWER) % 22 - 2) // 2
    space = (22 - 2) // 2
    law = 0.3 * np.arange(1, space + 1) ** (0.3 - 1)
    law /= law.sum()
    seen = np.bincount(gaps, minlength=space) / len(gaps)
    assert np.abs(seen - law).max() < 4 * np.sqrt(law.max() / len(gaps))  # within ~4 standard errors
    uniform = TaskParams(vocab_size=64, seq_len=22, kv_pairs=1, power_a=1.0)
    _, t = examples("mqar", uniform, "train", 40_000, seed=1)
    seen = np.bincount((np.flatnonzero(t != NO_ANSWER) % 22 - 2) // 2, minlength=space) / 40_000
    assert np.abs(seen - 1 / space).max() < 0.01


def test_random_non_queries_fill_the_gaps_with_tokens() -> None:
    p = TaskParams(vocab_size=64, seq_len=32, kv_pairs=4, random_non_queries=True)
    inputs, _ = examples("mqar", p, "train", 100, seed=0)
    assert (inputs[:, 8:] != 0).mean() > 0.9


def test_copy_examples_repeat_their_first_half_after_the_separator() -> None:
    p = TaskParams(vocab_size=10, seq_len=8)
    inputs, targets = examples("copy", p, "val", 50, seed=3)
    first = inputs[:, :4]
    assert (inputs[:, 4] == COPY_SEPARATOR).all() and (first >= 2).all()
    assert (targets[:, :4] == NO_ANSWER).all()
    assert (targets[:, 4:] == first).all()  # after the separator each target is the copied token
    assert (inputs[:, 5:] == first[:, :3]).all()


def test_the_examples_depend_on_the_task_seed_and_split_only() -> None:
    a = examples("mqar", MQAR, "train", 50, seed=0)
    assert all((u == v).all() for u, v in zip(a, examples("mqar", MQAR, "train", 50, seed=0), strict=True))
    assert not (a[0] == examples("mqar", MQAR, "val", 50, seed=0)[0]).all()
    assert not (a[0] == examples("mqar", MQAR, "train", 50, seed=1)[0]).all()


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(dataset="mqar", block_size=33), "even sequence length"),
        (dict(dataset="mqar", block_size=32, mqar_kv_pairs=9), "block size / 4"),
        (dict(dataset="mqar", block_size=32, task_vocab_size=16), "vocabulary larger than the sequence"),
        (dict(dataset="mqar", block_size=32, vocab_size=100), "smaller than --task-vocab-size"),
        (dict(dataset="copy", block_size=32, mqar_kv_pairs=2), "needs --dataset mqar"),
        (dict(dataset="shakespeare", task_vocab_size=100), "needs a synthetic --dataset"),
        (dict(dataset="shakespeare", vocab_size=1000), "needs at least 50257"),
    ],
)
def test_task_settings_that_cannot_work_are_refused(flags: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(dict(model_name="tiny", **flags))


def test_the_model_vocabulary_follows_the_task() -> None:
    cfg = resolve(dict(model_name="tiny", dataset="mqar", task_vocab_size=512, block_size=64))
    assert cfg.gpt_config().vocab_size == 512 and cfg.task_params.kv_pairs == 4  # 64 / 16, Figure 2's ratio
    assert resolve(dict(model_name="tiny")).gpt_config().vocab_size == 50304


def _batches(**kw) -> ExampleBatches:
    return ExampleBatches("mqar", MQAR, {"train": 100, "val": 20}, 0, batch_size=8, **kw)


def test_example_batches_draw_whole_examples_and_resume_the_same_stream() -> None:
    data = _batches(seed=5)
    inputs, targets = examples("mqar", MQAR, "train", 100, seed=0)
    x, y = data.train_batch()
    rows = [int(np.flatnonzero((inputs == r).all(axis=1))[0]) for r in x.numpy()]
    assert (y.numpy() == targets[rows]).all()  # each row is a whole example with its own targets
    state = data.state_dict()
    ahead = [data.train_batch()[0] for _ in range(3)]
    again = _batches(seed=5)
    again.load_state_dict(state)
    assert all(torch.equal(a, again.train_batch()[0]) for a in ahead)
    assert data.num_tokens("train") == 100 * 32 and data.num_eval_windows("val") == 20


def test_example_evaluation_batches_are_fixed_and_disjoint_across_ranks() -> None:
    first = [x for x, _ in _batches().eval_batches("val", 2)]
    assert all(torch.equal(a, b) for a, b in zip(first, [x for x, _ in _batches().eval_batches("val", 2)]))
    ranks = [_batches(rank=r, world_size=2) for r in (0, 1)]
    seen = [torch.cat([x for x, _ in d.eval_batches("val", 1)]) for d in ranks]
    assert not any((seen[0] == row).all(dim=1).any() for row in seen[1])
