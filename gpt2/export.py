"""Hugging Face in and out: ``python -m gpt2.export CHECKPOINT --out DIR`` writes a transformers
GPT-2 directory; :func:`load_hf_weights` (``--init-from DIR``) starts training from one.

The model is GPT-2 (pre-LN blocks, exact GELU, tied head, learned positions), so the export is
exact: ``GPT2LMHeadModel.from_pretrained(DIR)`` gives this project's logits to float rounding
(tested to 1e-5 in fp32), and export then import gives bitwise the same weights. Mechanisms with
a standard equivalent are folded into the standard weights: Unified RA's gates (and a gate
schedule's coupling) into the query rows of ``c_attn``, the R-MLP's split, gates and mixer into
``c_fc`` and ``c_proj``. Self-restart and KV pruning have none and are refused. Pruned weights
export with their zeros; ``config.json`` records the sparsity and where the weights came from.

transformers' ``Conv1D`` stores weights as (in, out), the transpose of ``nn.Linear``'s; a model
without biases exports zero biases.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

try:
    import gpt2  # noqa: F401
except ModuleNotFoundError:  # run by its path, python gpt2/export.py
    import _as_script  # noqa: F401

import torch
from torch import nn

from gpt2.errors import UserError

EOT = 50256


def _refusal(config: Any) -> str | None:
    """Why a model has no exact GPT-2 equivalent (None: it has one)."""
    if getattr(config, "self_restart", False):
        return "self-restart (out = (1 - a)·attention + a·V per head) has no GPT-2 equivalent"
    if config.attention in ("kv_pruned", "v_pruned"):
        return f"KV pruning attention ({config.attention}) has no GPT-2 equivalent"
    return None


@torch.no_grad()
def gpt2_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights as a transformers ``GPT2LMHeadModel`` state dict (mechanisms folded)."""
    from gpt2.model.attention import UnifiedRAttention
    from gpt2.model.mlp import ReciprocalMLP

    config = model.config
    why = _refusal(config)
    if why:
        raise UserError(f"cannot export to GPT-2: {why}")
    C = config.n_embd

    def linear(prefix: str, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        b = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias
        return {f"{prefix}.weight": weight.t().contiguous(), f"{prefix}.bias": b.contiguous()}

    def norm(prefix: str, ln: nn.LayerNorm) -> dict[str, torch.Tensor]:
        b = torch.zeros_like(ln.weight) if ln.bias is None else ln.bias
        return {f"{prefix}.weight": ln.weight.clone(), f"{prefix}.bias": b.clone()}

    t = model.transformer
    sd: dict[str, torch.Tensor] = {
        "transformer.wte.weight": t.wte.weight.clone(),
        "transformer.wpe.weight": t.wpe.weight.clone(),
    }
    for i, block in enumerate(t.h):
        p = f"transformer.h.{i}"
        attn, mlp = block.attn, block.mlp
        w, b = attn.c_attn.weight.clone(), None if attn.c_attn.bias is None else attn.c_attn.bias.clone()
        if isinstance(attn, UnifiedRAttention):  # the gates scale the query rows (Qf), exactly
            scale = attn.query_scale().detach()
            w[:C] *= scale[:, None]
            if b is not None:
                b[:C] *= scale
        sd |= norm(f"{p}.ln_1", block.ln_1) | linear(f"{p}.attn.c_attn", w, b)
        sd |= linear(f"{p}.attn.c_proj", attn.c_proj.weight, attn.c_proj.bias) | norm(f"{p}.ln_2", block.ln_2)
        if isinstance(mlp, ReciprocalMLP):
            up_w, up_b, down_w, down_b = mlp.folded()
            sd |= linear(f"{p}.mlp.c_fc", up_w, up_b) | linear(f"{p}.mlp.c_proj", down_w, down_b)
        else:
            sd |= linear(f"{p}.mlp.c_fc", mlp.c_fc.weight, mlp.c_fc.bias)
            sd |= linear(f"{p}.mlp.c_proj", mlp.c_proj.weight, mlp.c_proj.bias)
    sd |= norm("transformer.ln_f", t.ln_f)
    sd["lm_head.weight"] = model.lm_head.weight.clone()
    return {k: v.detach().float().contiguous() for k, v in sd.items()}


def hf_config(config: Any, **extra: Any) -> Any:
    """The transformers ``GPT2Config`` of a :class:`~gpt2.model.config.GPTConfig` (exact GELU)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.mlp_width,
        activation_function="gelu",  # exact erf GELU, as nn.GELU(); GPT-2's own "gelu_new" is tanh
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=1e-5,
        bos_token_id=EOT,
        eos_token_id=EOT,
        tie_word_embeddings=True,
        **extra,
    )


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros in the blocks' 2-D weights (what pruning masks)."""
    weights = [p for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]
    total = sum(p.numel() for p in weights)
    return sum(int((p == 0).sum()) for p in weights) / total if total else 0.0


def save_tokenizer(out: Path) -> None:
    """GPT-2's tokenizer files, from the bundled BPE (encoder.json, vocab.bpe), for AutoTokenizer."""
    from transformers import GPT2TokenizerFast

    from gpt2.data.tokenizer import bpe_files

    vocab, encoder = bpe_files()
    tok = GPT2TokenizerFast(vocab=str(encoder), merges=str(vocab), model_max_length=None)
    tok.add_special_tokens(
        {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    )
    tok.save_pretrained(out)


def export(checkpoint_path: Path, out: Path) -> dict[str, Any]:
    """Write the transformers directory of a checkpoint; returns what config.json records."""
    from transformers import GPT2LMHeadModel

    from gpt2.checkpoint_file import load
    from gpt2.model import GPT, GPTConfig

    state = load(checkpoint_path)
    config = GPTConfig.from_dict(state["model_config"])
    why = _refusal(config)
    if why:
        raise UserError(f"cannot export {checkpoint_path} to GPT-2: {why}")
    model = GPT(config)
    model.load_state_dict(state["model"])
    record = {
        "gpt2_source": {
            "checkpoint": str(checkpoint_path),
            "step": int(state.get("step", 0)),
            "attention": config.attention,
            "mlp": config.mlp,
        },
        "gpt2_sparsity": sparsity(model),
    }
    hf = GPT2LMHeadModel(hf_config(config, **record))
    missing, unexpected = hf.load_state_dict(gpt2_state_dict(model), strict=False)
    missing = [k for k in missing if not k.endswith(".attn.bias") and not k.endswith("masked_bias")]
    if missing or unexpected:
        raise UserError(f"export mapping incomplete: missing {missing}, unexpected {unexpected}")
    out.mkdir(parents=True, exist_ok=True)
    hf.generation_config.bos_token_id = hf.generation_config.eos_token_id = EOT
    hf.generation_config.pad_token_id = EOT
    hf.save_pretrained(out, safe_serialization=True)
    save_tokenizer(out)
    return record


# ------------------------------------------------------------------------------------ import


def load_hf_weights(model: nn.Module, directory: str | Path) -> None:
    """Load a local transformers GPT-2 directory into ``model`` (standard attention and MLP, the
    same shapes); any mismatch is one :class:`UserError` line naming it."""
    from safetensors.torch import load_file

    directory = Path(directory)
    where = f"--init-from {directory}"
    cfg_path, weights = directory / "config.json", directory / "model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise UserError(f"{where}: not a transformers directory (needs config.json and model.safetensors)")
    hf = json.loads(cfg_path.read_text())
    c = model.config
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{where}: model_type {hf.get('model_type')!r}, expected gpt2")
    if c.attention != "standard" or c.mlp != "standard":
        raise UserError(f"{where}: loads into standard GPT-2 blocks; this run builds {c.attention}/{c.mlp}")
    if hf.get("tie_word_embeddings", True) is False:
        raise UserError(f"{where}: an untied lm_head; this model ties it to the token embedding")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("layer_norm_epsilon", 1e-5) != 1e-5:
        raise UserError(
            f"{where}: attention scaled by layer index or LayerNorm eps != 1e-5, which this model lacks"
        )
    act = hf.get("activation_function", "gelu_new")
    if act != "gelu":
        raise UserError(f"{where}: activation {act!r}, but this model computes exact GELU ('gelu')")
    hf_shape = {
        "n_layer": hf.get("n_layer"),
        "n_head": hf.get("n_head"),
        "n_embd": hf.get("n_embd"),
        "vocab_size": hf.get("vocab_size"),
        "n_inner": hf.get("n_inner") or 4 * hf.get("n_embd", 0),
    }
    ours_shape = {
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_embd": c.n_embd,
        "vocab_size": c.vocab_size,
        "n_inner": c.mlp_width,
    }
    diff = [f"{k} {hf_shape[k]} (this run: {v})" for k, v in ours_shape.items() if hf_shape[k] != v]
    if hf.get("n_positions", 0) < c.block_size:
        diff.append(f"n_positions {hf.get('n_positions')} (this run's block: {c.block_size})")
    if diff:
        raise UserError(f"{where}: shapes differ: {', '.join(diff)}")
    sd = load_file(str(weights))
    params = dict(model.named_parameters())
    loaded: dict[str, torch.Tensor] = {}
    for name in params:
        key = "transformer.wte.weight" if name == "lm_head.weight" else name  # (tied)
        if key not in sd:
            raise UserError(f"{where}: {key} is missing")
        tensor = sd[key]
        if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            tensor = tensor.t()  # Conv1D (in, out) -> Linear (out, in)
        loaded[name] = tensor[: c.block_size] if name == "transformer.wpe.weight" else tensor
    buffers = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers saves
    for name in [k for k in sd if k.endswith(".bias") and k not in params and not k.endswith(buffers)]:
        if torch.count_nonzero(sd[name]):
            raise UserError(f"{where}: {name} is not zero, but this run has no biases (drop --no-bias)")
    with torch.no_grad():
        for name, tensor in loaded.items():
            params[name].copy_(tensor.to(params[name].dtype))


def main(argv: list[str] | None = None) -> int:
    from gpt2.cli import main_guard

    p = argparse.ArgumentParser(
        prog="export", description="Write a checkpoint as a transformers GPT-2 directory."
    )
    p.add_argument(
        "checkpoint", type=Path, help="a checkpoint file (checkpoint_last.pt, checkpoint_best.pt, ...)"
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the directory to write (config.json, model.safetensors, tokenizer)",
    )
    args = p.parse_args(argv)

    def run() -> int:
        record = export(args.checkpoint, args.out)
        print(
            f"exported {args.checkpoint} -> {args.out} (sparsity {record['gpt2_sparsity']:.3f}); "
            f"load it with GPT2LMHeadModel.from_pretrained({str(args.out)!r})"
        )
        return 0

    return main_guard(run)


if __name__ == "__main__":
    sys.exit(main())
