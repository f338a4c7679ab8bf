"""The run configuration: one typed object, built from the command line and validated once.

Each section is a dataclass; each field carries its own help text in ``metadata``, so the
command line (:mod:`gpt2.cli`) is generated from these classes and cannot drift from them.
Fields whose default is ``None`` are filled from the model preset (:mod:`gpt2.presets`),
then from ``FALLBACKS``; :func:`resolve` does that and records which values the user gave.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gpt2.data.synthetic import TASKS, TaskParams
from gpt2.errors import ConfigError
from gpt2.model.config import GPTConfig
from gpt2.model.steps import STEPS, apply_step, get_step, parse_steps
from gpt2.optim.prune.schedule import RAMPS
from gpt2.optim.prune.scores import OPTIMIZER_SCORES, SCORES, describe
from gpt2.presets import PRESETS

ARCHITECTURES = ("vanilla", "unified-ra")
DEFAULT_RA_STEP = "V1"  # the step --architecture unified-ra trains when --ra-step is not given
VANILLA_STEP = "V0"  # --architecture vanilla builds exactly this step's model
RA_GATES = ("per-head", "per-layer")
GATE_SCHEDULES = ("none", "delayed", "variance")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OPTIMIZERS = ("sgd", "adam", "adamw", "adamwspam", "adamwprune", "muon")
SPAM_VARIANTS = ("reference", "paper")  # gpt2.optim.spam.VARIANTS, named here for the torch-free CLI
PRUNING_METHODS = ("none", "magnitude", "movement", "state")
PRUNING_RAMP_FRACTION = 0.8  # default ramp end, as a fraction of --max-iters
DTYPES = ("auto", "float32", "bfloat16", "float16")
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
TRACKERS = ("none", "wandb", "trackio")
CORPORA = ("shakespeare", "finewebedu", "openwebtext")
KNOWN_DATASETS = CORPORA + tuple(TASKS)
GPT2_VOCAB = 50304  # GPT-2's 50257 ids padded to a multiple of 64 for fast matmuls


def opt(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its command-line help and optional ``aliases``, ``choices``, ``metavar``
    and ``rule`` (the field's own check, see :class:`Rule`)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class Rule:
    """A check of one field's value; ``message`` may use ``{flag}`` and ``{value}``."""

    ok: Callable[[Any], bool]
    message: str

    def check(self, flag: str, value: Any) -> None:
        if value is not None and not self.ok(value):
            raise ConfigError(self.message.format(flag=flag, value=value))


POSITIVE = Rule(lambda v: v > 0, "{flag} must be positive, got {value}")
NON_NEGATIVE = Rule(lambda v: v >= 0, "{flag} must be >= 0, got {value}")
FRACTION = Rule(lambda v: 0 <= v < 1, "{flag} must be in [0, 1), got {value}")
NOT_EMPTY = Rule(lambda v: bool(v.strip()), "{flag} must not be empty")
AT_LEAST_ONE = Rule(lambda v: v >= 1, "{flag} must be >= 1, got {value}")
DEVICE = Rule(
    lambda v: v in ("auto", "cpu") or v.startswith(("cuda", "mps")),
    "unknown {flag} {value!r}: use auto, cpu, cuda or cuda:N",
)


@dataclass
class ModelSection:
    """Model and architecture."""

    architecture: str = opt("vanilla", "which model family and trainer extension", choices=ARCHITECTURES)
    model_name: str = opt(
        "gpt2",
        "size preset; 'tiny' (4 layers, 4 heads, 128 wide) is the CPU preset",
        choices=tuple(PRESETS),
        aliases=("--model-size",),
    )
    n_layer: int | None = opt(None, "override the preset's number of layers", rule=POSITIVE)
    n_head: int | None = opt(None, "override the preset's number of heads", rule=POSITIVE)
    n_embd: int | None = opt(None, "override the preset's embedding width", rule=POSITIVE)
    block_size: int | None = opt(
        None,
        "context length in tokens (preset default: 1024 for GPT-2, 64 for tiny)",
        rule=POSITIVE,
    )
    dropout: float | None = opt(
        None, "dropout probability everywhere (preset default: 0.1 GPT-2, 0 tiny)", rule=FRACTION
    )
    bias: bool = opt(True, "bias in Linear and LayerNorm layers")
    vocab_size: int | None = opt(
        None,
        f"rows of the embedding and LM head (default: {GPT2_VOCAB}, GPT-2's 50257 padded, for text; "
        "--task-vocab-size for a synthetic task)",
        rule=POSITIVE,
    )
    ra_step: str | None = opt(
        None,
        f"V-series step for --architecture unified-ra: {', '.join(STEPS)} (default {DEFAULT_RA_STEP}; "
        "see --list-steps)",
        aliases=("--ra-mla-ablation-step",),
    )
    ra_gates: str = opt(
        "per-head", "Unified RA gates (w_std, w_rec): one pair per head or per layer", choices=RA_GATES
    )
    gate_schedule: str | None = opt(
        None,
        "how the reciprocal gates (RA and R-MLP w_rec) come in: none; delayed (frozen at 0 for "
        "--gate-delay-steps, then 0.1 and trained); variance (frozen until the loss variance over "
        "--gate-variance-window steps is below --gate-variance-threshold, checked every "
        "--gate-variance-every steps from --gate-variance-start, then 0.1 coupled in over "
        "--gate-ramp-steps). Default: the V-step's",
        choices=GATE_SCHEDULES,
    )
    gate_delay_steps: int = opt(75, "delayed gate schedule: steps the gates stay frozen", rule=NON_NEGATIVE)
    gate_variance_start: int = opt(250, "variance gate schedule: first step checked", rule=NON_NEGATIVE)
    gate_variance_every: int = opt(50, "variance gate schedule: steps between checks", rule=POSITIVE)
    gate_variance_window: int = opt(
        100, "variance gate schedule: per-step losses the variance is taken over", rule=AT_LEAST_ONE
    )
    gate_variance_threshold: float = opt(
        0.02, "variance gate schedule: open below this loss variance", rule=POSITIVE
    )
    gate_ramp_steps: int = opt(
        200, "variance gate schedule: steps of the linear coupling ramp after opening", rule=AT_LEAST_ONE
    )
    init_from: str | None = opt(
        None,
        "start from a local transformers GPT-2 directory (fine-tuning, or continuing from "
        "python -m gpt2.export): its weights replace the initial ones; the shapes must match",
        metavar="DIR",
    )
    kv_gather: bool = opt(
        False,
        "KV-pruning steps with a fixed keep count (V14, V17): gather each query's kept keys instead "
        "of masking the full score matrix (the same result; see the README for which is faster)",
    )
    compile: bool = opt(False, "torch.compile the model")
    compile_mode: str = opt(
        "default",
        "torch.compile mode with --compile: reduce-overhead adds CUDA graphs, max-autotune also "
        "tunes matmul kernels (longer warm-up)",
        choices=COMPILE_MODES,
    )
    flash_attention: bool = opt(
        False, "accepted for compatibility; SDPA already picks the flash kernel when it can"
    )
    sdpa_backend: str = opt(
        "auto",
        "attention kernel: auto lets PyTorch choose (flash on most GPUs); flash, cudnn, efficient or "
        "math use that one alone and fail loudly where it cannot run (cudnn and efficient need CUDA)",
        choices=SDPA_BACKENDS,
    )


def count_or_auto(text: str) -> int:
    """``--ablation-seeds``: a count, or ``auto`` (0: the sequential rule decides)."""
    return 0 if str(text).strip().lower() == "auto" else int(text)


@dataclass
class AblationSection:
    """Ablation studies (unified-ra)."""

    ablation_mode: bool = opt(False, "run several V-steps one after another under the same budget and data")
    ablation_steps: str | None = opt(None, "comma-separated steps for --ablation-mode (default V0,V1,V3)")
    ablation_seeds: int = opt(
        1,
        "run every arm with seeds seed..seed+N-1; or auto: seeds in rounds (every arm once a round) until "
        "each arm's verdict is decisive, or --max-seeds are spent (the sequential rule of "
        "gpt2/analysis/stats.py)",
        rule=Rule(lambda v: v >= 0, "{flag} must be a count >= 1 or auto"),
        parse=count_or_auto,
        metavar="N|auto",
    )
    max_seeds: int = opt(
        10,
        "--ablation-seeds auto: at most this many seeds per arm",
        rule=Rule(lambda v: v >= 2, "{flag} must be >= 2, got {value}"),
    )
    min_effect: float = opt(
        0.02,
        "the smallest difference in --decide-on that matters (nats for a loss, a share for an accuracy): "
        "an arm whose difference is shown to lie within it is decided as 'no difference larger than E'",
        rule=POSITIVE,
        metavar="E",
    )
    decide_on: str = opt(
        "val_loss_at_equal_tokens",
        "the metric of the verdicts: val_loss_at_equal_tokens, val_loss_at_equal_time, final_val_loss, "
        "best_val_loss, accuracy (a synthetic task's val accuracy at equal tokens), or any number in a "
        "run's results.json (final_mc_<task>_acc_norm, ...); higher is better for accuracies",
        metavar="METRIC",
    )
    ablate: str | None = opt(
        None,
        "ablate any setting: KEY=V1,V2,... (KEY a flag name, with - or _); repeat the flag for more "
        "axes, which form a grid (every combination, so interactions are measured). The first value "
        "of each axis is the control. --ablation-mode --ablation-steps S is --ablate ra_step=S",
        metavar="KEY=V1,V2",
        repeat=True,
    )
    list_steps: bool = opt(False, "print the V-step table and exit")
    list_experiments: bool = opt(False, "print the experiments/ files with their claims and exit")


LAUNCHERS = ("local", "slurm")


@dataclass
class LauncherSection:
    """Launching an ablation's runs: each (arm, seed) is its own job (local processes or SLURM)."""

    launcher: str = opt(
        "local",
        "where each (arm, seed) job runs: local (processes on this machine) or slurm (one SLURM job "
        "each, through submitit; rerunning the command collects and never resubmits a live job)",
        choices=LAUNCHERS,
    )
    ablation_workers: int = opt(
        1,
        "local: jobs at once. On CUDA each gets its own --gpus-per-run GPUs; on CPU the cores are split "
        "between them and each run's --threads is its share (refused with --max-time: jobs sharing "
        "memory bandwidth would not train for equal time)",
        rule=AT_LEAST_ONE,
    )
    gpus_per_run: int = opt(
        1,
        "GPUs per job; above 1 the job runs under torchrun --nproc_per_node K (local and slurm)",
        aliases=("--slurm-gpus-per-run",),
        rule=AT_LEAST_ONE,
    )
    slurm_partition: str = opt("", "slurm: partition (empty: the cluster's default)")
    slurm_time: int = opt(
        60,
        "slurm: each job's time limit in minutes; SIGTERM comes 90 s before it, the run checkpoints "
        "and the job is requeued to resume",
        rule=POSITIVE,
    )
    slurm_account: str = opt("", "slurm: account to charge (empty: your default)")
    slurm_extra: str | None = opt(
        None,
        "slurm: another sbatch option as KEY=VALUE (e.g. qos=high, constraint=h100); repeat the flag",
        metavar="KEY=VALUE",
        repeat=True,
    )


@dataclass
class DataSection:
    """Data."""

    dataset: str = opt(
        "shakespeare",
        "shakespeare (bundled, offline), finewebedu, openwebtext, a path to a text file or folder, or a "
        "synthetic probe task generated from --task-seed: mqar (multi-query associative recall, Zoology) "
        "or copy; a task's examples are --block-size tokens long and only its answers are scored",
        rule=NOT_EMPTY,
    )
    task_vocab_size: int = opt(
        8192, "synthetic tasks: token ids 0..N-1 (Zoology's MQAR uses 8192)", rule=AT_LEAST_ONE
    )
    task_train_examples: int = opt(
        100_000, "synthetic tasks: training examples (drawn at random, with replacement)", rule=POSITIVE
    )
    task_val_examples: int = opt(
        3_000, "synthetic tasks: validation examples (evaluations take the first ones)", rule=POSITIVE
    )
    task_seed: int = opt(
        0, "synthetic tasks: seed of the examples (the same for every --seed, like a prepared dataset)"
    )
    mqar_kv_pairs: int | None = opt(
        None,
        "mqar: key-value pairs per example, each queried once (default: block size / 16, the ratio of "
        "Zoology's Figure 2: 4 at 64, 8 at 128, 16 at 256)",
        rule=POSITIVE,
    )
    mqar_power_a: float = opt(
        0.01,
        "mqar: power-law exponent a of the query gaps, p(gap i) ~ a * i^(a-1) (1: uniform)",
        rule=POSITIVE,
    )
    mqar_random_non_queries: bool = opt(
        False, "mqar: fill the positions between queries with random tokens instead of 0 (Figure 2: 0)"
    )
    data_dir: str = opt("./gpt2/data", "where prepared datasets live (<data-dir>/<dataset>/train.bin)")
    batch_size: int | None = opt(
        None, "sequences per micro-batch per process (preset default)", rule=POSITIVE
    )
    gradient_accumulation: int | None = opt(
        None,
        "micro-batches per optimizer step per process; effective batch = batch x accumulation x ranks",
        rule=POSITIVE,
    )


@dataclass
class OptimSection:
    """Optimizer and learning rate."""

    optimizer: str | None = opt(
        None,
        "optimizer; adam gets no weight decay, use adamw for decoupled decay (preset default: muon "
        "for tiny, adamw otherwise)",
        choices=OPTIMIZERS,
    )
    learning_rate: float | None = opt(
        None, "peak learning rate (preset default: 6e-4 GPT-2; tiny 8e-3 with Muon, else 2e-3)", rule=POSITIVE
    )
    min_lr: float | None = opt(None, "floor of the cosine decay (preset default: lr/10)")
    warmup_steps: int | None = opt(None, "linear warmup steps (preset default: 200 GPT-2)", rule=NON_NEGATIVE)
    decay_lr: bool = opt(True, "cosine-decay the LR to --min-lr (off: constant after warmup)")
    weight_decay: float = opt(
        0.1,
        "decoupled weight decay on >=2-D weights only (never biases, LayerNorms or gates)",
        rule=NON_NEGATIVE,
    )
    beta1: float = opt(0.9, "Adam beta1", rule=FRACTION)
    beta2: float | None = opt(None, "Adam beta2 (default 0.999; tiny preset 0.99)", rule=FRACTION)
    grad_clip: float = opt(
        1.0, "clip the global gradient norm to this value; 0 turns clipping off", rule=NON_NEGATIVE
    )
    muon_momentum: float = opt(0.95, "Muon: momentum of the blocks' matrices (Nesterov)", rule=FRACTION)
    muon_ns_dtype: str = opt(
        "auto",
        "Muon: precision of the Newton-Schulz iteration; auto = bfloat16 on CUDA and on CPUs with AMX, "
        "float32 elsewhere (where bf16 matmuls are slower)",
        choices=("auto", "float32", "bfloat16"),
    )
    spam_theta: float = opt(
        50.0, "AdamWSPAM: spike clipping strength theta (SPAM paper: 5000)", rule=POSITIVE
    )
    spam_interval: int = opt(
        1000,
        "AdamWSPAM: zero the Adam moments every N optimizer steps; 0 disables",
        rule=NON_NEGATIVE,
    )
    spam_warmup_steps: int = opt(
        100,
        "AdamWSPAM: cosine LR re-warmup steps after each reset (one as long as --spam-interval or longer "
        "keeps the LR in re-warmup: accepted, with a warning)",
        rule=NON_NEGATIVE,
    )
    spam_enable_clip: bool = opt(
        False, "AdamWSPAM: spike-aware clipping, |g| > sqrt(theta*v) -> sign(g)*sqrt(theta*v)"
    )
    spam_spike_detection: bool = opt(
        False,
        "AdamWSPAM: z-score soft reset (m*=0.5, v*=0.9 when the gradient norm is > 2 std above the "
        "last 100); reads the norm to the host every step",
    )
    spam_amsgrad: bool = opt(False, "AdamWSPAM: AMSGrad (adds a third state tensor)")
    spam_variant: str = opt(
        "reference",
        "AdamWSPAM: whose algorithm. reference = the earlier system's, fixed (clipping from step 2 "
        "against v+1e-12 before --grad-clip; re-warmup max(1e-3, (1-cos(pi*c/W))/2); torch AdamW's "
        "update). paper = the SPAM authors' code: no clipping in the first 20 steps of the run and of "
        "each interval, clipping after --grad-clip; re-warmup 0.01+0.99*(1-cos(pi*c/(W+1)))/2; eps 1e-6 "
        "added to the uncorrected sqrt(v); weight decay after the update at the un-warmed LR; no AMSGrad",
        choices=SPAM_VARIANTS,
    )
    adamwprune_variant: str = opt(
        "bitter0",
        "AdamWPrune importance score (higher keeps; m, v Adam moments): "
        + "; ".join(describe(name) for name in OPTIMIZER_SCORES)
        + ". The extra steps apply when --max-iters is not given",
        choices=OPTIMIZER_SCORES,
    )
    adamwprune_base_optimizer_name: str = opt(
        "adamw",
        "AdamWPrune base optimizer (adamwspam: with the --spam-* settings)",
        choices=("adamw", "adamwspam"),
    )
    adamwprune_beta1: float | None = opt(None, "AdamWPrune beta1; unset: --beta1", rule=FRACTION)
    adamwprune_beta2: float | None = opt(None, "AdamWPrune beta2; unset: --beta2", rule=FRACTION)
    adamwprune_weight_decay: float | None = opt(
        None,
        "AdamWPrune weight decay on >=2-D weights; unset: --weight-decay",
        rule=NON_NEGATIVE,
    )
    adamwprune_amsgrad: bool = opt(False, "AdamWPrune AMSGrad")


def _reference_ramps() -> str:
    """``magnitude cubic, movement linear, state cubic``: each method's ramp in the score table."""
    state = sorted({SCORES[name].ramp for name in OPTIMIZER_SCORES})
    return ", ".join(
        [*(f"{m} {SCORES[m].ramp}" for m in PRUNING_METHODS if m in SCORES), f"state {'/'.join(state)}"]
    )


@dataclass
class PruningSection:
    """Pruning."""

    pruning_method: str = opt(
        "none",
        "what decides which weights are pruned: magnitude |w|, movement w*(w-w0) (no regrowth: once "
        "pruned, stays pruned), or state (--optimizer adamwprune's variant)",
        choices=PRUNING_METHODS,
    )
    target_sparsity: float = opt(
        0.5,
        "final fraction of prunable weights set to zero, in [0, 1); reached exactly at the ramp end",
        rule=FRACTION,
    )
    pruning_warmup: int = opt(
        1000,
        "iterations before any pruning; this, the ramp end and the frequency count iterations from 0 as "
        "the LR schedule does (iteration i is the (i+1)-th optimizer step)",
        rule=NON_NEGATIVE,
    )
    pruning_ramp_end: int | None = opt(
        None,
        "iteration at which the sparsity ramp reaches --target-sparsity, then holds; below --max-iters "
        "(unset: 0.8 x --max-iters)",
    )
    pruning_schedule: str = opt(
        "auto",
        "shape of the sparsity ramp from --pruning-warmup to --pruning-ramp-end: target x p (linear) or "
        "target x p^3 (cubic), p the fraction of the ramp done; auto = the method's reference shape ("
        + _reference_ramps()
        + "). The run's config records the shape used",
        choices=("auto", *RAMPS),
    )
    pruning_frequency: int = opt(
        50,
        "iterations between mask updates during the ramp (and one more at its end)",
        aliases=("--adamwprune-frequency",),
        rule=POSITIVE,
    )
    prune_embeddings: bool = opt(
        False,
        "also prune the token embedding (= the tied lm_head); by default only the Linear weights of "
        "the blocks are pruned, never embeddings, LayerNorms, biases or gates",
    )
    pruning_threshold_sample: float = opt(
        0.0,
        "estimate the global score threshold from this random fraction of the scores (0: exact)",
        rule=FRACTION,
    )


@dataclass
class TrainSection:
    """Training run."""

    max_iters: int = opt(
        10000,
        "optimizer steps; also the LR decay horizon (not given: 1.21x/1.3x for some AdamWPrune variants)",
        rule=POSITIVE,
    )
    max_time: float = opt(
        0, "wall-clock budget in seconds (0: none); the run stops at whichever comes first", rule=NON_NEGATIVE
    )
    num_epochs: float | None = opt(
        None,
        "passes over the training tokens; sets --max-iters from the dataset size",
        aliases=("--epochs",),
        rule=POSITIVE,
    )
    seed: int = opt(1337, "seed for init, dropout and data order")
    threads: int = opt(
        0,
        "CPU threads of this run's kernels (0: OMP_NUM_THREADS if set, else every core the process may "
        "use); matmul results can depend on it, so ablation jobs record theirs",
        rule=NON_NEGATIVE,
    )
    device: str = opt("auto", "auto (CUDA if present, else CPU), cpu, cuda, cuda:N", rule=DEVICE)
    dtype: str = opt(
        "auto",
        "autocast dtype. auto: bfloat16 on CUDA (float16 if unsupported), on CPUs with AMX, and on CPUs "
        "with AVX512-BF16 where a 50 ms matmul probe finds bf16 1.3x faster than fp32 (AMD EPYC: yes; "
        "Xeons without AMX: no, bf16 measured slower there); else float32",
        choices=DTYPES,
    )
    log_interval: int | None = opt(None, "steps between train-loss logs", rule=POSITIVE)
    eval_interval: int | None = opt(None, "steps between evaluations", rule=POSITIVE)
    eval_samples: int | None = opt(None, "batches per split per evaluation", rule=POSITIVE)
    eval_budget: float = opt(
        0.05,
        "with --max-time: evaluations at --eval-interval run only while evaluation time stays within "
        "this fraction of --max-time (the one at step 0 is then skipped unless --init-from; the final "
        "one always runs; 0: no limit)",
        rule=FRACTION,
    )
    eval_task: str | None = opt(
        None,
        "a multiple-choice task scored at every evaluation (on rank 0's model, counted as evaluation "
        "time): a .jsonl in HellaSwag's layout (ctx/endings/label) or evals/tiny_mc's "
        "(question/choices/answer), or a folder of them; accuracy by summed log-likelihood (acc) and "
        "per character (acc_norm), as lm-eval computes them; repeat the flag for more tasks",
        metavar="FILE_OR_DIR",
        repeat=True,
    )
    compare_batches: int = opt(
        4,
        "validation batches of the comparison evaluations: at steps 16, 23, 32, 45, 64, ... (x sqrt 2) and "
        "at the end every run evaluates these same batches, outside --max-time and --eval-budget, so "
        "that the arms of an ablation compare at equal tokens and training time (0: none)",
        rule=NON_NEGATIVE,
    )
    max_bad_steps: int = opt(
        5,
        "non-finite steps in a row (each skipped) before reloading the last checkpoint with half the LR",
        rule=POSITIVE,
    )
    deterministic: bool = opt(False, "bitwise-reproducible kernels (slower on CUDA; CPU runs already are)")
    dry_run: bool = opt(
        False, "validate flags, build the model, run one step on a random batch, print the config, exit"
    )
    quiet: bool = opt(False, "no progress bar and no per-step log lines")


@dataclass
class OutputSection:
    """Outputs and checkpoints."""

    output_dir: str = opt("./output", "metrics.jsonl, results.json and checkpoints go here")
    save_checkpoint: bool = opt(False, "save checkpoint_last.pt and checkpoint_best.pt")
    checkpoint_interval: int = opt(1000, "steps between checkpoints with --save-checkpoint", rule=POSITIVE)
    keep_checkpoints: int = opt(
        0,
        "with --save-checkpoint, also keep the K most recent checkpoint_step_N.pt files",
        rule=NON_NEGATIVE,
    )
    overwrite: bool = opt(False, "start afresh in an output dir that holds another run's checkpoint")
    resume: str | None = opt(
        None, "resume from a checkpoint PATH, or 'auto' (the output dir's last one if any)"
    )
    json_output: str | None = opt(None, "also copy results.json to this path (legacy flag)")
    sample_tokens: int = opt(
        200, "tokens of text to sample and print at the end (0: none)", rule=NON_NEGATIVE
    )


@dataclass
class TrackSection:
    """Experiment tracking."""

    tracker: str = opt("none", "none, wandb, trackio, or a comma list")
    tracker_project: str = opt("", "tracker project (empty: derived from the working directory)")
    tracker_run_name: str = opt("", "tracker run name (empty: gpt2_<optimizer>_<timestamp>)")


@dataclass
class DistSection:
    """Distributed (torchrun)."""

    parallel: str = opt(
        "ddp",
        "under torchrun: ddp replicates the model; fsdp shards parameters, gradients and optimizer "
        "state per block (FSDP2), for models that do not fit on one device",
        choices=("ddp", "fsdp"),
    )
    ddp_find_unused_params: bool = opt(False, "DDP find_unused_parameters (off: every parameter is used)")
    dist_timeout: float = opt(
        600.0,
        "seconds a collective may wait for the other ranks before it fails (gloo and NCCL): the bound "
        "on a hang when a rank dies outside torchrun's watch; keep it above the longest gap between "
        "collectives (a first compile, data preparation on rank 0)",
        rule=POSITIVE,
        metavar="S",
    )


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "ablation": AblationSection,
    "launcher": LauncherSection,
    "data": DataSection,
    "optim": OptimSection,
    "pruning": PruningSection,
    "train": TrainSection,
    "output": OutputSection,
    "track": TrackSection,
    "dist": DistSection,
}

# Defaults for preset-dependent fields when the preset does not set them.
FALLBACKS: dict[str, Any] = dict(
    optimizer="adamw",
    block_size=1024,
    dropout=0.0,
    batch_size=8,
    gradient_accumulation=1,
    learning_rate=6e-4,
    warmup_steps=200,
    beta2=0.999,
    log_interval=10,
    eval_interval=100,
    eval_samples=200,
)


@dataclass
class RunConfig:
    """Every setting of a run, grouped by section; build with :func:`resolve`."""

    model: ModelSection = field(default_factory=ModelSection)
    ablation: AblationSection = field(default_factory=AblationSection)
    launcher: LauncherSection = field(default_factory=LauncherSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    pruning: PruningSection = field(default_factory=PruningSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)
    track: TrackSection = field(default_factory=TrackSection)
    dist: DistSection = field(default_factory=DistSection)
    explicit: tuple[str, ...] = ()  # field names the user set (command line or --config file)
    warnings: tuple[str, ...] = ()  # one line each about accepted settings (set by validate)

    def gpt_config(self, step: str | None = None) -> GPTConfig:
        """The model this run builds: the preset's shapes with the V-step (``step``, else the run's) applied.

        Vanilla is step V0. Every architecture setting is applied here, so the model a run builds
        can be read from its config alone.
        """
        m = self.model
        preset = PRESETS[m.model_name]
        shapes = GPTConfig(
            block_size=m.block_size,
            vocab_size=m.vocab_size or (self.data.task_vocab_size if self.task_params else GPT2_VOCAB),
            n_layer=m.n_layer or preset.n_layer,
            n_head=m.n_head or preset.n_head,
            n_embd=m.n_embd or preset.n_embd,
            dropout=m.dropout,
            bias=m.bias,
        )
        if self.task_params is not None:
            shapes = replace(shapes, sparse_targets=True)
        built = apply_step(shapes, step or m.ra_step or VANILLA_STEP)
        if built.attention == "unified_ra":  # gate layout only exists where there are RA gates
            built = replace(built, ra_per_head_gates=m.ra_gates == "per-head")
        if m.gate_schedule is not None and built.has_reciprocal_gates:
            built = replace(built, gate_schedule=m.gate_schedule)
        if m.kv_gather and built.attention == "kv_pruned" and not built.kv_learned:
            built = replace(built, kv_gather=True)
        return built

    def to_dict(self) -> dict[str, Any]:
        d = {name: asdict(getattr(self, name)) for name in SECTIONS}
        d["explicit"] = list(self.explicit)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown keys (from other versions) are ignored."""
        kwargs: dict[str, Any] = {}
        for name, section in SECTIONS.items():
            known = {f.name for f in fields(section)}
            kwargs[name] = section(**{k: v for k, v in d.get(name, {}).items() if k in known})
        return cls(**kwargs, explicit=tuple(d.get("explicit", ())))

    @property
    def eval_tasks(self) -> list[str]:
        """The --eval-task paths, in the order given."""
        return [t.strip() for t in (self.train.eval_task or "").split(";") if t.strip()]

    @property
    def task_params(self) -> TaskParams | None:
        """The synthetic task's parameters (None: the dataset is a text corpus)."""
        d = self.data
        if d.dataset not in TASKS:
            return None
        return TaskParams(
            vocab_size=d.task_vocab_size,
            seq_len=self.model.block_size,
            kv_pairs=d.mqar_kv_pairs or max(1, self.model.block_size // 16),
            power_a=d.mqar_power_a,
            random_non_queries=d.mqar_random_non_queries,
        )

    @property
    def pruning_score(self) -> str | None:
        """The registered importance score this run prunes by (None: no pruning)."""
        p = self.pruning
        if p.pruning_method == "none":
            return None
        return self.optim.adamwprune_variant if p.pruning_method == "state" else p.pruning_method

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step on one process."""
        return self.data.batch_size * self.data.gradient_accumulation * self.model.block_size


@functools.cache
def field_kinds() -> dict[str, tuple[str, type]]:
    """field name -> (its section, its base type: bool, int, float or str)."""
    out: dict[str, tuple[str, type]] = {}
    for sec, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
            out[f.name] = (sec, args[0] if args else hints[f.name])
    return out


def field_parsers() -> dict[str, Any]:
    """Fields whose text has its own reading (``--ablation-seeds auto``): name -> parse function."""
    return {
        f.name: f.metadata["parse"] for cls in SECTIONS.values() for f in fields(cls) if "parse" in f.metadata
    }


def repeated_fields() -> set[str]:
    """Fields given by a repeatable flag (``--ablate``): several values joined with ``"; "``."""
    return {f.name for cls in SECTIONS.values() for f in fields(cls) if f.metadata.get("repeat")}


def with_implied(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` plus what they imply and do not set: a V-step is trained by --architecture unified-ra."""
    return {"architecture": "unified-ra", **values} if "ra_step" in values else values


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """``field -> value`` over every section."""
    return {f.name: getattr(getattr(cfg, sec), f.name) for sec in SECTIONS for f in fields(SECTIONS[sec])}


NOT_ABLATABLE = ("ablation", "launcher", "output")  # sections an arm cannot vary (its folder, resume, ...)


def parse_value(name: str, text: str) -> Any:
    """``text`` as the type of field ``name``; :class:`ConfigError` when it is not one."""
    kind = field_kinds()[name][1]
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes", "on")
        return kind(text)
    except ValueError:
        raise ConfigError(f"--ablate {name}: {text!r} is not a {kind.__name__}") from None


def ablation_axes(text: str) -> list[tuple[str, list[Any]]]:
    """``"optimizer=adamw,adamwspam; learning-rate=3e-4,6e-4"`` -> ``[(field, [values]), ...]``."""
    kinds, axes = field_kinds(), []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        key, eq, values = part.partition("=")
        name = key.strip().lstrip("-").replace("-", "_")
        _check(bool(eq) and bool(values.strip()), f"--ablate {part!r}: write KEY=V1,V2,...")
        _check(name in kinds, f"--ablate: unknown setting {key.strip()!r}")
        _check(
            kinds[name][0] not in NOT_ABLATABLE, f"--ablate: {key.strip()} is not a setting an arm can vary"
        )
        _check(
            name != "seed", "--ablate: seeds are not arms; use --ablation-seeds N (every arm runs each seed)"
        )
        parsed = [parse_value(name, v.strip()) for v in values.split(",") if v.strip()]
        _check(len(set(parsed)) == len(parsed), f"--ablate {name}: a value is listed twice")
        _check(all(name != n for n, _ in axes), f"--ablate {name}: given twice")
        axes.append((name, parsed))
    _check(bool(axes), "--ablate: no KEY=V1,V2,... given")
    return axes


def section_of(name: str) -> str:
    """The section that owns field ``name``."""
    for sec, cls in SECTIONS.items():
        if any(f.name == name for f in fields(cls)):
            return sec
    raise KeyError(name)


def resolve(values: dict[str, Any], explicit: set[str] | None = None, *, check: bool = True) -> RunConfig:
    """Build a validated :class:`RunConfig` from flat ``field -> value`` pairs (``check=False``: not
    validated, for reading what a file's settings resolve to).

    ``values`` may omit fields (their defaults apply). Preset-dependent ``None`` fields are
    filled from the preset, then from ``FALLBACKS``. Raises :class:`ConfigError` on bad input.
    """
    explicit = set(explicit if explicit is not None else values)
    if values.get("ablate"):  # an ablation's own settings are those of its control arm (not inputs)
        values = dict(values)
        for name, choices in ablation_axes(values["ablate"]):
            values.setdefault(name, choices[0])
        values = with_implied(values)
    sections: dict[str, Any] = {}
    for sec, cls in SECTIONS.items():
        names = {f.name for f in fields(cls)}
        sections[sec] = cls(**{k: v for k, v in values.items() if k in names})
    unknown = set(values) - {f.name for cls in SECTIONS.values() for f in fields(cls)}
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    cfg = RunConfig(**sections, explicit=tuple(sorted(explicit)))
    preset = PRESETS.get(cfg.model.model_name)
    if preset is None:
        raise ConfigError(f"unknown --model-name {cfg.model.model_name!r}; choose from {', '.join(PRESETS)}")
    lr_given = cfg.optim.learning_rate is not None
    for sec in SECTIONS:
        obj = getattr(cfg, sec)
        for f in fields(obj):
            if getattr(obj, f.name) is None and (f.name in preset.train or f.name in FALLBACKS):
                setattr(obj, f.name, preset.train.get(f.name, FALLBACKS.get(f.name)))
    if not lr_given:  # the preset's LR for the optimizer the run ends up with
        cfg.optim.learning_rate = preset.lr_by_optimizer.get(cfg.optim.optimizer, cfg.optim.learning_rate)
    if cfg.optim.min_lr is None:
        cfg.optim.min_lr = cfg.optim.learning_rate / 10
    _resolve_pruning(cfg)
    if cfg.model.architecture == "unified-ra" and cfg.model.ra_step is None:
        cfg.model.ra_step = DEFAULT_RA_STEP
    if cfg.ablation.ablation_mode and cfg.ablation.ablation_steps is None:
        cfg.ablation.ablation_steps = "V0,V1,V3"
    if check:
        validate(cfg)
    return cfg


def iteration_bump(cfg: RunConfig) -> float:
    """Extra training (fraction of --max-iters) the reference's recipe gives this run's AdamWPrune variant.

    Only for ``--pruning-method state`` and only when neither --max-iters nor --num-epochs was given.
    """
    o, p, t = cfg.optim, cfg.pruning, cfg.train
    if o.optimizer != "adamwprune" or p.pruning_method != "state":
        return 0.0
    if "max_iters" in cfg.explicit or t.num_epochs is not None:
        return 0.0
    return SCORES[o.adamwprune_variant].extra_iters


def _resolve_pruning(cfg: RunConfig) -> None:
    """AdamWPrune settings default to the general ones; the ramp end and variant bump are derived."""
    o, p, t = cfg.optim, cfg.pruning, cfg.train
    for name, general in (
        ("adamwprune_beta1", o.beta1),
        ("adamwprune_beta2", o.beta2),
        ("adamwprune_weight_decay", o.weight_decay),
    ):
        if getattr(o, name) is None:
            setattr(o, name, general)
    if p.pruning_method != "none" and p.pruning_ramp_end is None and t.num_epochs is None:
        # before the bump: same ramp; the last iteration is max_iters - 1
        p.pruning_ramp_end = min(round(PRUNING_RAMP_FRACTION * t.max_iters), t.max_iters - 1)
    if p.pruning_schedule == "auto" and cfg.pruning_score is not None:
        p.pruning_schedule = SCORES[cfg.pruning_score].ramp  # the config says which ramp is used
    bump = iteration_bump(cfg)
    if bump:
        t.max_iters = round(t.max_iters * (1 + bump))


def _validate_optim_pruning(cfg: RunConfig, warnings: list[str]) -> None:
    """SPAM, AdamWPrune and pruning flags: ranges, and no flag that the run would ignore."""
    o, p, t = cfg.optim, cfg.pruning, cfg.train
    given = set(cfg.explicit)
    uses_spam = o.optimizer == "adamwspam" or (
        o.optimizer == "adamwprune" and o.adamwprune_base_optimizer_name == "adamwspam"
    )
    spam_flags = sorted(n for n in given if n.startswith("spam_"))
    _check(
        uses_spam or not spam_flags,
        f"--{spam_flags[0].replace('_', '-') if spam_flags else ''} needs --optimizer adamwspam "
        "(or adamwprune with --adamwprune-base-optimizer-name adamwspam)",
    )
    _check(
        not (
            uses_spam
            and o.spam_variant == "paper"
            and (o.spam_amsgrad if o.optimizer == "adamwspam" else o.adamwprune_amsgrad)
        ),
        "--spam-variant paper has no AMSGrad (the SPAM authors' optimizer): drop --spam-amsgrad "
        "/ --adamwprune-amsgrad or use --spam-variant reference",
    )
    if uses_spam and 0 < o.spam_interval <= o.spam_warmup_steps:  # accepted, as the earlier system did
        warnings.append(
            f"--spam-warmup-steps ({o.spam_warmup_steps}) >= --spam-interval ({o.spam_interval}): each reset "
            "comes before the re-warmup ends, so the LR stays in re-warmup for the whole run"
        )
    muon_flags = sorted(n for n in given if n.startswith("muon_"))
    _check(
        o.optimizer == "muon" or not muon_flags,
        f"--{muon_flags[0].replace('_', '-') if muon_flags else ''} needs --optimizer muon",
    )
    _check(
        o.optimizer != "muon" or cfg.dist.parallel != "fsdp",
        "--optimizer muon (the tiny preset's default) orthogonalises whole matrices, which FSDP "
        "shards: use --parallel ddp or --optimizer adamw",
    )
    prune_flags = sorted(n for n in given if n.startswith("adamwprune_"))
    _check(
        o.optimizer == "adamwprune" or not prune_flags,
        f"--{prune_flags[0].replace('_', '-') if prune_flags else ''} needs --optimizer adamwprune",
    )
    _check(
        cfg.dist.parallel != "fsdp" or (p.pruning_method == "none" and o.optimizer != "adamwprune"),
        "pruning needs whole weights for its masks and global threshold: use --parallel ddp, not fsdp",
    )
    if p.pruning_method == "none":
        extra = sorted(
            given
            & {
                "pruning_ramp_end",
                "pruning_frequency",
                "pruning_schedule",
                "prune_embeddings",
                "pruning_threshold_sample",
            }
        )
        _check(not extra, f"--{extra[0].replace('_', '-') if extra else ''} needs --pruning-method")
        return
    _check(
        p.pruning_ramp_end is not None,
        "--num-epochs with pruning needs --pruning-ramp-end (the step count is known only once the data is)",
    )
    _check(
        p.pruning_warmup < p.pruning_ramp_end,
        f"--pruning-warmup ({p.pruning_warmup}) must be below the pruning ramp end ({p.pruning_ramp_end}); "
        "lower --pruning-warmup or raise --pruning-ramp-end",
    )
    _check(
        t.num_epochs is not None or p.pruning_ramp_end < t.max_iters,
        f"--pruning-ramp-end ({p.pruning_ramp_end}) must be below --max-iters ({t.max_iters}): iterations "
        f"count from 0, so the last is {t.max_iters - 1}, and the target sparsity would never be reached",
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def slurm_extra(text: str | None) -> dict[str, str]:
    """``"qos=high; constraint=h100"`` (repeated --slurm-extra) -> sbatch options ``{key: value}``."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in (text or "").split(";")):
        if part:
            key, eq, value = part.partition("=")
            _check(bool(eq) and bool(key.strip()), f"--slurm-extra {part!r}: write KEY=VALUE")
            out[key.strip().lstrip("-")] = value.strip()
    return out


def _validate_launcher(cfg: RunConfig) -> None:
    """Launcher settings belong to an ablation, and SLURM's to the SLURM launcher."""
    given = [f.name for f in fields(LauncherSection) if f.name in cfg.explicit]
    flag = lambda name: "--" + name.replace("_", "-")
    _check(
        not given or cfg.ablation.ablation_mode or bool(cfg.ablation.ablate),
        f"{flag(given[0]) if given else ''} launches ablation runs: give --ablate or --ablation-mode",
    )
    launcher = cfg.launcher
    slurm_only = [n for n in given if n.startswith("slurm_")]
    _check(
        launcher.launcher == "slurm" or not slurm_only,
        f"{flag(slurm_only[0]) if slurm_only else ''} needs --launcher slurm",
    )
    _check(
        launcher.launcher == "local" or launcher.ablation_workers == 1,
        "--ablation-workers is for --launcher local (SLURM runs as many jobs as it has room for)",
    )
    slurm_extra(launcher.slurm_extra)


def _validate_ra(cfg: RunConfig) -> None:
    """Unified RA and ablation flags; step names come from the V-step registry."""
    m, a = cfg.model, cfg.ablation
    if m.architecture != "unified-ra":
        _check("ra_gates" not in cfg.explicit, "--ra-gates needs --architecture unified-ra")
        _check(not a.ablation_mode, "--ablation-mode needs --architecture unified-ra")
        gate = sorted(k for k in cfg.explicit if k.startswith("gate_") or k == "kv_gather")
        _check(not gate, f"--{gate[0].replace('_', '-') if gate else ''} needs --architecture unified-ra")
    _check(
        a.ablation_mode or a.ablate or a.ablation_seeds == 1,
        "--ablation-seeds needs --ablation-mode or --ablate",
    )
    seq = [k for k in ("max_seeds", "min_effect", "decide_on") if k in cfg.explicit]
    _check(
        a.ablation_mode or a.ablate or not seq,
        f"--{seq[0].replace('_', '-') if seq else ''} needs --ablation-mode or --ablate",
    )
    _check(
        a.ablation_seeds == 0 or "max_seeds" not in cfg.explicit, "--max-seeds needs --ablation-seeds auto"
    )
    _check(not (a.ablation_mode and a.ablate), "give --ablate or --ablation-mode, not both")
    _validate_launcher(cfg)
    if a.ablate:
        axes = ablation_axes(a.ablate)
        _check(
            cfg.output.resume in (None, "auto"), "--ablate resumes each arm: give --resume auto or nothing"
        )
        clash = sorted({k for k, _ in axes} & set(cfg.explicit))
        _check(not clash, f"--{clash[0].replace('_', '-') if clash else ''} is ablated: drop the flag")
    if a.ablation_mode:
        _check("ra_step" not in cfg.explicit, "--ablation-mode runs --ablation-steps; drop --ra-step")
        _check(
            cfg.output.resume in (None, "auto"),
            "--ablation-mode resumes each step from its own folder: give --resume auto or nothing",
        )
    if not a.ablation_mode and m.ra_step is None:
        return
    flag = "--ablation-steps" if a.ablation_mode else "--ra-step"
    try:
        for step in parse_steps(a.ablation_steps or "") if a.ablation_mode else [get_step(m.ra_step).name]:
            try:
                cfg.gpt_config(step).validate()
            except ValueError as e:
                raise ValueError(f"step {step} does not fit this model: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None


def _validate_task(cfg: RunConfig) -> None:
    """A synthetic task's parameters, and the task flags given for a text corpus."""
    d, params = cfg.data, cfg.task_params
    given = sorted(k for k in cfg.explicit if k.startswith(("task_", "mqar_")))
    if params is None:
        _check(not given, f"--{given[0].replace('_', '-') if given else ''} needs a synthetic --dataset")
        vocab = cfg.model.vocab_size
        _check(vocab is None or vocab >= 50257, f"--vocab-size {vocab}: GPT-2 text needs at least 50257")
        return
    mqar = sorted(k for k in given if k.startswith("mqar_"))
    _check(
        d.dataset == "mqar" or not mqar, f"--{mqar[0].replace('_', '-') if mqar else ''} needs --dataset mqar"
    )
    problem = TASKS[d.dataset].problem(params)
    _check(problem is None, f"--dataset {d.dataset}: {problem}")
    vocab = cfg.model.vocab_size
    _check(
        vocab is None or vocab >= params.vocab_size,
        f"--vocab-size {vocab} is smaller than --task-vocab-size {params.vocab_size}",
    )


def validate(cfg: RunConfig) -> None:
    """Check every value and combination; cheap (no model, no data). Raises :class:`ConfigError`."""
    m, d, o, p, t, out = cfg.model, cfg.data, cfg.optim, cfg.pruning, cfg.train, cfg.output
    for sec in SECTIONS:  # each field's own choices and rule, for the command line and every other caller
        for f in fields(getattr(cfg, sec)):
            value, choices = getattr(getattr(cfg, sec), f.name), f.metadata.get("choices")
            flag = "--" + f.name.replace("_", "-")
            if choices is not None and value is not None and value not in choices:
                raise ConfigError(f"{flag}: {value!r} is not one of {', '.join(map(str, choices))}")
            if "rule" in f.metadata:
                f.metadata["rule"].check(flag, value)
    try:  # the shapes; the V-step is _validate_ra's
        cfg.gpt_config(VANILLA_STEP).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _validate_task(cfg)
    for task in cfg.eval_tasks:
        _check(Path(task).exists(), f"--eval-task {task}: no such file or folder")
    _check(
        not (cfg.eval_tasks and cfg.task_params),
        "--eval-task scores GPT-2 text; a synthetic --dataset has its own accuracy",
    )
    if d.dataset not in KNOWN_DATASETS:
        _check(
            Path(d.dataset).exists(),
            f"unknown --dataset {d.dataset!r}: use one of {', '.join(KNOWN_DATASETS)} "
            "or the path of a text file or folder",
        )
    _check(0 <= o.min_lr <= o.learning_rate, f"--min-lr must be in [0, learning rate], got {o.min_lr}")
    _check(
        o.spam_interval >= 0 and o.spam_warmup_steps >= 0, "--spam-interval/--spam-warmup-steps must be >= 0"
    )
    _check(
        not (t.num_epochs is not None and "max_iters" in cfg.explicit),
        "give --num-epochs or --max-iters, not both",
    )
    _check(
        "eval_budget" not in cfg.explicit or t.max_time > 0,
        "--eval-budget caps evaluation under --max-time: give --max-time too",
    )
    for name in ("log_interval", "eval_interval", "eval_samples"):
        _check(getattr(t, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(t, name)}")
    _check(
        out.checkpoint_interval > 0, f"--checkpoint-interval must be positive, got {out.checkpoint_interval}"
    )
    _check(
        t.device == "auto" or t.device == "cpu" or t.device.startswith(("cuda", "mps")),
        f"unknown --device {t.device!r}: use auto, cpu, cuda or cuda:N",
    )
    _check(
        not (t.dtype == "float16" and t.device == "cpu"),
        "--dtype float16 needs CUDA; use float32 or bfloat16 on CPU",
    )
    _check(
        out.resume is not None
        or out.overwrite
        or t.dry_run
        or cfg.ablation.ablation_mode
        or cfg.ablation.ablate is not None
        or not (Path(out.output_dir) / "checkpoint_last.pt").exists(),
        f"--output-dir {out.output_dir} holds another run's checkpoint: pass --resume auto to continue it "
        "or --overwrite to start afresh",
    )
    if out.resume not in (None, "auto"):
        _check(Path(out.resume).is_file(), f"--resume: no checkpoint file at {out.resume}")

    trackers = [x.strip() for x in cfg.track.tracker.split(",") if x.strip()]
    for name in trackers:
        _check(name in TRACKERS, f"unknown --tracker {name!r}: use none, wandb, trackio or a comma list")

    _check(m.compile or "compile_mode" not in cfg.explicit, "--compile-mode needs --compile")
    # Architecture-specific flags must not be silently ignored.
    if m.architecture == "vanilla":
        _check(m.ra_step is None, "--ra-step needs --architecture unified-ra")
    _check(
        cfg.ablation.ablation_mode or cfg.ablation.ablation_steps is None,
        "--ablation-steps needs --ablation-mode",
    )
    _validate_ra(cfg)
    warnings: list[str] = []  # accepted settings whose effect deserves a line
    _validate_optim_pruning(cfg, warnings)
    cfg.warnings = tuple(warnings)
    _check(
        not (p.pruning_method == "state" and o.optimizer != "adamwprune"),
        "--pruning-method state needs --optimizer adamwprune (it prunes from the optimizer's state)",
    )
    _check(
        not (o.optimizer == "adamwprune" and p.pruning_method not in ("state", "none")),
        "--optimizer adamwprune prunes by its own state: use --pruning-method state (or none)",
    )
