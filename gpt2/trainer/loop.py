"""The one training loop, for every architecture and optimizer.

What differs between runs comes in through the config (the model follows from it; the
optimizer is picked by name) and through :class:`~gpt2.trainer.extension.Extension` objects;
this file knows neither. Parallel wrapping lives in :mod:`.distributed`, checkpoint parts in
:mod:`.checkpoint`, the counters in :class:`~.state.TrainState`, log windows and console output
in :mod:`gpt2.track`.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gpt2 import config_file, faults
from gpt2.config import RunConfig
from gpt2.errors import UserError
from gpt2.export import load_hf_weights
from gpt2.model import GPT
from gpt2.model.loss import loss_kernel
from gpt2.optim import build_optimizer, lr_at
from gpt2.runtime import (
    autocast,
    configure_process,
    peak_memory_bytes,
    process_age_s,
    resolve_device,
    resolve_dtype,
    select_sdpa_backend,
)
from gpt2.signals import STOP, Stopped, StopRequest, catch_stop_signals
from gpt2.track.console import Console
from gpt2.track.metrics import MetricsLog, environment, write_json_atomic
from gpt2.track.perf import mfu
from gpt2.track.trackers import Trackers, default_project, default_run_name
from gpt2.track.window import LogWindow
from gpt2.trainer import checkpoint, distributed
from gpt2.trainer.evaluate import evaluate, is_compare_step, multiple_choice
from gpt2.trainer.extension import Extension, Extensions
from gpt2.trainer.state import TrainClock, TrainState
from gpt2.trainer.step import TrainStep

MAX_RESTARTS = 3  # self-healing restarts before a run gives up
STOP_CHECK_S = 1.0  # under torchrun, the ranks agree on stop signals and the budget this often


class _NullLog:
    """Stands in for the metrics file on ranks other than 0."""

    def write(self, record: dict[str, Any]) -> None:
        pass


class Trainer:
    """Builds model, optimizer and step from a :class:`RunConfig`, then trains with :meth:`fit`.

    Construction is cheap enough for ``--dry-run`` (no data is touched); :meth:`fit` loads
    the data, resumes if asked, trains, evaluates, checkpoints and writes the results.
    """

    def __init__(self, cfg: RunConfig, extensions: Sequence[Extension] = ()) -> None:
        configure_process(cfg.train.threads)
        faults.point("startup")
        self.cfg = cfg
        self.extensions = Extensions(extensions)
        self.dist = distributed.from_env()
        self.device = distributed.init(self.dist, resolve_device(cfg.train.device), cfg.dist.dist_timeout)
        self.dtype = resolve_dtype(cfg.train.dtype, self.device)
        self.loss_kernel = loss_kernel(self.device)  # (builds the CPU kernel now, before any clock)
        select_sdpa_backend(cfg.model.sdpa_backend, self.device)
        self.out_dir = Path(cfg.output.output_dir)
        self.console = Console(not cfg.train.quiet and self.dist.is_main)
        if cfg.train.deterministic:
            # cuBLAS needs a fixed workspace to be deterministic; set before the first matmul.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.gpt_config = cfg.gpt_config()
        self.model = GPT(self.gpt_config)
        if cfg.model.init_from:
            load_hf_weights(self.model, cfg.model.init_from)
        self.model.to(self.device)
        if self.dist.enabled:
            torch.manual_seed(cfg.train.seed + self.dist.rank)  # but each rank its own dropout
        self.n_params = self.model.num_params()
        m = cfg.model
        self.fsdp = self.dist.enabled and cfg.dist.parallel == "fsdp"
        self.eval_model, self.forward_model = distributed.parallelize(
            self.model,
            self.dist,
            self.device,
            parallel=cfg.dist.parallel,
            compile=m.compile,
            compile_mode=m.compile_mode,
            find_unused_parameters=cfg.dist.ddp_find_unused_params,
        )
        # (not under FSDP: its DTensor gradients stay on the eager path)
        self.optimizer = build_optimizer(self.model, cfg.optim, compile=m.compile and not self.fsdp)
        self.step_fn = TrainStep(
            self.model,
            self.optimizer,
            device=self.device,
            dtype=self.dtype,
            accumulation=cfg.data.gradient_accumulation,
            grad_clip=cfg.optim.grad_clip,
            forward_model=self.forward_model,
            extensions=self.extensions,
            cudagraphs=m.compile and m.compile_mode == "reduce-overhead",
        )
        if not self.dist.enabled:  # a signal may abandon a step's micro-steps (see _step)
            self.step_fn.cancellable = STOP.cancellable
        self.tokens_per_step = cfg.tokens_per_step * self.dist.world_size  # global, all ranks
        self.state = TrainState()
        self.max_iters = cfg.train.max_iters
        self.data: Any = None
        self.mc_tasks: list[Any] = []  # --eval-task's, encoded once (gpt2.tasks.multiple_choice)
        self.clock = TrainClock(0.0)
        self._compiled = False  # the compiled model has run a training step in this process
        self._agreed_fraction = 0.0  # torchrun: the budget fraction the ranks last agreed on
        self._check_every, self._since_check = 1, 0  # torchrun: steps between stop checks
        self._check_t = time.perf_counter()
        self._saved_step = -1  # the step checkpoint_last.pt holds, where this process knows it
        self._segment_start = 0  # the step this process started training from
        self._eval_budget_said = False
        self._passes_said = False  # the data passes of a time-budgeted run were stated
        self._evals_done = 0  # evaluations this process ran (the first compiles, under --compile)
        self._fit_start, self._wall_base = time.perf_counter(), 0.0
        self.tokens_per_s = 0.0  # throughput of the latest log window

    # ----------------------------------------------------------------- helpers
    @property
    def step(self) -> int:
        """Completed optimizer steps."""
        return self.state.step

    def say(self, msg: str) -> None:
        self.console.say(msg)

    def warn(self, msg: str) -> None:
        """A line on stderr from rank 0, even under --quiet: something the user must know."""
        if self.dist.is_main:
            print(f"warning: {msg}", file=sys.stderr, flush=True)

    def lr(self) -> float:
        o, t, st = self.cfg.optim, self.cfg.train, self.state
        progress = None
        if t.max_time > 0 and o.decay_lr and st.step >= o.warmup_steps:
            by_steps = (st.step - o.warmup_steps) / max(1, self.max_iters - o.warmup_steps)
            progress = max(by_steps, st.train_time / t.max_time)
        return st.lr_scale * lr_at(
            st.step,
            lr=o.learning_rate,
            min_lr=o.min_lr,
            warmup=o.warmup_steps,
            horizon=self.max_iters,
            decay=o.decay_lr,
            progress=progress,
        )

    def dry_run(self) -> dict[str, Any]:
        """One forward/backward/optimizer step on a small random batch; no dataset needed."""
        T = min(32, self.gpt_config.block_size)
        B = min(2, self.cfg.data.batch_size)
        gen = torch.Generator().manual_seed(self.cfg.train.seed)

        def random_batch() -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randint(0, self.gpt_config.vocab_size, (B, T + 1), generator=gen).to(self.device)
            return x[:, :-1], x[:, 1:]

        accumulation, self.step_fn.accumulation = self.step_fn.accumulation, 1  # one micro-batch is enough
        try:
            loss = self.step_fn(random_batch, lr=self.cfg.optim.learning_rate).loss
        finally:
            self.step_fn.accumulation = accumulation
        loss_value = float(loss) * 1.0
        if not math.isfinite(loss_value):
            raise UserError(f"dry run produced a non-finite loss ({loss_value})")
        return {
            "loss": loss_value,
            "n_params": self.n_params,
            "device": str(self.device),
            "dtype": str(self.dtype),
        }

    # ---------------------------------------------------------- checkpoints
    def checkpoint_parts(self) -> dict[str, checkpoint.Stateful]:
        """The stateful parts a checkpoint is assembled from, in restore order."""
        return {
            "run": checkpoint.RunIdentity(self.cfg.to_dict(), self.gpt_config),
            "weights": checkpoint.ModelAndOptimizer(self.model, self.optimizer, self.fsdp),
            "scaler": checkpoint.Keyed("scaler", self.step_fn.scaler),
            "train": self.state,
            "data": checkpoint.Keyed("data", self.data),
            "rng": checkpoint.RankRNG(self.dist, self.device, self.cfg.train.seed),
            "extensions": self.extensions,
        }

    def save(self, last: bool = True, best: bool = False) -> None:
        """Write checkpoint_last.pt (with the numbered copies) and/or checkpoint_best.pt atomically.

        Call it on every rank: rank 0 writes; gathering the ranks' RNG states (and under FSDP the
        weights) is collective.
        """
        t0 = time.perf_counter()
        with STOP.deferring():  # a checkpoint write always completes
            self.state.wall_time = self._wall_base + t0 - self._fit_start
            state = checkpoint.collect(self.checkpoint_parts())  # (holds the time of earlier saves only)
            try:
                if self.dist.is_main:
                    self._write(state, last, best)
            finally:
                self.state.checkpoint_time += time.perf_counter() - t0
            if last:
                self._saved_step = self.step

    def _write(self, state: dict[str, Any], last: bool, best: bool) -> None:
        if best:
            checkpoint.save_atomic(self.out_dir / checkpoint.BEST, state)
        if not last:
            return
        checkpoint.save_atomic(self.out_dir / checkpoint.LAST, state)
        keep = self.cfg.output.keep_checkpoints
        if keep > 0:
            checkpoint.save_atomic(self.out_dir / checkpoint.step_name(self.step), state)
            checkpoint.prune_numbered(self.out_dir, keep)

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        """Load every checkpoint part from ``state``, read from ``path`` (resume, self-healing restart)."""
        with STOP.deferring():  # never half restored
            checkpoint.restore(self.checkpoint_parts(), state, path)

    def _resume_path(self) -> Path | None:
        r = self.cfg.output.resume
        if r is None:
            return None
        if r == "auto":
            last = self.out_dir / checkpoint.LAST
            return last if last.exists() else None
        return Path(r)

    # -------------------------------------------------------------- the run
    def _setup_data(self) -> None:
        from gpt2.data.loader import ExampleBatches, TokenBatches
        from gpt2.data.prepare import ensure_prepared
        from gpt2.tasks.multiple_choice import load_task

        c = self.cfg
        where = dict(
            device=self.device, seed=c.train.seed, rank=self.dist.rank, world_size=self.dist.world_size
        )
        if c.task_params is not None:  # a synthetic task: generated, nothing to prepare
            counts = {"train": c.data.task_train_examples, "val": c.data.task_val_examples}
            self.data = ExampleBatches(
                c.data.dataset, c.task_params, counts, c.data.task_seed, batch_size=c.data.batch_size, **where
            )
        else:
            data_dir = ensure_prepared(
                c.data.dataset,
                c.data.data_dir,
                block_size=self.gpt_config.block_size,
                progress=not c.train.quiet,
            )
            self.data = TokenBatches(data_dir, self.gpt_config.block_size, c.data.batch_size, **where)
        self.mc_tasks = [load_task(path) for path in c.eval_tasks]
        if c.train.num_epochs is not None:
            self.max_iters = max(
                1, math.ceil(c.train.num_epochs * self.data.num_tokens("train") / self.tokens_per_step)
            )

    def fit(self) -> dict[str, Any]:
        """Train to ``--max-iters`` or ``--max-time``; returns the results dict (also written to disk).

        SIGTERM/SIGINT stop it within one micro-step in every phase (:mod:`gpt2.signals`): with training
        progress, checkpoint_last.pt is written and the results say ``stop_reason: signal ...``;
        during data preparation :class:`~gpt2.signals.Stopped` leaves (nothing was trained).
        """
        c = self.cfg
        start = self._fit_start = time.perf_counter()
        with catch_stop_signals():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.dist.is_main:  # what this run is, replayable with --config
                config_file.write(c, self.out_dir / config_file.CONFIG_TOML)
            resume_path = self._prepare()
            metrics: MetricsLog | _NullLog = _NullLog()
            if self.dist.is_main:
                metrics = MetricsLog(
                    self.out_dir / "metrics.jsonl", resume_from_step=self.step if resume_path else None
                )
            trackers = Trackers(
                c.track.tracker if self.dist.is_main else [],
                project=c.track.tracker_project or default_project(),
                run_name=c.track.tracker_run_name or default_run_name(c.optim.optimizer),
                config=c.to_dict(),
                out_dir=self.out_dir,
                quiet=c.train.quiet,
            )
            with trackers:  # finished on every path; marked failed when an exception leaves
                self._announce()
                stop_reason = self._train(metrics, trackers)
                results = self._finish(metrics, trackers, stop_reason, start)
                summary = {k: v for k, v in results.items() if k not in ("config", "model_config")}
                trackers.finish(summary)
        return results

    def _prepare(self) -> Path | None:
        """The data, then the checkpoint to resume from; returns its path (None: a fresh start).

        A stop signal abandons the data preparation (its files stay complete or absent) and
        raises :class:`Stopped`; under torchrun the ranks agree on that first, so all stop together.
        """
        stopped: Stopped | None = None
        try:
            with STOP.cancellable():
                self._setup_data()
        except Stopped as e:
            if not self.dist.enabled:
                raise
            stopped = e
        if self.dist.enabled and distributed.any_rank([bool(STOP)], self.dist, self.device)[0]:
            raise stopped or Stopped(STOP.name)
        path = self._resume_path()
        if path is not None:
            self._restore(checkpoint.load(path), path)
            self._wall_base = self.state.wall_time
            if path.resolve() == (self.out_dir / checkpoint.LAST).resolve():
                self._saved_step = self.step
            self.say(f"resumed from {path} at step {self.step}")
        self._segment_start = self.step
        return path

    def _train(self, metrics: Any, trackers: Trackers) -> str:
        """Train until a budget or a signal ends it; returns why."""
        c, st = self.cfg, self.state
        window = LogWindow(self.device, c.train.log_interval)
        self.clock = TrainClock(st.train_time)  # training steps only: what --max-time budgets
        with self.console.progress(self.max_iters, st.step):
            try:
                # The step-0 evaluation, or the one a signal abandoned after this checkpoint's step.
                if st.last_eval.get("step") != st.step and self._eval_due():
                    with window.paused(), self.clock.paused():
                        self._evaluate_and_log(metrics, trackers)
                if self._compare_due():  # one a signal abandoned at this checkpoint's step
                    with window.paused(), self.clock.paused():
                        self._compare_and_log(metrics, trackers)
                stop_reason = self._loop(window, metrics, trackers)
            except Stopped as e:  # in an evaluation or a step's micro-steps: both leave no trace
                stop_reason = f"signal {e.name}"
            finally:
                # No batch is needed any more; the data state rewinds to exclude the one prepared ahead.
                self.data.close()
        if window.steps:  # stopped between log steps: count the skipped steps of that stretch
            self._account_steps(window.flags(), metrics, can_restart=False)
        st.train_time = self.clock()
        return stop_reason

    def _loop(self, window: LogWindow, metrics: Any, trackers: Trackers) -> str:
        """The steps: step, log, evaluate, checkpoint; returns why they ended."""
        c, st = self.cfg, self.state
        while st.step < self.max_iters:
            st.train_time = self.clock()
            reason = self._stop_reason(STOP)
            if reason is not None:
                if reason == "max_time":
                    for ext in self.extensions:
                        ext.on_time_budget_spent(st.step, self.model, self.optimizer)
                return reason
            lr = self.lr()
            out = self._step(lr, window)
            st.step += 1
            window.add(out.loss, out.applied)
            self._tell_budget()
            self._extensions_step_end(out.loss, metrics, trackers)
            self.console.advance()
            faults.point("step_end")
            save_due = c.output.save_checkpoint and st.step % c.output.checkpoint_interval == 0
            # A checkpoint step is also a log step, so the checkpoint counts every skipped step.
            log_due = st.step % c.train.log_interval == 0 or st.step == self.max_iters or save_due
            if log_due and self._log_window(window, lr, out.grad_norm, self.clock(), metrics, trackers):
                continue  # went back to a checkpoint: the window is void
            if self._eval_due():
                with window.paused(), self.clock.paused():  # neither throughput nor budget
                    self._evaluate_and_log(metrics, trackers)
            if self._compare_due():
                with window.paused(), self.clock.paused():
                    self._compare_and_log(metrics, trackers)
            if save_due:
                with window.paused(), self.clock.paused():
                    self.save()
        return "max_iters"

    def _extensions_step_end(self, loss: torch.Tensor, metrics: Any, trackers: Trackers) -> None:
        """The extensions' end-of-step hooks, and the events they report."""
        st = self.state
        for ext in self.extensions:
            ext.on_step_loss(st.step, loss)
            ext.on_step_end(st.step, self.model, self.optimizer)
            for event in ext.pop_events():
                metrics.write(event)
                trackers.log(
                    {k: v for k, v in event.items() if isinstance(v, int | float)}, step=event["step"]
                )
                self.say(
                    f"step {event['step']}: " + ", ".join(f"{k} {v}" for k, v in event.items() if k != "step")
                )

    def _tell_budget(self) -> None:
        """Under --max-time, the used fraction of the budget after this step, for the extensions.

        Under torchrun the ranks agree on it (their mean) at log steps, so they prune alike.
        """
        c, st = self.cfg, self.state
        if c.train.max_time <= 0:
            return
        st.train_time = self.clock()
        fraction = st.train_time / c.train.max_time
        if self.dist.enabled:
            if st.step % c.train.log_interval == 0:
                agreed = distributed.all_reduce_mean(torch.tensor(fraction, device=self.device), self.dist)
                self._agreed_fraction = float(agreed)
            fraction = self._agreed_fraction
        for ext in self.extensions:
            ext.on_time_budget(fraction)

    def _step(self, lr: float, window: LogWindow) -> Any:
        """One optimizer step; the process's first under --compile compiles: compile time, counted in
        neither the training time nor the throughput.

        A stop signal may abandon the step's micro-steps (single process only: under torchrun the
        ranks must take the same steps); the batches and random numbers they drew are then given
        back, so the checkpoint written next is exactly the state before the step.
        """
        st = self.state
        mark = None if self.dist.enabled else (self.data.state_dict(), self._local_rng())
        try:
            if not self.cfg.model.compile or self._compiled:
                return self.step_fn(self.data.train_batch, lr)
            with window.paused(), self.clock.paused() as spent:
                out = self.step_fn(self.data.train_batch, lr)
        except Stopped:
            if mark is not None:
                self.optimizer.zero_grad(set_to_none=True)
                self.data.load_state_dict(mark[0])
                self._local_rng(mark[1])
            raise
        self._compiled = True
        st.compile_time += spent[0]
        return out

    def _local_rng(self, restore: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """This process's RNG states (dropout), or set them back to ``restore``."""
        if restore is not None:
            torch.set_rng_state(restore["torch"])
            if "cuda" in restore:
                torch.cuda.set_rng_state(restore["cuda"], self.device)
            return restore
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _stop_reason(self, stop: StopRequest) -> str | None:
        """Why to stop before the next step (a signal, the time budget), or None to go on.

        Ranks must agree to stop, which costs a collective and a host read: under torchrun they
        check every ``STOP_CHECK_S`` seconds of steps (every step when steps are slower), at the
        same steps on every rank (the interval follows the slowest rank's step time).
        """
        c, st = self.cfg, self.state
        out_of_time = c.train.max_time > 0 and st.train_time >= c.train.max_time
        signalled = bool(stop)
        if self.dist.enabled:
            self._since_check += 1
            if self._since_check < self._check_every:
                return None
            now = time.perf_counter()
            step_s = (now - self._check_t) / self._since_check
            self._check_t, self._since_check = now, 0
            late, sig, slowest = distributed.max_over_ranks(
                [out_of_time, signalled, step_s], self.dist, self.device
            )
            out_of_time, signalled = late > 0, sig > 0
            self._check_every = max(1, min(c.train.log_interval, int(STOP_CHECK_S / max(slowest, 1e-6))))
        if signalled:  # on this rank or another: every rank saves and stops
            return f"signal {stop.name}"
        if not out_of_time:
            return None
        if st.step - self._segment_start == 1:
            self.warn(
                f"the first step took {st.train_time:.2f} s of training time, more than the whole "
                f"--max-time budget of {c.train.max_time:g} s: the run stops after it"
            )
        return "max_time"

    def _log_window(
        self, window: LogWindow, lr: float, grad_norm: Any, elapsed: float, metrics: Any, trackers: Trackers
    ) -> bool:
        """Read the window back once, record it; True when its skipped steps forced a restart."""
        flags = window.close()  # the loop's host reads, once per log step: which steps applied, the loss
        good = int(sum(flags))
        if self._account_steps(flags, metrics):
            window.reset()
            return True
        loss_sum = float(distributed.all_reduce_mean(window.loss, self.dist))
        train_loss = loss_sum / good if good else math.nan
        self.tokens_per_s = window.steps * self.tokens_per_step / window.seconds
        if not self._passes_said and self.cfg.train.max_time > 0:
            self._passes_said = True
            left = max(0.0, self.cfg.train.max_time - elapsed)
            self._say_data_passes(
                min(self.max_iters, self.step + int(left * window.steps / window.seconds)), True
            )
        record = {
            "step": self.step,
            "tokens": self.step * self.tokens_per_step,
            "elapsed_s": elapsed,
            "train_loss": train_loss,
            "train_perplexity": math.exp(min(train_loss, 20.0)),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": self.tokens_per_s,
            "ms_per_step": 1000 * window.seconds / window.steps,
            "peak_memory_bytes": peak_memory_bytes(self.device),
        }
        m = mfu(self.tokens_per_s, self.gpt_config, self.n_params, self.device)
        if m is not None:
            record["mfu"] = m
        metrics.write(record)
        trackers.log({k: v for k, v in record.items() if v is not None}, step=self.step)
        self.console.log_line(record, self.max_iters)
        window.reset()
        return False

    def _account_steps(self, flags: list[float], metrics: Any, can_restart: bool = True) -> bool:
        """Record the skipped steps among the last ``len(flags)`` steps (flag 0.0 = skipped).

        Skipped steps changed nothing, so learning of them at the log step rather than at once
        loses nothing and keeps the step free of host reads. Returns True when too many in a row
        sent the run back to its last checkpoint (the rest of the window is then void).
        """
        first = self.step - len(flags) + 1
        for i, flag in enumerate(flags):
            if flag > 0:
                self.state.consecutive_bad = 0
            elif self._bad_step(first + i, metrics, can_restart):
                return True
        return False

    def _bad_step(self, step: int, metrics: Any, can_restart: bool) -> bool:
        """A skipped non-finite step; after too many in a row, go back to the last checkpoint."""
        st = self.state
        st.bad_steps += 1
        st.consecutive_bad += 1
        metrics.write({"step": step, "event": "nonfinite_step_skipped", "consecutive": st.consecutive_bad})
        self.say(f"step {step}: non-finite gradient, step skipped ({st.consecutive_bad} in a row)")
        if st.consecutive_bad < self.cfg.train.max_bad_steps or not can_restart:
            return False
        last = self.out_dir / checkpoint.LAST
        if st.restarts >= MAX_RESTARTS or not last.exists():
            why = "no checkpoint to go back to" if not last.exists() else f"{st.restarts} restarts already"
            raise UserError(
                f"{st.consecutive_bad} consecutive non-finite steps at step {step} and {why}; "
                "lower --learning-rate (and use --save-checkpoint so the run can heal itself)"
            )
        scale, bad_steps, restarts = st.lr_scale * 0.5, st.bad_steps, st.restarts
        self._restore(checkpoint.load(last), last)  # the counts carry on: they describe the whole run
        st.lr_scale, st.consecutive_bad, st.bad_steps, st.restarts = scale, 0, bad_steps, restarts + 1
        metrics.write({"step": st.step, "event": "restart", "from_step": step, "lr_scale": scale})
        self.say(f"restarted from {last} at step {st.step} with the LR scaled by {scale:g}")
        return True

    def _losses(self, samples: int, splits: tuple[str, ...] = ("train", "val")) -> dict[str, float]:
        """Losses on the first ``samples`` fixed windows of ``splits`` (see :func:`.evaluate.evaluate`)."""
        # Cancellable in one process; under torchrun the ranks agree before each batch instead.
        with contextlib.nullcontext() if self.dist.enabled else STOP.cancellable():
            return evaluate(
                self.model,
                self.eval_model,
                self.data,
                samples=samples,
                device=self.device,
                dtype=self.dtype,
                dist=self.dist,
                console=self.console,
                before_batch=self._before_eval_batch,
                splits=splits,
            )

    def evaluate(self) -> dict[str, float]:
        """Losses on fixed windows of both splits and extension metrics."""
        ev = self._losses(self.cfg.train.eval_samples)
        if self.mc_tasks:
            with contextlib.nullcontext() if self.dist.enabled else STOP.cancellable():
                ev.update(
                    multiple_choice(
                        self.model, self.mc_tasks, block_size=self.gpt_config.block_size, device=self.device,
                        dtype=self.dtype, dist=self.dist, before_batch=self._before_eval_batch,
                    )
                )  # fmt: skip
        for ext in self.extensions:
            ev.update(ext.eval_metrics(self.model))
        return ev

    def _eval_due(self) -> bool:
        """An evaluation at this step: every --eval-interval steps, and under --max-time only while
        this one and the final one fit in --eval-budget of it (so evaluation stays a small, known
        share of a budgeted run on any machine). The step-0 evaluation of a budgeted run is skipped
        (its loss, about ln(vocab) for a fresh model, is known) unless the run starts from weights."""
        c, st = self.cfg, self.state
        if st.step % c.train.eval_interval:
            return False
        budget = c.train.eval_budget * c.train.max_time
        if budget <= 0:
            return True
        if st.step == 0:
            return c.model.init_from is not None
        # This evaluation's cost: the last one's, else estimated from the step time (a batch's
        # forward costs under half its forward and backward). Ranks decide on the largest figures.
        cost = st.last_eval.get("eval_s")
        if cost is None or (c.model.compile and self._evals_done < 2):  # the first one compiled
            per_token = self.clock() / (st.step * self.tokens_per_step)
            tokens = 2 * c.train.eval_samples * c.data.batch_size * self.gpt_config.block_size
            cost = 0.5 * per_token * tokens * self.dist.world_size
        capped = st.eval_time - st.compare_time  # the comparison evaluations are outside the cap
        spent, cost = distributed.max_over_ranks([capped, cost], self.dist, self.device)
        if spent + 2 * cost <= budget:
            return True
        if not self._eval_budget_said:
            self._eval_budget_said = True
            self.say(
                f"step {st.step}: evaluations skipped from here on (each takes ~{cost:.1f} s; "
                f"--eval-budget {c.train.eval_budget:g} of --max-time is {budget:.1f} s, "
                f"{spent:.1f} s spent); the final one runs"
            )
        return False

    def _compare_due(self) -> bool:
        """A comparison evaluation at this step: on the grid of :func:`.evaluate.is_compare_step`,
        whatever --eval-interval and --eval-budget say (it is small, and arms need it)."""
        st = self.state
        return self.cfg.train.compare_batches > 0 and st.last_compare != st.step and is_compare_step(st.step)

    def _compare_and_log(self, metrics: Any, trackers: Trackers) -> None:
        """The validation loss on the first --compare-batches windows: a point of the curve on which
        the arms of an ablation are compared (counted as evaluation time, never as training time)."""
        st = self.state
        t0 = time.perf_counter()
        ev = self._losses(self.cfg.train.compare_batches, splits=("val",))
        compare_s = time.perf_counter() - t0
        st.eval_time += compare_s
        st.compare_time += compare_s
        st.last_compare = st.step
        record = {
            "step": st.step,
            "tokens": st.step * self.tokens_per_step,
            "elapsed_s": st.train_time,
            "compare_val_loss": ev["val_loss"],
            "compare_s": compare_s,
        }
        if "val_accuracy" in ev:
            record["compare_val_accuracy"] = ev["val_accuracy"]
        metrics.write(record)
        trackers.log({k: v for k, v in record.items() if k.startswith("compare_val")}, step=st.step)

    def _before_eval_batch(self) -> None:
        faults.point("eval_batch")
        if not self.dist.enabled:
            STOP.raise_if_stopped()  # (should the handler's own raise have been swallowed)
        elif distributed.any_rank([bool(STOP)], self.dist, self.device)[0]:
            raise Stopped(STOP.name)

    def _evaluate_and_log(self, metrics: Any, trackers: Trackers) -> dict[str, float]:
        """Evaluate, record it; a stop signal abandons it (:class:`Stopped`) with nothing recorded."""
        st = self.state
        t0 = time.perf_counter()
        ev = self.evaluate()
        eval_s = time.perf_counter() - t0
        st.eval_time += eval_s
        st.last_eval = {**ev, "step": st.step, "eval_s": eval_s}
        self._evals_done += 1
        is_best = ev["val_loss"] < st.best_val_loss
        if is_best:
            st.best_val_loss = ev["val_loss"]
        record = {
            "step": st.step,
            "tokens": st.step * self.tokens_per_step,
            "elapsed_s": st.train_time,
            **ev,
            "best_val_loss": st.best_val_loss,
            "eval_s": eval_s,
        }
        age = process_age_s()
        if age is not None:
            record["since_launch_s"] = age  # from the command's start, imports and data included
        metrics.write(record)
        trackers.log(
            {f"eval/{k}" if k.startswith("train_") else k: v for k, v in record.items()}, step=st.step
        )
        acc = (
            f", accuracy {ev['val_accuracy']:.4f} ± {ev['val_accuracy_se']:.4f}"
            if "val_accuracy" in ev
            else ""
        )
        for task in self.mc_tasks:
            acc += f", {task.name} acc_norm {ev[f'mc_{task.name}_acc_norm']:.3f}"
        self.say(
            f"eval step {st.step}: train {ev['train_loss']:.4f}, val {ev['val_loss']:.4f} "
            f"± {ev['val_loss_se']:.4f}{acc} (ppl {ev['val_perplexity']:.1f}, {eval_s:.1f} s)"
            f"{' *best*' if is_best else ''}"
        )
        if is_best and self.cfg.output.save_checkpoint and st.step > 0:
            self.save(last=False, best=True)
        return st.last_eval

    def _say_data_passes(self, steps: int, estimated: bool = False) -> None:
        """How many times the run will see its training data (for a time budget, from the steps
        the budget fits at the measured step time); a warning above one pass, with the fix."""
        c = self.cfg
        seen, have = steps * self.tokens_per_step, self.data.num_tokens("train")
        passes = seen / have
        what = (
            f"{steps:,} steps{' (estimated from the step time)' if estimated else ''} x "
            f"{self.tokens_per_step:,} tokens = {seen:,} of {have:,} training tokens: {passes:.2f} passes"
        )
        if passes <= 1:
            self.say(f"data: {what}")
            return
        if c.task_params is not None:
            examples = math.ceil(passes * c.data.task_train_examples)
            fix = f"; for unseen examples only, give --task-train-examples {examples}"
        else:
            from gpt2.data.prepare import more_data_hint

            hint = more_data_hint(c.data.dataset, c.data.data_dir, seen)
            fix = f"; to see every token once, prepare more: {hint}" if hint else ""
        self.warn(f"the run will see its training data {passes:.1f} times ({what}){fix}")

    # ------------------------------------------------------------ the end
    def _announce(self) -> None:
        c = self.cfg
        ranks = f" x {self.dist.world_size} ranks" if self.dist.enabled else ""
        self.say(
            f"model {c.model.model_name} ({self.n_params / 1e6:.2f}M params) on {self.device} {self.dtype} "
            f"(loss softmax: {self.loss_kernel}); "
            f"{self.tokens_per_step:,} tokens/step (batch {c.data.batch_size} x accumulation "
            f"{c.data.gradient_accumulation}{ranks} x block {self.gpt_config.block_size}); "
            f"train {self.data.num_tokens('train'):,} / val {self.data.num_tokens('val'):,} tokens"
        )
        if c.train.max_time <= 0:  # (a time budget's steps are known after the first log window)
            self._say_data_passes(self.max_iters)

    def _finish(self, metrics: Any, trackers: Trackers, stop_reason: str, start: float) -> dict[str, Any]:
        """Final evaluation and checkpoint, results.json, the closing line."""
        c = self.cfg
        last = self.state.last_eval
        if not stop_reason.startswith("signal") and (last.get("step") != self.step or "val_loss" not in last):
            try:
                self._evaluate_and_log(metrics, trackers)
            except Stopped as e:
                stop_reason = f"signal {e.name}"
        if not stop_reason.startswith("signal") and c.train.compare_batches > 0:
            try:  # the curve of comparison evaluations ends where the run ends
                if self.state.last_compare != self.step:
                    self._compare_and_log(metrics, trackers)
            except Stopped as e:
                stop_reason = f"signal {e.name}"
        stopped = stop_reason.startswith("signal")
        if stopped and self.step > 0 and self._saved_step != self.step:
            self.save()  # training progress to keep: the one thing a stop must not lose
        elif c.output.save_checkpoint and not stopped:
            self.save()
        results = self._results(self.state.last_eval, stop_reason, time.perf_counter() - start)
        if self.dist.is_main:
            write_json_atomic(self.out_dir / "results.json", results)
            if c.output.json_output:
                write_json_atomic(Path(c.output.json_output), results)
        if stopped:
            self._say_stopped(stop_reason)
            return results
        self.say(
            f"done ({stop_reason}): step {self.step}, val loss {results['final_val_loss']:.4f} "
            f"(best {results['best_val_loss']:.4f}), {results['tokens_per_s']:,.0f} tokens/s, "
            f"{results['train_time_s']:.1f} s training of {results['wall_time_s']:.1f} s; "
            f"results in {self.out_dir / 'results.json'}"
        )
        return results

    def _say_stopped(self, stop_reason: str) -> None:
        """The one line a stopped run leaves (even under --quiet): at which step, and where it is kept."""
        if not self.dist.is_main:
            return
        last = self.out_dir / checkpoint.LAST
        if self._saved_step == self.step and last.exists():
            kept = f"checkpoint {last}; rerun with --resume auto to continue"
        else:
            kept = "nothing trained, nothing saved"
        by = stop_reason.removeprefix("signal ")
        print(f"stopped by {by} at step {self.step}: {kept}", file=sys.stderr, flush=True)

    def _results(self, ev: dict[str, float], stop_reason: str, wall: float) -> dict[str, Any]:
        """The results of the run; ``ev`` is the latest complete evaluation (empty if none)."""
        st = self.state
        c = self.cfg
        tokens_seen = st.step * self.tokens_per_step
        results: dict[str, Any] = {
            "final_train_loss": ev.get("train_loss", math.nan),
            "final_val_loss": ev.get("val_loss", math.nan),
            "final_val_loss_se": ev.get("val_loss_se", math.nan),
            "best_val_loss": st.best_val_loss,
            "final_val_perplexity": ev.get("val_perplexity", math.nan),
            **{f"final_{k}": v for k, v in ev.items() if "accuracy" in k or k.startswith("mc_")},
            "eval_step": ev.get("step", -1),
            "iters": st.step,
            "tokens_seen": tokens_seen,
            # the budgeted training time, then what the budget excludes, then the whole run
            "train_time_s": st.train_time,
            "eval_time_s": st.eval_time,
            "compare_time_s": st.compare_time,
            "compile_time_s": st.compile_time,
            "checkpoint_time_s": st.checkpoint_time,
            "wall_time_s": self._wall_base + time.perf_counter() - self._fit_start,
            "eval_fraction": st.eval_time / (st.train_time + st.eval_time) if st.train_time > 0 else 0.0,
            "budget_overrun_s": max(0.0, st.train_time - c.train.max_time) if c.train.max_time > 0 else 0.0,
            "tokens_per_s": tokens_seen / st.train_time if st.train_time > 0 else 0.0,
            "last_window_tokens_per_s": self.tokens_per_s,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "threads": torch.get_num_threads(),
            "resumed_from_step": self._segment_start,  # where this process began (0: a fresh start)
            "n_params": self.n_params,
            "stop_reason": stop_reason,
            "bad_steps": st.bad_steps,
            "restarts": st.restarts,
            "lr_scale": st.lr_scale,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "loss_kernel": self.loss_kernel,
            "world_size": self.dist.world_size,
            "process_time_s": wall,
            "config": self.cfg.to_dict(),
            "model_config": self.gpt_config.to_dict(),
            **environment(),
        }
        for ext in self.extensions:
            results.update(ext.final_results(self.model))
        return results

    def sample(self, max_new_tokens: int, prompt: str = "") -> str:
        """Text generated by the current model (see :func:`gpt2.sample.generate_text`)."""
        from gpt2.sample import generate_text

        with autocast(self.device, self.dtype) if self.device.type == "cuda" else contextlib.nullcontext():
            return generate_text(self.model, prompt, max_new_tokens, seed=self.cfg.train.seed)
