"""Corpus preparation: format, split, completion marker, sources, and the command line."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2.data import prepare as prep
from gpt2.data.prepare import (
    DATASETS,
    FORMAT_VERSION,
    dataset_dir,
    ensure_prepared,
    is_prepared,
    prepare,
    shakespeare_texts_dir,
)
from gpt2.data.tokenizer import EOT_TOKEN, decode, encode
from gpt2.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[2]
EOT = "<|endoftext|>"
DOCS = {  # relative path -> text, in the sorted order preparation reads them
    "a.txt": "First document. " * 40,
    "c.md": "Ünïcödé — 日本語 😀 and some <|endoftext|> text that is only text. " * 10,
    "sub/b.txt": "Third, in a subfolder.\n" * 30,
}


def tokens(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype="<u2")


def expected_stream(texts) -> list[int]:
    out: list[int] = []
    for text in texts:
        out += [*encode(text), EOT_TOKEN]
    return out


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    for rel, text in DOCS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "notes.csv").write_text("not,a,document\n")  # neither .txt nor .md: ignored
    return root


@pytest.fixture
def prepared(corpus, tmp_path) -> Path:
    return prepare(str(corpus), tmp_path / "data", progress=False)


# --------------------------------------------------------------------------- format and split


def test_bins_round_trip_with_eot_after_every_document(prepared):
    stream = np.concatenate([tokens(prepared / "train.bin"), tokens(prepared / "val.bin")])
    assert stream.tolist() == expected_stream(DOCS.values())
    assert decode(stream) == EOT.join(DOCS.values()) + EOT
    assert int((stream == EOT_TOKEN).sum()) == len(DOCS)  # the literal "<|endoftext|>" in c.md is text


def test_split_is_first_ninety_percent_train(prepared):
    n_train, n_val = len(tokens(prepared / "train.bin")), len(tokens(prepared / "val.bin"))
    total = len(expected_stream(DOCS.values()))
    assert n_train + n_val == total
    assert abs(n_val - 0.1 * total) <= 1
    assert (prepared / "train.bin").stat().st_size == 2 * n_train  # uint16


def test_meta_json_describes_the_bins(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    total = len(expected_stream(DOCS.values()))
    assert meta["format_version"] == FORMAT_VERSION
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("gpt2", 50257, 50256)
    assert meta["dtype"] == "uint16"
    assert meta["dataset"] == "corpus" and "corpus" in meta["source"]
    assert meta["num_documents"] == len(DOCS)
    assert meta["total_tokens"] == total
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == total
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert info["bytes"] == (prepared / f"{split}.bin").stat().st_size == 2 * info["tokens"]
        assert len(info["sha256"]) == 64
    assert meta["created_at"].startswith("20")


def test_max_tokens_caps_the_stream(corpus, tmp_path):
    out = prepare(str(corpus), tmp_path / "data", max_tokens=100, progress=False)
    stream = np.concatenate([tokens(out / "train.bin"), tokens(out / "val.bin")])
    assert stream.tolist() == expected_stream(DOCS.values())[:100]
    assert json.loads((out / "meta.json").read_text())["total_tokens"] == 100


def test_pool_tokenization_gives_the_same_tokens(corpus, tmp_path, monkeypatch):
    serial = prepare(str(corpus), tmp_path / "serial", progress=False, num_proc=1)
    monkeypatch.setattr(prep, "_POOL_AFTER_CHARS", 1)  # switch to the process pool after the first batch
    monkeypatch.setattr(prep, "_BATCH_DOCS", 1)
    pooled = prepare(str(corpus), tmp_path / "pooled", progress=False, num_proc=2)
    for split in ("train", "val"):
        assert tokens(pooled / f"{split}.bin").tolist() == tokens(serial / f"{split}.bin").tolist()


# --------------------------------------------------------------------------- idempotence and crash safety


def test_second_call_does_no_work(prepared, corpus, tmp_path, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}

    def must_not_run(*args, **kwargs):
        raise AssertionError("prepared twice")

    monkeypatch.setattr(prep, "_write_dataset", must_not_run)
    assert prepare(str(corpus), tmp_path / "data", progress=False) == prepared
    assert {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()} == before


def test_force_and_changed_settings_prepare_again(prepared, corpus, tmp_path):
    prepare(str(corpus), tmp_path / "data", val_fraction=0.5, progress=False)
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["val_fraction"] == 0.5
    assert abs(meta["splits"]["val"]["tokens"] - meta["total_tokens"] / 2) <= 1
    created = (prepared / "meta.json").stat().st_mtime_ns
    time.sleep(0.01)
    prepare(str(corpus), tmp_path / "data", val_fraction=0.5, force=True, progress=False)
    assert (prepared / "meta.json").stat().st_mtime_ns > created


def test_leftover_tmp_file_is_not_taken_as_prepared(corpus, tmp_path):
    out = dataset_dir(str(corpus), tmp_path / "data")
    out.mkdir(parents=True)
    (out / "train.bin.tmp").write_bytes(b"\x01\x00" * 10)
    assert not is_prepared(out)
    prepare(str(corpus), tmp_path / "data", progress=False)
    assert is_prepared(out) and not (out / "train.bin.tmp").exists()


def test_bins_without_meta_are_redone(corpus, tmp_path):
    out = dataset_dir(str(corpus), tmp_path / "data")
    out.mkdir(parents=True)
    for split in ("train", "val"):
        np.arange(500, dtype="<u2").tofile(out / f"{split}.bin")  # an interrupted run's stale output
    assert not is_prepared(out)
    prepare(str(corpus), tmp_path / "data", progress=False)
    stream = np.concatenate([tokens(out / "train.bin"), tokens(out / "val.bin")])
    assert stream.tolist() == expected_stream(DOCS.values())


def test_bin_size_mismatch_is_not_prepared(prepared):
    with open(prepared / "val.bin", "ab") as f:
        f.write(b"\x00\x00")
    assert not is_prepared(prepared)


def test_other_format_version_is_not_prepared(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (prepared / "meta.json").write_text(json.dumps(meta))
    assert not is_prepared(prepared)


def test_crash_mid_run_leaves_no_completion_marker(prepared, corpus, tmp_path, monkeypatch):
    def crash(docs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_encode_documents", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(corpus), tmp_path / "data", force=True, progress=False)
    assert not is_prepared(prepared)
    assert not (prepared / "meta.json").exists()
    assert not (prepared / "train.bin.tmp").exists()
    monkeypatch.undo()
    prepare(str(corpus), tmp_path / "data", progress=False)
    assert is_prepared(prepared)


# --------------------------------------------------------------------------- refusals


def test_empty_corpus_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    with pytest.raises(UserError, match="no text"):
        prepare(str(empty), tmp_path / "data", progress=False)
    assert not is_prepared(dataset_dir(str(empty), tmp_path / "data"))


def test_folder_without_text_files_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"no \.txt or \.md files"):
        prepare(str(tmp_path / "src"), tmp_path / "data", progress=False)


def test_too_few_tokens_for_a_val_split_is_refused(tmp_path):
    (tmp_path / "tiny.txt").write_text("Hi")  # "Hi" + <|endoftext|>: 2 tokens, val would get none
    with pytest.raises(UserError, match="too few"):
        prepare(str(tmp_path / "tiny.txt"), tmp_path / "data", progress=False)


@pytest.mark.parametrize("kwargs", [{"val_fraction": 0.0}, {"val_fraction": 1.0}, {"max_tokens": 1}])
def test_bad_settings_are_config_errors(corpus, tmp_path, kwargs):
    with pytest.raises(ConfigError):
        prepare(str(corpus), tmp_path / "data", progress=False, **kwargs)


def test_source_only_for_web_datasets(corpus, tmp_path):
    with pytest.raises(ConfigError, match="--source"):
        prepare("shakespeare", tmp_path / "data", source=str(corpus), progress=False)


# --------------------------------------------------------------------------- where datasets live


def test_dataset_dir(corpus, tmp_path):
    data = tmp_path / "data"
    assert dataset_dir("shakespeare", data) == data / "shakespeare"
    local = dataset_dir(str(corpus), data)
    assert local.parent == data and local.name.startswith("local-corpus-") and len(local.name) == 21
    other = tmp_path / "elsewhere" / "corpus"
    other.mkdir(parents=True)
    assert dataset_dir(str(other), data) != local  # same basename, different path
    with pytest.raises(UserError, match="unknown dataset"):
        dataset_dir(str(tmp_path / "missing"), data)


def test_folder_of_existing_bins_is_used_as_is(tmp_path):
    nano = tmp_path / "nanogpt_shakespeare"  # nanoGPT layout: bins, no meta.json
    nano.mkdir()
    np.arange(300, dtype="<u2").tofile(nano / "train.bin")
    np.arange(100, dtype="<u2").tofile(nano / "val.bin")
    assert dataset_dir(str(nano), tmp_path / "data") == nano.resolve()
    assert ensure_prepared(str(nano), tmp_path / "data", block_size=64, progress=False) == nano.resolve()
    assert prepare(str(nano), tmp_path / "data", progress=False) == nano.resolve()
    assert tokens(nano / "val.bin").tolist() == list(range(100))  # never rewritten
    with pytest.raises(UserError, match="too few for block_size 100"):
        ensure_prepared(str(nano), tmp_path / "data", block_size=100, progress=False)


def test_ensure_prepared_prepares_local_corpora(corpus, tmp_path):
    out = ensure_prepared(str(corpus), tmp_path / "data", block_size=8, progress=False)
    assert is_prepared(out)


def test_ensure_prepared_checks_block_size(prepared, corpus, tmp_path):
    n_val = len(tokens(prepared / "val.bin"))
    with pytest.raises(UserError, match=rf"val\.bin has {n_val} tokens, too few for block_size {n_val}"):
        ensure_prepared(str(corpus), tmp_path / "data", block_size=n_val, progress=False)
    ensure_prepared(str(corpus), tmp_path / "data", block_size=n_val - 1, progress=False)


def test_ensure_prepared_never_downloads(tmp_path):
    with pytest.raises(UserError, match=r"python gpt2/prepare_data\.py --dataset finewebedu --data-dir"):
        ensure_prepared("finewebedu", tmp_path / "data", block_size=8, progress=False)


# --------------------------------------------------------------------------- shakespeare


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> Path:
    return prepare("shakespeare", tmp_path_factory.mktemp("data"), progress=False)


def test_shakespeare_is_the_full_corpus(shakespeare):
    meta = json.loads((shakespeare / "meta.json").read_text())
    assert meta["num_documents"] == 42
    assert 1_500_000 < meta["total_tokens"] < 1_650_000
    assert meta["prepare_seconds"] < 30  # about 1 s on 2 cores; catches a pathological slowdown
    first = sorted(shakespeare_texts_dir().glob("*_gut.txt"))[0].read_text()
    train = tokens(shakespeare / "train.bin")
    assert decode(train[:200]) == decode(encode(first)[:200])
    n_first = len(encode(first))
    assert train[n_first] == EOT_TOKEN and EOT_TOKEN not in train[:n_first]


def test_shakespeare_is_ready_for_training(shakespeare):
    assert ensure_prepared("shakespeare", shakespeare.parent, block_size=1024, progress=False) == shakespeare


# --------------------------------------------------------------------------- web datasets


def write_jsonl(path: Path, texts) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            record = {"text": text, "id": f"<urn:uuid:{i}>", "score": 3.1}  # fineweb-edu-like extra fields
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


WEB_TEXTS = [
    "The mitochondria is the powerhouse of the cell. " * 20,
    "Ünïcödé — 日本語の文章 😀, Ελληνικά, русский.\n" * 10,
    "Short one.",
]


def test_finewebedu_from_local_records(tmp_path):
    src = tmp_path / "sample.jsonl"
    write_jsonl(src, WEB_TEXTS)
    out = prepare("finewebedu", tmp_path / "data", source=str(src), progress=False)
    assert out == tmp_path / "data" / "finewebedu"
    stream = np.concatenate([tokens(out / "train.bin"), tokens(out / "val.bin")])
    assert stream.tolist() == expected_stream(WEB_TEXTS)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_documents"] == 3 and str(src) in meta["source"]


def test_records_folder_of_parquet_and_missing_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = tmp_path / "records"
    src.mkdir()
    pq.write_table(pa.table({"text": WEB_TEXTS[:2]}), src / "part-0.parquet")
    pq.write_table(pa.table({"text": WEB_TEXTS[2:]}), src / "part-1.parquet")
    out = prepare("openwebtext", tmp_path / "data", source=str(src), progress=False)
    stream = np.concatenate([tokens(out / "train.bin"), tokens(out / "val.bin")])
    assert stream.tolist() == expected_stream(WEB_TEXTS)

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"content": ["x" * 100]}), bad)
    with pytest.raises(UserError, match="no 'text' field"):
        prepare("finewebedu", tmp_path / "data2", source=str(bad), progress=False)


def run_script(*args: str, env: dict | None = None, module: bool = False) -> subprocess.CompletedProcess:
    entry = ["-m", "gpt2.prepare_data"] if module else ["gpt2/prepare_data.py"]
    return subprocess.run(
        [sys.executable, *entry, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "env",
    [
        {"HF_HUB_OFFLINE": "1"},
        # No offline flag, an endpoint that refuses connections: the probe alone must fail fast.
        {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
    ],
    ids=["offline-flag", "unreachable"],
)
def test_web_dataset_offline_fails_fast_and_says_what_to_do(tmp_path, env):
    start = time.monotonic()
    result = run_script("--dataset", "finewebedu", "--data-dir", str(tmp_path), env=env)
    assert time.monotonic() - start < 15
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Hugging Face Hub" in lines[0]
    assert "--source PATH" in lines[0] and "machine with internet" in lines[0]
    assert not (tmp_path / "finewebedu" / "meta.json").exists()


# --------------------------------------------------------------------------- command line


def test_script_prepares_a_local_folder_from_the_repo_root(corpus, tmp_path):
    args = ("--dataset", str(corpus), "--data-dir", str(tmp_path / "data"), "--val-fraction", "0.2")
    result = run_script(*args)
    assert result.returncode == 0, result.stderr
    out = Path(result.stdout.strip())
    assert out == dataset_dir(str(corpus), tmp_path / "data") and is_prepared(out)
    assert json.loads((out / "meta.json").read_text())["val_fraction"] == 0.2

    again = run_script(*args, "--quiet", module=True)
    assert again.returncode == 0 and again.stdout == "" and again.stderr == ""


def test_script_errors(tmp_path):
    bad_flag = run_script("--max-tokens", "lots")
    assert bad_flag.returncode == 2 and "--max-tokens" in bad_flag.stderr
    unknown = run_script("--dataset", str(tmp_path / "nope"), "--data-dir", str(tmp_path))
    assert unknown.returncode == 1
    assert unknown.stderr.count("\n") == 1 and "unknown dataset" in unknown.stderr


def test_registry_lists_the_three_datasets():
    assert set(DATASETS) == {"shakespeare", "finewebedu", "openwebtext"}
    assert all(d.description for d in DATASETS.values())
    assert DATASETS["finewebedu"].web and not DATASETS["shakespeare"].web
