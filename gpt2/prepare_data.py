"""Prepare a dataset: ``python gpt2/prepare_data.py --dataset NAME`` (or ``python -m gpt2.prepare_data``).

Writes ``<data-dir>/<dataset>/train.bin``, ``val.bin`` and ``meta.json``; see :mod:`gpt2.data.prepare`.
"""

from __future__ import annotations

import sys

try:
    import gpt2  # noqa: F401
except ModuleNotFoundError:  # run by its path, python gpt2/prepare_data.py
    import _as_script  # noqa: F401

import argparse

from gpt2.data.prepare import DATASETS, DEFAULT_DATA_DIR, prepare


def _count(text: str) -> int:
    """Token counts as 100000, 1e8 or 100_000_000."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    datasets = "; ".join(f"{d.name}: {d.description}" for d in DATASETS.values())
    p = argparse.ArgumentParser(
        prog="prepare_data.py",
        description="Tokenize a corpus (GPT-2 BPE) into train.bin / val.bin for training.",
    )
    p.add_argument(
        "--dataset", default="shakespeare", help=f"a name ({datasets}) or the path of a text file or folder"
    )
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="where prepared datasets live (%(default)s)")
    p.add_argument(
        "--max-tokens", type=_count, default=None, help="cap on the token stream (default: all; web: 100M)"
    )
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of tokens for val (%(default)s)")
    p.add_argument("--num-proc", type=int, default=None, help="tokenizer processes (default: available CPUs)")
    p.add_argument(
        "--source", default=None, help="local .jsonl/.json/.parquet records (a 'text' field) of a web dataset"
    )
    p.add_argument("--force", action="store_true", help="prepare again even if already prepared")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse flags and prepare; a UserError is one line on stderr and its exit code."""
    from gpt2.cli import main_guard

    args = build_parser().parse_args(argv)

    def run() -> None:
        out = prepare(
            args.dataset,
            args.data_dir,
            max_tokens=args.max_tokens,
            val_fraction=args.val_fraction,
            num_proc=args.num_proc,
            progress=not args.quiet,
            force=args.force,
            source=args.source,
        )
        if not args.quiet:
            print(out)

    return main_guard(run)


if __name__ == "__main__":
    sys.exit(main())
