"""The one training loop, for every architecture and optimizer.

What differs between runs comes in through the config (model variant, optimizer) and
through :class:`~gpt2.trainer.extension.Extension` objects; this file knows neither.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from gpt2.config import RunConfig
from gpt2.errors import UserError
from gpt2.model import GPT, GPTConfig
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
from gpt2.track.metrics import MetricsLog, environment, write_json_atomic
from gpt2.track.perf import mfu
from gpt2.track.trackers import Trackers, default_project, default_run_name
from gpt2.trainer import checkpoint, distributed
from gpt2.trainer.extension import Extension
from gpt2.trainer.step import TrainStep


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _rank_rng_state(state: dict[str, Any], rank: int, world_size: int) -> dict[str, Any] | None:
    """This rank's saved RNG state (dropout), or None where the checkpoint has none for it.

    Checkpoints keep every rank's state (``rng_ranks``); one saved at another world size has no
    state for some ranks, and older ones keep rank 0's alone (``rng``).
    """
    ranks = state.get("rng_ranks")
    if ranks is not None:
        return ranks[rank] if len(ranks) == world_size else None
    return state["rng"] if world_size == 1 else None


MAX_RESTARTS = 3  # self-healing restarts before a run gives up


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
        configure_process()
        self.cfg = cfg
        self.extensions = list(extensions)
        self.dist = distributed.from_env()
        self.device = distributed.init(self.dist, resolve_device(cfg.train.device))
        self.dtype = resolve_dtype(cfg.train.dtype, self.device)
        select_sdpa_backend(cfg.model.sdpa_backend, self.device)
        self.out_dir = Path(cfg.output.output_dir)
        self.log_to_console = not cfg.train.quiet and self.dist.is_main

        if cfg.train.deterministic:
            # cuBLAS needs a fixed workspace to be deterministic; set before the first matmul.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.gpt_config = cfg.gpt_config()
        self.model = GPT(self.gpt_config).to(self.device)
        if self.dist.enabled:
            torch.manual_seed(cfg.train.seed + self.dist.rank)  # but each rank its own dropout
        self.n_params = self.model.num_params()
        self.fsdp = self.dist.enabled and cfg.dist.parallel == "fsdp"
        if self.fsdp:  # shard each block, then the rest (embeddings, tied head, final norm)
            from torch.distributed.fsdp import fully_shard

            for block in self.model.transformer.h:
                fully_shard(block)
            fully_shard(self.model)
        # (not under FSDP: its DTensor gradients stay on the eager path)
        self.optimizer = build_optimizer(self.model, cfg.optim, compile=cfg.model.compile and not self.fsdp)
        mode = None if cfg.model.compile_mode == "default" else cfg.model.compile_mode
        self.eval_model = torch.compile(self.model, mode=mode) if cfg.model.compile else self.model
        forward_model = self.eval_model
        if self.dist.enabled and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            forward_model = DistributedDataParallel(
                forward_model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.dist.ddp_find_unused_params,
            )
        self.step_fn = TrainStep(
            self.model,
            self.optimizer,
            device=self.device,
            dtype=self.dtype,
            accumulation=cfg.data.gradient_accumulation,
            grad_clip=cfg.optim.grad_clip,
            forward_model=forward_model,
            extensions=self.extensions,
            cudagraphs=cfg.model.compile and cfg.model.compile_mode == "reduce-overhead",
        )
        self.forward_model = forward_model
        self.tokens_per_step = cfg.tokens_per_step * self.dist.world_size  # global, all ranks
        self.step = 0  # completed optimizer steps
        self.best_val_loss = math.inf
        self.train_time = 0.0  # seconds spent in fit(), summed over resumed segments
        self.eval_time = 0.0  # seconds of it spent evaluating
        self.lr_scale = 1.0  # halved at each self-healing restart after non-finite steps
        self.consecutive_bad = 0
        self.bad_steps = 0  # non-finite steps skipped, over the whole run
        self.restarts = 0
        self.data: Any = None
        self.max_iters = cfg.train.max_iters
        self._stop_signal: int | None = None

    # ----------------------------------------------------------------- helpers
    def say(self, msg: str) -> None:
        if self.log_to_console:
            print(msg, flush=True)

    def lr(self) -> float:
        o, t = self.cfg.optim, self.cfg.train
        progress = None
        if t.max_time > 0 and o.decay_lr and self.step >= o.warmup_steps:
            by_steps = (self.step - o.warmup_steps) / max(1, self.max_iters - o.warmup_steps)
            progress = max(by_steps, self.train_time / t.max_time)
        return self.lr_scale * lr_at(
            self.step,
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

    # -------------------------------------------------------------- the run
    def _setup_data(self) -> None:
        from gpt2.data.loader import TokenBatches
        from gpt2.data.prepare import ensure_prepared

        c = self.cfg
        data_dir = ensure_prepared(
            c.data.dataset, c.data.data_dir, block_size=self.gpt_config.block_size, progress=not c.train.quiet
        )
        self.data = TokenBatches(
            data_dir,
            block_size=self.gpt_config.block_size,
            batch_size=c.data.batch_size,
            device=self.device,
            seed=c.train.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        if c.train.num_epochs is not None:
            self.max_iters = max(
                1, math.ceil(c.train.num_epochs * self.data.num_tokens("train") / self.tokens_per_step)
            )

    def _resume_path(self) -> Path | None:
        r = self.cfg.output.resume
        if r is None:
            return None
        if r == "auto":
            last = self.out_dir / checkpoint.LAST
            return last if last.exists() else None
        return Path(r)

    def _state(self) -> dict[str, Any]:
        """Everything a resume needs. A collective (the ranks' RNG states): every rank must call it."""
        if self.fsdp:
            # Full (unsharded) tensors gathered to rank 0's CPU, optimizer state keyed by parameter
            # name: the file loads at any world size, and into a single process.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state, optim_state = get_state_dict(self.model, self.optimizer, options=opts)
            optim_format = "by_name"
        else:
            model_state, optim_state, optim_format = (
                self.model.state_dict(),
                self.optimizer.state_dict(),
                "by_id",
            )
        return {
            "model": model_state,
            "optimizer": optim_state,
            "optimizer_format": optim_format,
            "scaler": self.step_fn.scaler.state_dict(),
            "step": self.step,
            "max_iters": self.max_iters,
            "best_val_loss": self.best_val_loss,
            "train_time": self.train_time,
            "eval_time": self.eval_time,
            "lr_scale": self.lr_scale,
            "bad_steps": self.bad_steps,
            "restarts": self.restarts,
            "consecutive_bad": self.consecutive_bad,
            "data": self.data.state_dict(),
            "rng_ranks": distributed.gather_objects(_rng_state(self.device), self.dist),
            "extensions": {e.name: e.state_dict() for e in self.extensions},
            "config": self.cfg.to_dict(),
            "model_config": self.gpt_config.to_dict(),
        }

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        saved = GPTConfig.from_dict(state.get("model_config", {}))
        if saved != self.gpt_config:
            raise UserError(
                f"checkpoint {path} holds a different model ({saved}) "
                f"than this run builds ({self.gpt_config})"
            )
        if state.get("optimizer_format") == "by_name":  # written under FSDP; loads sharded or not
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        elif self.fsdp:
            raise UserError(f"{path} was written without FSDP; resume it with --parallel ddp")
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.step_fn.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best_val_loss = float(state["best_val_loss"])
        self.train_time = float(state["train_time"])
        self.eval_time = float(state.get("eval_time", 0.0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.bad_steps = int(state.get("bad_steps", 0))
        self.restarts = int(state.get("restarts", 0))
        self.consecutive_bad = int(state.get("consecutive_bad", 0))
        self.data.load_state_dict(state["data"])
        rng = _rank_rng_state(state, self.dist.rank, self.dist.world_size)
        if rng is not None:
            _set_rng_state(rng, self.device)
        else:  # another world size: each rank its own stream, never rank 0's copied to all
            torch.manual_seed(self.cfg.train.seed + 1_000_003 * self.dist.rank + self.step)
        for e in self.extensions:
            e.load_state_dict(state.get("extensions", {}).get(e.name, {}))

    def save(self, last: bool = True, best: bool = False) -> None:
        """Write checkpoint_last.pt (with the numbered copies) and/or checkpoint_best.pt atomically.

        Call it on every rank: rank 0 writes; gathering the ranks' RNG states (and under FSDP the
        weights) is collective.
        """
        state = self._state()
        if not self.dist.is_main:
            return
        if best:
            checkpoint.save_atomic(self.out_dir / checkpoint.BEST, state)
        if not last:
            return
        checkpoint.save_atomic(self.out_dir / checkpoint.LAST, state)
        keep = self.cfg.output.keep_checkpoints
        if keep > 0:
            checkpoint.save_atomic(self.out_dir / checkpoint.step_name(self.step), state)
            checkpoint.prune_numbered(self.out_dir, keep)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over fixed windows of each split, with its standard error across batches."""
        self.model.eval()
        out: dict[str, float] = {}
        for split in ("train", "val"):
            losses = []
            batches = self.data.eval_batches(split, self.cfg.train.eval_samples)
            if self.log_to_console and sys.stderr.isatty():
                from tqdm import tqdm

                batches = tqdm(batches, total=self.cfg.train.eval_samples, desc=f"eval {split}", leave=False)
            for x, y in batches:
                with autocast(self.device, self.dtype):
                    # a copy: under CUDA graphs the next replay reuses the output's memory
                    losses.append(self.eval_model(x, y).float().clone())
            t = torch.stack(losses)
            # sum, sum of squares and count over every rank's share of the fixed windows
            count = torch.tensor(float(len(losses)), device=t.device)
            moments = distributed.all_reduce_mean(torch.stack([t.sum(), (t * t).sum(), count]), self.dist)
            total, total_sq, n = (float(v) for v in moments * self.dist.world_size)
            mean = total / n
            var = max(total_sq / n - mean * mean, 0.0) * n / max(n - 1, 1)
            out[f"{split}_loss"] = mean
            out[f"{split}_loss_se"] = math.sqrt(var / n)
        self.model.train()
        out["val_perplexity"] = math.exp(min(out["val_loss"], 20.0))
        for ext in self.extensions:
            out.update(ext.eval_metrics(self.model))
        return out

    def _install_signal_handlers(self) -> Any:
        """SIGTERM/SIGINT: finish the current step, save a checkpoint, exit cleanly."""

        def handler(signum: int, _frame: Any) -> None:
            self._stop_signal = signum

        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, handler)
        return previous

    def fit(self) -> dict[str, Any]:
        """Train to ``--max-iters`` or ``--max-time``; returns the results dict (also written to disk)."""
        c = self.cfg
        start = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._setup_data()
        resume_path = self._resume_path()
        if resume_path is not None:
            self._restore(checkpoint.load(resume_path), resume_path)
            self.say(f"resumed from {resume_path} at step {self.step}")
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
            results = self._train(metrics, trackers, resume_path, start)
            summary = {k: v for k, v in results.items() if k not in ("config", "model_config")}
            trackers.finish(summary)
        return results

    def _train(
        self, metrics: Any, trackers: Trackers, resume_path: Path | None, start: float
    ) -> dict[str, Any]:
        c = self.cfg
        tokens_per_step = self.tokens_per_step
        ranks = f" x {self.dist.world_size} ranks" if self.dist.enabled else ""
        self.say(
            f"model {c.model.model_name} ({self.n_params / 1e6:.2f}M params) on {self.device} {self.dtype}; "
            f"{tokens_per_step:,} tokens/step (batch {c.data.batch_size} x accumulation "
            f"{c.data.gradient_accumulation}{ranks} x block {self.gpt_config.block_size}); "
            f"train {self.data.num_tokens('train'):,} / val {self.data.num_tokens('val'):,} tokens"
        )
        previous_handlers = self._install_signal_handlers()
        bar = self._progress_bar()
        last_eval: dict[str, float] = {}
        stop_reason, stopped_by_signal = "max_iters", False
        window_start, window_steps, window_time = time.perf_counter(), 0, 0.0
        # per-step "applied" flags of the current log window, kept on the device until logged
        applied_flags = torch.zeros(c.train.log_interval, device=self.device)
        seg_start = time.perf_counter()
        base_time = self.train_time
        tokens_per_s = 0.0
        loss_acc = torch.zeros((), device=self.device)
        try:
            if self.step == 0 and resume_path is None:
                last_eval = self._evaluate_and_log(metrics, trackers, bar)
            while self.step < self.max_iters:
                self.train_time = base_time + time.perf_counter() - seg_start
                # Ranks must agree to stop, which costs a collective: they check at log steps.
                if not self.dist.enabled or self.step % c.train.log_interval == 0:
                    out_of_time = c.train.max_time > 0 and self.train_time >= c.train.max_time
                    out_of_time, signalled = distributed.any_rank(
                        [out_of_time, self._stop_signal is not None], self.dist, self.device
                    )
                    if signalled:  # on this rank or another: every rank saves and stops
                        local = self._stop_signal
                        stop_reason = f"signal {signal.Signals(local).name if local else 'on another rank'}"
                        stopped_by_signal = True
                        break
                    if out_of_time:
                        stop_reason = "max_time"
                        break
                lr = self.lr()
                out = self.step_fn(self.data.train_batch, lr)
                grad_norm = out.grad_norm
                self.step += 1
                window_steps += 1
                loss_acc += torch.where(out.applied > 0, out.loss, 0.0)  # a skipped step's loss is left out
                applied_flags[window_steps - 1] = out.applied
                for ext in self.extensions:
                    ext.on_step_end(self.step, self.model, self.optimizer)
                if bar is not None:
                    bar.update(1)
                save_due = c.output.save_checkpoint and self.step % c.output.checkpoint_interval == 0
                # A checkpoint step is also a log step, so the checkpoint counts every skipped step.
                if self.step % c.train.log_interval == 0 or self.step == self.max_iters or save_due:
                    now = time.perf_counter()
                    window_time += now - window_start
                    # the loop's host reads, once per log step: which steps were applied, the loss
                    flags = applied_flags[:window_steps].tolist()
                    window_good = int(sum(flags))
                    if self._account_steps(flags, metrics, bar):  # went back to a checkpoint
                        loss_acc.zero_()
                        window_start, window_steps, window_time = time.perf_counter(), 0, 0.0
                        continue
                    loss_sum = float(distributed.all_reduce_mean(loss_acc, self.dist))
                    train_loss = loss_sum / window_good if window_good else math.nan
                    tokens_per_s = window_steps * tokens_per_step / window_time
                    record = {
                        "step": self.step,
                        "tokens": self.step * tokens_per_step,
                        "elapsed_s": base_time + now - seg_start,
                        "train_loss": train_loss,
                        "train_perplexity": math.exp(min(train_loss, 20.0)),
                        "lr": lr,
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "tokens_per_s": tokens_per_s,
                        "ms_per_step": 1000 * window_time / window_steps,
                        "peak_memory_bytes": peak_memory_bytes(self.device),
                    }
                    m = mfu(tokens_per_s, self.gpt_config, self.n_params, self.device)
                    if m is not None:
                        record["mfu"] = m
                    metrics.write(record)
                    trackers.log({k: v for k, v in record.items() if v is not None}, step=self.step)
                    self._log_line(bar, record)
                    loss_acc.zero_()
                    window_start, window_steps, window_time = time.perf_counter(), 0, 0.0
                if self.step % c.train.eval_interval == 0:
                    t0 = time.perf_counter()
                    last_eval = self._evaluate_and_log(metrics, trackers, bar)
                    window_start += time.perf_counter() - t0  # evaluation is not training throughput
                if save_due:
                    t0 = time.perf_counter()
                    self.save()
                    window_start += time.perf_counter() - t0
            if window_steps:  # stopped between log steps: count the skipped steps of that stretch
                self._account_steps(applied_flags[:window_steps].tolist(), metrics, bar, can_restart=False)
        finally:
            for s, h in previous_handlers.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            # No batch is needed any more; the data state rewinds to exclude the one prepared ahead.
            self.data.close()
        self.train_time = base_time + time.perf_counter() - seg_start
        if last_eval.get("step") != self.step:
            last_eval = self._evaluate_and_log(metrics, trackers, None)
        if c.output.save_checkpoint or stopped_by_signal:
            self.save()
        results = self._results(last_eval, tokens_per_s, stop_reason, time.perf_counter() - start)
        if self.dist.is_main:
            write_json_atomic(self.out_dir / "results.json", results)
            if c.output.json_output:
                write_json_atomic(Path(c.output.json_output), results)
        self.say(
            f"done ({stop_reason}): step {self.step}, val loss {results['final_val_loss']:.4f} "
            f"(best {results['best_val_loss']:.4f}), {results['tokens_per_s']:,.0f} tokens/s, "
            f"{results['wall_time_s']:.1f} s; results in {self.out_dir / 'results.json'}"
        )
        return results

    def _account_steps(self, flags: list[float], metrics: Any, bar: Any, can_restart: bool = True) -> bool:
        """Record the skipped steps among the last ``len(flags)`` steps (flag 0.0 = skipped).

        Skipped steps changed nothing, so learning of them at the log step rather than at once
        loses nothing and keeps the step free of host reads. Returns True when too many in a row
        sent the run back to its last checkpoint (the rest of the window is then void).
        """
        first = self.step - len(flags) + 1
        for i, flag in enumerate(flags):
            if flag > 0:
                self.consecutive_bad = 0
            elif self._bad_step(first + i, metrics, bar, can_restart):
                return True
        return False

    def _bad_step(self, step: int, metrics: Any, bar: Any, can_restart: bool) -> bool:
        """A skipped non-finite step; after too many in a row, go back to the last checkpoint."""
        self.bad_steps += 1
        self.consecutive_bad += 1
        metrics.write({"step": step, "event": "nonfinite_step_skipped", "consecutive": self.consecutive_bad})
        self._write(bar, f"step {step}: non-finite gradient, step skipped ({self.consecutive_bad} in a row)")
        if self.consecutive_bad < self.cfg.train.max_bad_steps or not can_restart:
            return False
        last = self.out_dir / checkpoint.LAST
        if self.restarts >= MAX_RESTARTS or not last.exists():
            why = "no checkpoint to go back to" if not last.exists() else f"{self.restarts} restarts already"
            raise UserError(
                f"{self.consecutive_bad} consecutive non-finite steps at step {step} and {why}; "
                "lower --learning-rate (and use --save-checkpoint so the run can heal itself)"
            )
        scale = self.lr_scale * 0.5
        bad_step, bad_steps, restarts = step, self.bad_steps, self.restarts
        self._restore(checkpoint.load(last), last)  # the counts carry on: they describe the whole run
        self.lr_scale, self.consecutive_bad, self.bad_steps = scale, 0, bad_steps
        self.restarts = restarts + 1
        metrics.write({"step": self.step, "event": "restart", "from_step": bad_step, "lr_scale": scale})
        self._write(bar, f"restarted from {last} at step {self.step} with the LR scaled by {scale:g}")
        return True

    def _evaluate_and_log(self, metrics: MetricsLog, trackers: Trackers, bar: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        ev = self.evaluate()
        eval_s = time.perf_counter() - t0
        self.eval_time += eval_s
        is_best = ev["val_loss"] < self.best_val_loss
        if is_best:
            self.best_val_loss = ev["val_loss"]
        record = {
            "step": self.step,
            "tokens": self.step * self.tokens_per_step,
            "elapsed_s": self.train_time,
            **ev,
            "best_val_loss": self.best_val_loss,
            "eval_s": eval_s,
        }
        age = process_age_s()
        if age is not None:
            record["since_launch_s"] = age  # from the command's start, imports and data included
        metrics.write(record)
        trackers.log(
            {f"eval/{k}" if k.startswith("train_") else k: v for k, v in record.items()}, step=self.step
        )
        msg = (
            f"eval step {self.step}: train {ev['train_loss']:.4f}, val {ev['val_loss']:.4f} "
            f"± {ev['val_loss_se']:.4f} (ppl {ev['val_perplexity']:.1f}, {eval_s:.1f} s)"
            f"{' *best*' if is_best else ''}"
        )
        self._write(bar, msg)
        if is_best and self.cfg.output.save_checkpoint and self.step > 0:
            self.save(last=False, best=True)
        return {**ev, "step": self.step}

    def _results(
        self, ev: dict[str, float], tokens_per_s: float, stop_reason: str, wall: float
    ) -> dict[str, Any]:
        c = self.cfg
        tokens_seen = self.step * self.tokens_per_step
        results: dict[str, Any] = {
            "final_train_loss": ev["train_loss"],
            "final_val_loss": ev["val_loss"],
            "final_val_loss_se": ev["val_loss_se"],
            "best_val_loss": self.best_val_loss,
            "final_val_perplexity": ev["val_perplexity"],
            "iters": self.step,
            "tokens_seen": tokens_seen,
            "wall_time_s": self.train_time,
            "eval_time_s": self.eval_time,
            "eval_fraction": self.eval_time / self.train_time if self.train_time > 0 else 0.0,
            "tokens_per_s": tokens_seen / self.train_time if self.train_time > 0 else 0.0,
            "last_window_tokens_per_s": tokens_per_s,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "n_params": self.n_params,
            "stop_reason": stop_reason,
            "bad_steps": self.bad_steps,
            "restarts": self.restarts,
            "lr_scale": self.lr_scale,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "world_size": self.dist.world_size,
            "process_time_s": wall,
            "config": c.to_dict(),
            "model_config": self.gpt_config.to_dict(),
            **environment(),
        }
        for ext in self.extensions:
            results.update(ext.final_results(self.model))
        return results

    # ------------------------------------------------------------ console
    def _progress_bar(self) -> Any:
        if not self.log_to_console or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=self.max_iters, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    def _write(self, bar: Any, msg: str) -> None:
        if not self.log_to_console:
            return
        if bar is not None:
            bar.write(msg)
        else:
            print(msg, flush=True)

    def _log_line(self, bar: Any, r: dict[str, Any]) -> None:
        if bar is not None:
            bar.set_postfix(loss=f"{r['train_loss']:.3f}", tok_s=f"{r['tokens_per_s']:,.0f}", refresh=False)
            return
        self._write(
            None,
            f"step {r['step']:6d}/{self.max_iters} | loss {r['train_loss']:.4f} | lr {r['lr']:.2e} | "
            f"{r['tokens_per_s']:,.0f} tok/s | {r['ms_per_step']:.1f} ms/step",
        )

    def sample(self, max_new_tokens: int, prompt: str = "") -> str:
        """Text generated by the current model (see :func:`gpt2.sample.generate_text`)."""
        from gpt2.sample import generate_text

        with autocast(self.device, self.dtype) if self.device.type == "cuda" else nullcontext():
            return generate_text(self.model, prompt, max_new_tokens, seed=self.cfg.train.seed)
