"""Batches of token windows from a prepared dataset dir (``train.bin`` / ``val.bin``).

Training windows are random (with replacement, as nanoGPT) from a generator of the loader's own, so data
order is reproducible, differs per rank, survives a resume, and never shares RNG state with dropout.
Evaluation windows are a fixed, evenly spaced set, so successive evaluations measure the same text.

On CUDA the next training batch is prepared while the current step runs: a worker thread reads
its windows from the memmap (random reads, which on a large dataset miss the page cache), copies
them into pinned memory and queues the asynchronous host-to-device copy (on the default stream,
so the 100-odd KB copy itself runs between the step's kernels; the read and pinning overlap).
The window positions are still drawn on the caller's thread, in order, so the stream of batches,
and a resume from :meth:`TokenBatches.state_dict`, are the same with and without prefetching
(tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2.data import synthetic
from gpt2.data.prepare import DATASETS, DTYPE, SPLITS, prepare_command
from gpt2.data.synthetic import TaskParams
from gpt2.errors import UserError


def _rank_seed(seed: int, rank: int) -> int:
    """A 63-bit seed mixing (seed, rank): nearby seeds and ranks give unrelated streams."""
    words = np.random.SeedSequence([seed, rank]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class TokenBatches:
    """Batches of (x, y) windows from a prepared dataset dir (train.bin / val.bin memmaps, opened once).

    ``x`` and ``y`` are int64 ``(batch_size, block_size)`` tensors on ``device``; ``y`` is ``x`` shifted by
    one token. Each rank draws from its own stream seeded from ``(seed, rank)``. ``prefetch``
    (default: on CUDA) prepares the next training batch in a worker thread (module docstring).
    """

    answers = False  # every target is scored (a synthetic task scores some positions only)

    def __init__(
        self,
        data_dir: Path,
        block_size: int,
        batch_size: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        prefetch: bool | None = None,
    ) -> None:
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"block_size and batch_size must be positive, got {block_size}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.data_dir = Path(data_dir)
        self.block_size = block_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._pin = self.device.type == "cuda"
        self._data = {split: self._open(split) for split in SPLITS}
        self._window = np.arange(block_size + 1, dtype=np.int64)  # offsets of one (x, y) window
        self._generator = torch.Generator().manual_seed(_rank_seed(seed, rank))
        self._batches_drawn = 0
        self._prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        self._worker: ThreadPoolExecutor | None = None
        # The next batch being prepared, and the generator state from before its positions were drawn.
        self._next: tuple[Future, torch.Tensor] | None = None

    def _open(self, split: str) -> np.memmap:
        path = self.data_dir / f"{split}.bin"
        if not path.is_file():
            name = self.data_dir.name
            cmd = (
                prepare_command(name, self.data_dir.parent)
                if name in DATASETS
                else "python gpt2/prepare_data.py --dataset <name or path>"
            )
            raise UserError(f"{path} not found; prepare the dataset first: {cmd}")
        size = path.stat().st_size
        if size % DTYPE.itemsize:
            raise UserError(f"{path} is corrupt: {size} bytes is not a whole number of uint16 tokens")
        tokens = size // DTYPE.itemsize
        if tokens <= self.block_size:
            raise UserError(
                f"{path} has {tokens} tokens, too few for block_size {self.block_size} "
                f"(a window needs {self.block_size + 1})"
            )
        return np.memmap(path, dtype=DTYPE, mode="r")

    def num_tokens(self, split: str) -> int:
        """Tokens in ``split`` ('train' or 'val')."""
        return len(self._split(split))

    def num_eval_windows(self, split: str) -> int:
        """Non-overlapping windows in ``split``: more evaluation windows than this re-read the same tokens."""
        return (self.num_tokens(split) - 1) // self.block_size

    def _split(self, split: str) -> np.memmap:
        try:
            return self._data[split]
        except KeyError:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}") from None

    def _windows(self, data: np.memmap, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # One vectorised gather (B, T+1) from the memmap; x and y are its two overlapping slices.
        tokens = torch.from_numpy(data[starts[:, None] + self._window].astype(np.int64))
        return self._to_device(tokens[:, :-1], tokens[:, 1:])

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._pin:
            return x.contiguous().to(self.device), y.contiguous().to(self.device)
        # Pinned (page-locked) host copies let the host-to-device copies run asynchronously.
        pinned = [torch.empty(x.shape, dtype=torch.int64, pin_memory=True).copy_(t) for t in (x, y)]
        return pinned[0].to(self.device, non_blocking=True), pinned[1].to(self.device, non_blocking=True)

    def _population(self) -> int:
        """How many distinct training draws there are (window starts)."""
        return len(self._data["train"]) - self.block_size

    def _draw_starts(self) -> np.ndarray:
        starts = torch.randint(self._population(), (self.batch_size,), generator=self._generator)
        return starts.numpy()

    def _eval_starts(self, data: Any, count: int) -> np.ndarray:
        """``count`` window starts spread evenly over a split; integer spacing floor(i * last / (count - 1))
        leaves gaps >= block_size whenever ``count`` fits."""
        last_start = len(data) - self.block_size - 1
        return np.arange(count, dtype=np.int64) * last_start // max(count - 1, 1)

    def train_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of random training windows: x, y int64 (batch_size, block_size) on the device."""
        data = self._data["train"]
        self._batches_drawn += 1
        if not self._prefetch:
            return self._windows(data, self._draw_starts())
        if self._worker is None:
            self._worker = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="batch-prefetch", initializer=self._worker_device()
            )
        if self._next is None:
            batch = self._windows(data, self._draw_starts())
        else:
            batch = self._next[0].result()
        before = self._generator.get_state()
        self._next = (self._worker.submit(self._windows, data, self._draw_starts()), before)
        return batch

    def _worker_device(self) -> Any:
        """The worker thread's start-up: make this loader's GPU its current device.

        The current CUDA device is per thread; without this, a torchrun rank's worker would pin
        memory and queue copies through GPU 0's context.
        """
        if self.device.type != "cuda":
            return None
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return lambda: torch.cuda.set_device(index)

    def _drop_prefetched(self) -> None:
        """Forget the batch prepared ahead; the generator goes back to before it was drawn."""
        if self._next is not None:
            future, before = self._next
            self._next = None
            self._generator.set_state(before)
            future.result()  # let its copies finish before the memory is reused (re-raises its error)

    def close(self) -> None:
        """Drop the batch prepared ahead and stop the prefetch worker (a later batch restarts it)."""
        try:
            self._drop_prefetched()
        finally:
            if self._worker is not None:
                self._worker.shutdown(wait=True)
                self._worker = None

    def eval_batches(self, split: str, num_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``num_batches`` batches of fixed windows of ``split``, identical at every call.

        The ``num_batches * batch_size * world_size`` windows are spread evenly over the split (they overlap
        only when that exceeds :meth:`num_eval_windows`); rank r takes every world_size-th, so ranks see
        disjoint windows and all yield the same number of batches. Each batch takes every
        ``num_batches``-th of a rank's windows, so every batch spans the whole split and the spread
        of batch means estimates the standard error of the whole evaluation honestly (contiguous
        batches would each see one stretch of text and inflate it with topic-to-topic variation).
        """
        data = self._split(split)
        count = num_batches * self.batch_size * self.world_size
        if count <= 0:
            return
        mine = self._eval_starts(data, count)[self.rank :: self.world_size]
        for i in range(num_batches):
            yield self._windows(data, mine[i::num_batches])

    def state_dict(self) -> dict[str, Any]:
        """Where the training stream stands; only tensors, ints and str (``weights_only=True`` loads it).

        A batch prepared ahead is not part of it: its positions are drawn again after a resume.
        """
        return {
            "generator": self._next[1] if self._next is not None else self._generator.get_state(),
            "batches_drawn": self._batches_drawn,
            "seed": self.seed,
            "rank": self.rank,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "format": f"{type(self).__name__}/1",
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the training stream exactly where ``state`` left it.

        A state saved by another rank (checkpoints often hold rank 0's only) is replayed from this rank's
        own seed for the same number of batches instead, so ranks never collapse onto one stream.
        """
        if state.get("seed", self.seed) != self.seed:
            raise UserError(f"data state was saved with seed {state['seed']}, this run uses seed {self.seed}")
        self._drop_prefetched()
        if state.get("rank", self.rank) == self.rank:
            self._generator.set_state(state["generator"])
        else:
            self._generator.manual_seed(_rank_seed(self.seed, self.rank))
            n = self._population()
            for _ in range(int(state["batches_drawn"])):
                torch.randint(n, (int(state["batch_size"]),), generator=self._generator, dtype=torch.int64)
        self._batches_drawn = int(state["batches_drawn"])


class ExampleBatches(TokenBatches):
    """Batches of whole examples of a synthetic task (:mod:`gpt2.data.synthetic`): ``x`` its inputs and
    ``y`` its targets, -1 where nothing is asked. Training draws examples at random (with replacement)
    from the loader's own generator, evaluation takes a fixed, evenly spread set; the stream, its
    resume and the prefetching are :class:`TokenBatches`'."""

    answers = True

    def __init__(
        self, task: str, params: TaskParams, examples: dict[str, int], task_seed: int, **stream: Any
    ) -> None:
        """``examples``: how many per split; ``stream``: :class:`TokenBatches`' ``batch_size``,
        ``device``, ``seed``, ``rank``, ``world_size``, ``prefetch``."""
        self.task, self.params, self._counts, self._task_seed = task, params, examples, task_seed
        super().__init__(Path(task), block_size=params.seq_len, **stream)

    def _open(self, split: str) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        return synthetic.examples(self.task, self.params, split, self._counts[split], self._task_seed)

    def _population(self) -> int:
        return len(self._data["train"][0])

    def _eval_starts(self, data: Any, count: int) -> np.ndarray:
        # the split's first examples (they are independent draws), cycling when more are asked for
        return np.arange(count, dtype=np.int64) % len(data[0])

    def _windows(self, data: Any, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self._to_device(torch.from_numpy(data[0][starts]), torch.from_numpy(data[1][starts]))

    def num_tokens(self, split: str) -> int:
        return self._split(split)[0].size

    def num_eval_windows(self, split: str) -> int:
        return len(self._split(split)[0])
