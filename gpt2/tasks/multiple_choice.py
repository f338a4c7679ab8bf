"""Multiple-choice accuracy scored inside the training loop, equal to lm-eval-harness's numbers.

A task is a ``.jsonl`` file or a folder of them (read in name order), one item a line, in either
layout:

- HellaSwag's: ``{"activity_label", "ctx_a", "ctx_b", "endings", "label"}``, preprocessed exactly as
  lm-eval's ``hellaswag`` task (``lm_eval/tasks/hellaswag/utils.py``), so the scores equal that
  task's; or ``{"ctx", "endings", "label"}``, used as written;
- the bundled one (``evals/tiny_mc``): ``{"question", "choices", "answer"}``, as lm-eval's
  ``doc_to_text: "{{question}}"``, ``doc_to_choice: "{{choices}}"``, ``doc_to_target: "{{answer}}"``.

Each item becomes one request per choice, zero-shot, as lm-eval builds them for an ``hf`` GPT-2
model, so an exported checkpoint gets the same numbers from ``lm_eval`` (tested: per-choice
log-likelihoods to 1e-4, identical acc and acc_norm):

- request (``api/task.py`` ``construct_requests``): ``(context, " " + choice)``, the default
  ``target_delimiter``;
- tokens (``api/model.py`` ``TemplateLM.loglikelihood``, ``_encode_pair``): trailing whitespace of
  the context moves to the continuation; the continuation's ids are those of context + continuation
  after the context's own; an empty context is the prefix token ``<|endoftext|>``;
- scores (``models/huggingface.py`` ``_loglikelihood_tokens``): ``(context + continuation)[-(L+1):][:-1]``
  goes in (L the block size), and the continuation tokens' log-probabilities are summed;
- metrics (``api/task.py`` ``process_results``, ``api/metrics.py`` ``mean_stderr``): acc is the
  argmax of the sums, acc_norm the argmax of sum / len(choice), characters of the choice without the
  delimiter; the standard error is the sample standard deviation over items / sqrt(n).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt2.data.tokenizer import EOT_TOKEN, get_encoding
from gpt2.errors import UserError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
TARGET_DELIMITER = " "  # lm-eval's default, put between the context and each choice
_HELLASWAG_PARTS = ("activity_label", "ctx_a", "ctx_b")


@dataclass(frozen=True)
class Item:
    """One question: the context, the choices as scored (without the delimiter), the gold index."""

    context: str
    choices: tuple[str, ...]
    gold: int
    where: str  # "file:line", for messages


# ------------------------------------------------------------------------------------ loading


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``: WikiHow's " [title]" becomes ". ", other [tags] go."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def task_name(path: str | Path) -> str:
    """The name in metric keys (``mc_<name>_acc``): the file's stem or the folder's name, as an identifier."""
    path = Path(path)
    stem = path.name if path.is_dir() else path.stem
    return re.sub(r"[^0-9a-z]+", "_", stem.lower()).strip("_") or "task"


def task_files(path: str | Path) -> list[Path]:
    """The .jsonl files of a task: the file itself, or a folder's, in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise UserError(f"multiple-choice task {path}: the folder holds no .jsonl files")
        return files
    if not path.exists():
        raise UserError(f"multiple-choice task {path}: no such file or folder")
    if path.suffix != ".jsonl":
        raise UserError(f"multiple-choice task {path}: expected a .jsonl file or a folder of them")
    return [path]


def load_items(path: str | Path) -> list[Item]:
    """The items of a .jsonl file or a folder of them; a malformed line is a UserError naming it."""
    items = []
    for file in task_files(path):
        with open(file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{file}:{n}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: not valid JSON ({e.msg})") from None
                items.append(parse_item(record, where))
    if not items:
        raise UserError(f"multiple-choice task {path}: no items")
    return items


def parse_item(record: Any, where: str = "<item>") -> Item:
    """One item from a record of either layout (see the module's docstring)."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "question" in record or "choices" in record:
        _require(record, ("question", "choices", "answer"), where, "the question/choices/answer layout")
        context, choices = record["question"], record["choices"]
        _check_text(context, "question", where)
        _check_choices(choices, "choices", where)
        gold = _gold(record["answer"], choices, "answer", where)
        return Item(context, tuple(choices), gold, where)
    if "endings" in record:
        _check_choices(record["endings"], "endings", where)
        if any(k in record for k in _HELLASWAG_PARTS):  # lm-eval's hellaswag process_docs
            _require(record, (*_HELLASWAG_PARTS, "label"), where, "the HellaSwag layout")
            for k in _HELLASWAG_PARTS:
                _check_text(record[k], k, where)
            ctx = record["ctx_a"] + " " + record["ctx_b"].capitalize()
            context = hellaswag_preprocess(record["activity_label"] + ": " + ctx)
            choices = [hellaswag_preprocess(e) for e in record["endings"]]
        else:
            _require(record, ("ctx", "label"), where, "the HellaSwag layout")
            _check_text(record["ctx"], "ctx", where)
            context, choices = record["ctx"], record["endings"]
        gold = _gold(record["label"], choices, "label", where, by_text=False)
        return Item(context, tuple(choices), gold, where)
    raise UserError(
        f"{where}: not a multiple-choice item: expected question/choices/answer or "
        f"ctx (or activity_label/ctx_a/ctx_b)/endings/label, got keys {sorted(record)}"
    )


def _require(record: dict, keys: Sequence[str], where: str, layout: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise UserError(f"{where}: {layout} needs {', '.join(missing)}")


def _check_text(value: Any, key: str, where: str) -> None:
    if not isinstance(value, str):
        raise UserError(f"{where}: {key} must be a string, got {type(value).__name__}")


def _check_choices(value: Any, key: str, where: str) -> None:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise UserError(f"{where}: {key} must be a non-empty list of strings")


def _gold(value: Any, choices: list[str], key: str, where: str, by_text: bool = True) -> int:
    """The gold index as lm-eval reads ``doc_to_target``: digits are an index; other text, a choice."""
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str) and value.isascii() and value.isdecimal():
        index = int(value)
    elif by_text and isinstance(value, str) and value in choices:
        return choices.index(value)
    else:
        raise UserError(f"{where}: {key} {value!r} is neither a choice index nor one of the choices")
    if not 0 <= index < len(choices):
        raise UserError(f"{where}: {key} {index} is out of range for {len(choices)} choices")
    return index


# ------------------------------------------------------------------------------------ encoding


def _tokens(text: str) -> list[int]:
    # transformers' GPT-2 tokenizer reads "<|endoftext|>" in text as the special token; so do we
    return get_encoding().encode(text, allowed_special="all")


def encode_request(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's HFLM tokenizes a loglikelihood request for GPT-2."""
    if context == "":
        cont = _tokens(continuation)
        return ([EOT_TOKEN], cont) if not cont or cont[0] != EOT_TOKEN else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # "a " + "b" is scored as "a" + " b": BPE attaches the space to the next word
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = _tokens(context + continuation), _tokens(context)
    return ctx, whole[len(ctx) :]


@dataclass(frozen=True)
class EncodedTask:
    """A task's requests, tokenized once and packed. Item ``i``'s choice ``j`` is request
    ``r = first[i] + j``; its tokens, context then continuation, are ``tokens[starts[r]:starts[r + 1]]``,
    of which the last ``cont_len[r]`` are scored. All tensors live on the CPU."""

    name: str
    tokens: torch.Tensor  # (total,) int32
    starts: torch.Tensor  # (R + 1,) int64
    cont_len: torch.Tensor  # (R,) int64
    first: torch.Tensor  # (N + 1,) int64
    choice_chars: torch.Tensor  # (R,) float64: len(choice), acc_norm's divisor
    gold: torch.Tensor  # (N,) int64
    max_choices: int

    def __len__(self) -> int:
        return self.gold.numel()

    def request(self, item: int, choice: int) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) of one request, untruncated."""
        r = int(self.first[item]) + choice
        if not 0 <= choice < int(self.first[item + 1] - self.first[item]):
            raise IndexError(f"item {item} has no choice {choice}")
        seq = self.tokens[self.starts[r] : self.starts[r + 1]].tolist()
        c = int(self.cont_len[r])
        return seq[:-c], seq[-c:]


def encode_task(items: Sequence[Item], name: str) -> EncodedTask:
    """Tokenize every (item, choice) request once, as lm-eval would (see :func:`encode_request`)."""
    flat: list[int] = []
    starts, cont_len, first, chars = [0], [], [0], []
    for item in items:
        for choice in item.choices:
            ctx, cont = encode_request(item.context, TARGET_DELIMITER + choice)
            if not ctx or not cont:  # lm-eval asserts on these
                raise UserError(f"{item.where}: the context or the choice {choice!r} encodes to no tokens")
            flat += ctx + cont
            starts.append(len(flat))
            cont_len.append(len(cont))
            chars.append(float(len(choice)))
        first.append(len(cont_len))
    return EncodedTask(
        name=name,
        tokens=torch.tensor(flat, dtype=torch.int32),
        starts=torch.tensor(starts, dtype=torch.long),
        cont_len=torch.tensor(cont_len, dtype=torch.long),
        first=torch.tensor(first, dtype=torch.long),
        choice_chars=torch.tensor(chars, dtype=torch.float64),
        gold=torch.tensor([item.gold for item in items], dtype=torch.long),
        max_choices=max(len(item.choices) for item in items),
    )


def load_task(path: str | Path) -> EncodedTask:
    """Load and encode a task file or folder; named by :func:`task_name`."""
    return encode_task(load_items(path), task_name(path))


# ------------------------------------------------------------------------------------ scoring


@dataclass(frozen=True)
class Scores:
    """Per-item results of :func:`score`, on the device it ran on; sum the flags to all-reduce."""

    items: torch.Tensor  # (n,) int64: the items scored, in the order asked
    loglik: torch.Tensor  # (n, K) float64: each choice's summed log-probability; -inf past an item's last
    correct: torch.Tensor  # (n,) bool: argmax of loglik is the gold choice (acc)
    correct_norm: torch.Tensor  # (n,) bool: argmax of loglik / len(choice) is the gold choice (acc_norm)


@torch.no_grad()
def score(
    logits_fn: LogitsFn,
    task: EncodedTask,
    block_size: int,
    batch_size: int = 32,
    items: Sequence[int] | torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    min_batches: int = 0,
) -> Scores:
    """Score ``items`` (default: all; a rank's shard: ``range(rank, len(task), world_size)``).

    ``logits_fn`` maps (B, T) int64 ids on ``device`` to (B, T, V) logits (the model in eval mode;
    any dtype: the log-softmax runs in float32 on the continuation positions alone). Requests longer
    than ``block_size`` + 1 lose tokens on the left, as lm-eval's; requests run longest first,
    ``batch_size`` at a time, padded on the right, which a causal model never sees. Under FSDP every
    rank must call the model as often: pass the largest :func:`batch_count` of all ranks as
    ``min_batches``, and the ranks with fewer batches make up the difference with 1-token calls.
    """
    sel = _selection(task, items)
    per_item = task.first[sel + 1] - task.first[sel]
    req = torch.repeat_interleave(task.first[sel], per_item) + _ranks_within(per_item)
    row = torch.repeat_interleave(torch.arange(sel.numel()), per_item)  # each request's row in the result
    col = req - task.first[sel][row]

    ends = task.starts[req + 1]
    inplen = (ends - task.starts[req] - 1).clamp(max=block_size)
    cont = task.cont_len[req]
    if req.numel() and int(cont.max()) > block_size:
        raise UserError(f"task {task.name}: a choice has {int(cont.max())} tokens, more than the block")
    ll = torch.empty(req.numel(), dtype=torch.float32, device=device)
    order = torch.argsort(inplen, descending=True, stable=True).tolist()
    ends_l, inplen_l = ends.tolist(), inplen.tolist()
    for b0 in range(0, len(order), batch_size):
        batch = order[b0 : b0 + batch_size]
        idx = torch.zeros(len(batch), inplen_l[batch[0]], dtype=torch.long)
        for k, r in enumerate(batch):  # (context + continuation)[-(L+1):][:-1]
            idx[k, : inplen_l[r]] = task.tokens[ends_l[r] - 1 - inplen_l[r] : ends_l[r] - 1]
        b = torch.tensor(batch)
        ll[b.to(device)] = _continuation_logprob(
            logits_fn, idx.to(device), task, ends[b], inplen[b], cont[b], device
        )
    for _ in range(math.ceil(len(order) / batch_size), min_batches):
        logits_fn(torch.zeros(1, 1, dtype=torch.long, device=device))
    return _results(task, sel, row, col, ll.double(), device)


def batch_count(task: EncodedTask, batch_size: int, items: Sequence[int] | torch.Tensor | None = None) -> int:
    """How many times :func:`score` calls the model for these items (the same arguments)."""
    sel = _selection(task, items)
    return math.ceil(int((task.first[sel + 1] - task.first[sel]).sum()) / batch_size)


def _selection(task: EncodedTask, items: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    sel = torch.arange(len(task)) if items is None else torch.as_tensor(items, dtype=torch.long).reshape(-1)
    if sel.numel() and (sel.min() < 0 or sel.max() >= len(task)):
        raise IndexError(f"item indices must lie in [0, {len(task)})")
    return sel


def _ranks_within(counts: torch.Tensor) -> torch.Tensor:
    """0..c-1 for each count c, concatenated: a request's choice index within its item."""
    total = int(counts.sum())
    offsets = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return torch.arange(total) - offsets


def _continuation_logprob(
    logits_fn: LogitsFn,
    idx: torch.Tensor,
    task: EncodedTask,
    ends: torch.Tensor,
    inplen: torch.Tensor,
    cont: torch.Tensor,
    device: torch.device | str,
) -> torch.Tensor:
    """(B,) float32: the summed log-probabilities of each row's continuation tokens."""
    B, T = idx.shape
    logits = logits_fn(idx)
    if logits.shape[:2] != (B, T):
        raise ValueError(f"logits_fn returned {tuple(logits.shape)} for input {(B, T)}; expected (B, T, V)")
    c_max = int(cont.max())
    k = torch.arange(c_max)
    mask = k < cont[:, None]  # (B, C)
    # position p's logits predict token p + 1: the continuation's are inplen - cont .. inplen - 1
    pos = ((inplen - cont)[:, None] + k).clamp(max=T - 1)
    target_at = (ends - cont)[:, None] + k
    targets = torch.where(mask, task.tokens[target_at.clamp(max=task.tokens.numel() - 1)].long(), 0)
    if int(targets.max()) >= logits.size(-1):
        raise UserError(f"task {task.name}: token id {int(targets.max())} is beyond the model's vocabulary")
    picked = logits[torch.arange(B, device=device)[:, None], pos.to(device)]  # (B, C, V)
    logp = torch.log_softmax(picked.float(), dim=-1)
    tok = logp.gather(-1, targets.to(device)[..., None]).squeeze(-1)
    return tok.masked_fill(~mask.to(device), 0.0).sum(dim=1)


def _results(
    task: EncodedTask,
    sel: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    ll: torch.Tensor,
    device: torch.device | str,
) -> Scores:
    """Arrange per-request sums into (n, K) and pick acc / acc_norm predictions (first maximum wins)."""
    n, K = sel.numel(), task.max_choices
    row_d, col_d = row.to(device), col.to(device)
    loglik = torch.full((n, K), -math.inf, dtype=torch.float64, device=device)
    loglik[row_d, col_d] = ll
    chars = torch.ones((n, K), dtype=torch.float64, device=device)
    req = task.first[sel][row] + col
    chars[row_d, col_d] = task.choice_chars[req].to(device)
    gold = task.gold[sel].to(device)
    return Scores(
        items=sel.to(device),
        loglik=loglik,
        correct=loglik.argmax(dim=1) == gold,
        correct_norm=(loglik / chars).argmax(dim=1) == gold,
    )


def metrics(correct: torch.Tensor, correct_norm: torch.Tensor) -> dict[str, float]:
    """{"acc", "acc_se", "acc_norm", "acc_norm_se"} of per-item flags (all items, all ranks)."""
    return metrics_from_counts(correct.numel(), float(correct.sum()), float(correct_norm.sum()))


def metrics_from_counts(n: int, n_correct: float, n_correct_norm: float) -> dict[str, float]:
    """The same from counts (what an all-reduce of the flags' sums gives).

    lm-eval's stderr of a mean is the sample standard deviation / sqrt(n); for 0/1 flags with mean
    p that is sqrt(p (1 - p) / (n - 1)); NaN below two items (lm-eval writes N/A).
    """
    if n <= 0:
        raise ValueError("no items were scored")
    out = {}
    for key, k in (("acc", n_correct), ("acc_norm", n_correct_norm)):
        p = k / n
        out[key] = p
        out[f"{key}_se"] = math.sqrt(max(p * (1 - p), 0.0) / (n - 1)) if n > 1 else math.nan
    return out
