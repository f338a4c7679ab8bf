"""Fingerprint the final weights and optimizer state of a set of short tiny CPU runs.

Run it on two versions of the code and compare the outputs to show that a refactor changed no
training arithmetic (bitwise, on the same machine). Every case is 24 steps of the tiny preset
on the bundled corpus, fp32, with evaluations and a checkpoint at step 12:

    .venv/bin/python scripts/weights_fingerprint.py --out /tmp/after.json [CASE ...]
    REPO=/path/to/other/checkout .venv/bin/python scripts/weights_fingerprint.py --out /tmp/before.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, os.environ.get("REPO", str(Path(__file__).resolve().parent.parent)))

import torch

from gpt2.config import resolve
from gpt2.trainer.run import train_once

BASE = dict(
    model_name="tiny", max_iters=24, eval_interval=8, eval_samples=2, log_interval=4, device="cpu",
    dtype="float32", quiet=True, sample_tokens=0, save_checkpoint=True, checkpoint_interval=12,
    warmup_steps=4, optimizer="adamw", learning_rate=2e-3,  # stated: the tiny preset's own is Muon at 8e-3
)  # fmt: skip
PRUNE = dict(pruning_warmup=4, pruning_ramp_end=20, pruning_frequency=4, target_sparsity=0.5)
STATE = dict(pruning_method="state", optimizer="adamwprune", **PRUNE)
SPAM = dict(spam_interval=10, spam_warmup_steps=3, spam_enable_clip=True)
CASES: dict[str, dict[str, Any]] = {
    "vanilla": {},
    "accum2": dict(gradient_accumulation=2, batch_size=4),
    "V1": dict(architecture="unified-ra", ra_step="V1"),
    "V1-layergates": dict(architecture="unified-ra", ra_step="V1", ra_gates="per-layer"),
    "V2": dict(architecture="unified-ra", ra_step="V2"),
    "V6": dict(architecture="unified-ra", ra_step="V6"),
    "V10": dict(architecture="unified-ra", ra_step="V10"),
    "magnitude": dict(pruning_method="magnitude", **PRUNE),
    "movement": dict(pruning_method="movement", **PRUNE),
    "movement-emb": dict(pruning_method="movement", prune_embeddings=True, **PRUNE),
    "bitter7": dict(adamwprune_variant="bitter7", **STATE),
    "bitter4": dict(adamwprune_variant="bitter4", **STATE),
    "bitter8-emb": dict(adamwprune_variant="bitter8", prune_embeddings=True, **STATE),
    "bitter0-spam": dict(
        adamwprune_variant="bitter0", adamwprune_base_optimizer_name="adamwspam", **SPAM, **STATE
    ),
    "spam": dict(optimizer="adamwspam", **SPAM),
    "magnitude-sgd": dict(pruning_method="magnitude", optimizer="sgd", **PRUNE),
    "dropout-V3": dict(architecture="unified-ra", ra_step="V3", dropout=0.1),
}


def digest(obj: Any) -> str:
    """SHA-256 (16 hex digits) over every tensor's bytes and every other value, in key order."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            h.update(repr(x).encode())

    walk(obj)
    return h.hexdigest()[:16]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cases", nargs="*", help=f"default: all of {', '.join(CASES)}")
    p.add_argument("--out", help="also write the fingerprints here as JSON")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fingerprint-"))
    out: dict[str, Any] = {}
    for name in args.cases or list(CASES):
        cfg = resolve({**BASE, **CASES[name], "output_dir": str(work / name)})
        with contextlib.redirect_stdout(io.StringIO()):
            results = train_once(cfg)
        state = torch.load(work / name / "checkpoint_last.pt", weights_only=True)
        out[name] = dict(
            model=digest(state["model"]),
            optimizer_state=digest(state["optimizer"]["state"]),
            val_loss=results["final_val_loss"],
        )
        print(name, out[name], flush=True)
    shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
