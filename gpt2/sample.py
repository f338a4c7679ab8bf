"""Sample text from a checkpoint: ``python -m gpt2.sample --checkpoint output/checkpoint_last.pt``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import gpt2  # noqa: F401
except ModuleNotFoundError:  # run by its path, python gpt2/sample.py
    import _as_script  # noqa: F401

import torch
from torch import nn


def generate_text(
    model: nn.Module,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int = 0,
) -> str:
    """Continue ``prompt`` (or a fresh document after <|endoftext|> when empty); returns the new text."""
    from gpt2 import faults
    from gpt2.data.tokenizer import EOT_TOKEN, get_encoding

    enc = get_encoding()
    device = next(model.parameters()).device
    ids = enc.encode_ordinary(prompt) if prompt else [EOT_TOKEN]
    x = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    faults.point("sample")
    try:
        out = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    finally:
        model.train(was_training)
    return enc.decode([t for t in out[0].tolist()[len(ids) :] if t < enc.n_vocab])


def main(argv: list[str] | None = None) -> int:
    from gpt2.cli import main_guard

    p = argparse.ArgumentParser(prog="sample", description="Print text sampled from a trained checkpoint.")
    p.add_argument("--checkpoint", default="output/checkpoint_last.pt", help="checkpoint file")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.num_samples < 1 or args.temperature < 0 or args.top_k < 0:
        p.error("--max-new-tokens and --num-samples must be positive, --temperature and --top-k >= 0")
    return main_guard(_sample, args)


def _sample(args: argparse.Namespace) -> int:
    from gpt2.checkpoint_file import load
    from gpt2.model import GPT, GPTConfig
    from gpt2.runtime import configure_process, resolve_device

    configure_process()
    state = load(Path(args.checkpoint))
    model = GPT(GPTConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    model.to(resolve_device(args.device))
    for i in range(args.num_samples):
        text = generate_text(
            model,
            args.prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            seed=args.seed + i,
        )
        print(args.prompt + text)
        if i + 1 < args.num_samples:
            print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
