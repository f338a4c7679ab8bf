"""Token batches: window contents, reproducibility per rank, resume, fixed evaluation windows."""

import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.data.loader import TokenBatches
from gpt2.errors import UserError
from tests.conftest import CUDA

T, B = 16, 4
N_TRAIN, N_VAL = 5000, 700


@pytest.fixture
def data_dir(tmp_path) -> Path:
    # Token i of a split is a recognisable function of i, so a window's start can be read off its values.
    (np.arange(N_TRAIN) % 50000).astype("<u2").tofile(tmp_path / "train.bin")
    (np.arange(N_VAL) + 40000).astype("<u2").tofile(tmp_path / "val.bin")
    return tmp_path


def loader(data_dir, **kwargs) -> TokenBatches:
    return TokenBatches(data_dir, **{"block_size": T, "batch_size": B, **kwargs})


def draws(tb: TokenBatches, n: int) -> list[torch.Tensor]:
    return [tb.train_batch()[0] for _ in range(n)]


def test_windows_are_memmap_slices_and_y_is_x_shifted(data_dir):
    tb = loader(data_dir)
    data = np.fromfile(data_dir / "train.bin", dtype="<u2").astype(np.int64)
    for _ in range(20):
        x, y = tb.train_batch()
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        for row_x, row_y in zip(x, y):
            start = int(row_x[0])
            assert 0 <= start <= N_TRAIN - T - 1
            assert row_x.tolist() == data[start : start + T].tolist()
            assert row_y.tolist() == data[start + 1 : start + T + 1].tolist()


def test_offsets_cover_exactly_the_valid_range(tmp_path):
    np.arange(T + 3, dtype="<u2").tofile(tmp_path / "train.bin")  # valid starts: 0, 1, 2
    np.arange(T + 1, dtype="<u2").tofile(tmp_path / "val.bin")
    tb = TokenBatches(tmp_path, block_size=T, batch_size=64)
    starts = torch.cat([tb.train_batch()[0][:, 0] for _ in range(5)])
    assert set(starts.tolist()) == {0, 1, 2}


def test_same_seed_same_batches_and_no_global_rng(data_dir):
    torch.manual_seed(1)
    a = draws(loader(data_dir, seed=7), 5)
    torch.manual_seed(2)  # the global RNG (dropout's) must not matter
    b = draws(loader(data_dir, seed=7), 5)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    c = draws(loader(data_dir, seed=8), 5)
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_ranks_draw_different_batches(data_dir):
    r0 = draws(loader(data_dir, seed=7, rank=0, world_size=2), 5)
    r1 = draws(loader(data_dir, seed=7, rank=1, world_size=2), 5)
    assert not any(torch.equal(p, q) for p, q in zip(r0, r1))


def test_state_dict_resumes_the_exact_sequence(data_dir):
    tb = loader(data_dir, seed=3)
    draws(tb, 3)
    buf = io.BytesIO()
    torch.save(tb.state_dict(), buf)
    expected = draws(tb, 5)
    resumed = loader(data_dir, seed=3)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert all(torch.equal(p, q) for p, q in zip(draws(resumed, 5), expected))


def test_prefetching_gives_the_same_stream_from_a_worker_thread(data_dir, monkeypatch):
    threads = set()
    windows = TokenBatches._windows

    def spy(self, data, starts):
        threads.add(threading.current_thread().name)
        return windows(self, data, starts)

    monkeypatch.setattr(TokenBatches, "_windows", spy)
    plain, ahead = loader(data_dir, seed=3, prefetch=False), loader(data_dir, seed=3, prefetch=True)
    for _ in range(6):
        (xp, yp), (xa, ya) = plain.train_batch(), ahead.train_batch()
        assert torch.equal(xp, xa) and torch.equal(yp, ya)
    assert any(name.startswith("batch-prefetch") for name in threads)
    ahead.close()


@pytest.mark.parametrize("resume_prefetch", [False, True])
def test_resume_from_a_prefetching_loader_is_exact(data_dir, resume_prefetch):
    """The batch prepared ahead is not in the state: a resumed run draws it again, in order."""
    tb = loader(data_dir, seed=3, prefetch=True)
    draws(tb, 3)
    state = tb.state_dict()
    expected = draws(tb, 5)
    resumed = loader(data_dir, seed=3, prefetch=resume_prefetch)
    resumed.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(draws(resumed, 5), expected))
    tb.load_state_dict(state)  # loading into a loader with a batch in flight drops that batch
    assert all(torch.equal(p, q) for p, q in zip(draws(tb, 5), expected))
    tb.close()


def test_state_of_another_rank_resumes_this_ranks_own_stream(data_dir):
    rank0 = loader(data_dir, seed=3, rank=0, world_size=2)
    rank1 = loader(data_dir, seed=3, rank=1, world_size=2)
    draws(rank0, 4)
    draws(rank1, 4)
    fresh1 = loader(data_dir, seed=3, rank=1, world_size=2)
    fresh1.load_state_dict(rank0.state_dict())  # checkpoints often keep rank 0's state only
    assert all(torch.equal(p, q) for p, q in zip(draws(fresh1, 3), draws(rank1, 3)))


def test_eval_batches_are_fixed_and_evenly_spaced(data_dir):
    tb = loader(data_dir)
    first = list(tb.eval_batches("val", 3))
    draws(tb, 2)  # training draws don't move evaluation windows
    second = list(tb.eval_batches("val", 3))
    assert len(first) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    starts = np.sort(torch.cat([x[:, 0] for x, _ in first]).numpy() - 40000)
    assert starts[0] == 0 and starts[-1] == N_VAL - T - 1  # spread over the whole split
    for x, _ in first:  # each batch interleaves with the others over the whole split
        own = x[:, 0].numpy() - 40000
        assert own.min() < (N_VAL // 3) and own.max() > 2 * (N_VAL // 3)
    assert np.all(np.diff(starts) >= T)  # non-overlapping: 12 windows fit in 700 tokens
    for x, y in first:
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_eval_batches_split_disjointly_across_ranks(data_dir):
    per_rank = [
        torch.cat([x[:, 0] for x, _ in loader(data_dir, rank=r, world_size=3).eval_batches("train", 2)])
        for r in range(3)
    ]
    assert all(len(s) == 2 * B for s in per_rank)  # every rank runs the same number of batches
    everything = torch.cat(per_rank).tolist()
    assert len(set(everything)) == len(everything) == 3 * 2 * B


def test_counts(data_dir):
    tb = loader(data_dir)
    assert tb.num_tokens("train") == N_TRAIN and tb.num_tokens("val") == N_VAL
    assert tb.num_eval_windows("val") == (N_VAL - 1) // T
    with pytest.raises(ValueError, match="split"):
        tb.num_tokens("test")


def test_missing_file_names_the_prepare_command(tmp_path):
    shakespeare = tmp_path / "shakespeare"
    shakespeare.mkdir()
    expected = r"train\.bin not found.*python gpt2/prepare_data\.py --dataset shakespeare"
    with pytest.raises(UserError, match=expected):
        TokenBatches(shakespeare, block_size=T, batch_size=B)


def test_odd_sized_bin_is_reported_corrupt(data_dir):
    with open(data_dir / "val.bin", "ab") as f:
        f.write(b"\x01")
    with pytest.raises(UserError, match=r"val\.bin is corrupt"):
        loader(data_dir)


def test_split_shorter_than_a_window_is_refused(data_dir):
    np.arange(T, dtype="<u2").tofile(data_dir / "val.bin")  # a window needs T + 1 tokens
    with pytest.raises(UserError, match=rf"val\.bin has {T} tokens"):
        loader(data_dir)


@CUDA
def test_cuda_batches_match_cpu(data_dir):
    cpu, gpu = loader(data_dir, seed=5), loader(data_dir, seed=5, device="cuda")
    for _ in range(3):
        (xc, yc), (xg, yg) = cpu.train_batch(), gpu.train_batch()
        assert xg.is_cuda and torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)
