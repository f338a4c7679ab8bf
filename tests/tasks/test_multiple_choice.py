"""The in-loop multiple-choice scorer: both layouts load (and malformed input is one clear line),
requests encode and score exactly as lm-eval-harness's, and a trained model's numbers equal lm-eval's."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gpt2.errors import UserError
from gpt2.tasks.multiple_choice import (
    EncodedTask,
    Item,
    batch_count,
    encode_request,
    encode_task,
    hellaswag_preprocess,
    load_items,
    load_task,
    metrics,
    metrics_from_counts,
    parse_item,
    score,
    task_name,
)
from tests.conftest import REPO, LmEvalRun

TINY_MC = REPO / "evals" / "tiny_mc"
V = 50257  # GPT-2's vocabulary: the fake models' logits cover every token id

HELLASWAG_RECORD = {  # the first item of HellaSwag's validation split
    "activity_label": "Removing ice from car",
    "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter "
    "clothes smiles.",
    "ctx_b": "then",
    "endings": [
        ", the man adds wax to the windshield and cuts it.",
        ", a person board a ski lift, while two men supporting the head of the person wearing winter "
        "clothes snow as the we girls sled.",
        ", the man puts on a christmas coat, knitted with netting.",
        ", the man continues removing the snow on his car.",
    ],
    "label": "3",
}
WIKIHOW_RECORD = {  # WikiHow-style: [title]/[step] tags, a capitalised ctx_b, an integer label
    "activity_label": "Home and Garden",
    "ctx_a": "[header] How to grow tomatoes [title] Pick a sunny spot.",
    "ctx_b": "[step] Tomatoes need Sun",
    "endings": ["  eight hours of light a day. [substeps] Water them. ", "a boat.", "not [title] so.", "x"],
    "label": 0,
}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------ loading


def test_the_bundled_task_loads_as_lm_eval_reads_it() -> None:
    items = load_items(TINY_MC)
    assert 40 <= len(items) <= 60
    assert task_name(TINY_MC) == task_name(TINY_MC / "tiny_mc.jsonl") == "tiny_mc"
    first = Item("The king sat upon his", ("river", "throne", "seven", "quickly"), 1, items[0].where)
    assert items[0] == first
    assert items[0].where.endswith("tiny_mc.jsonl:1")
    assert {item.gold for item in items} == {0, 1, 2, 3}  # the gold is not always first
    assert all(not c[0].isspace() for item in items for c in item.choices)  # the delimiter adds the space


def test_a_folder_reads_its_jsonl_files_in_name_order_in_either_layout(tmp_path) -> None:
    folder = tmp_path / "My-Task"
    folder.mkdir()
    plain = {"ctx": "A man", "endings": ["runs", "sits"], "label": 1}
    write_jsonl(folder / "b.jsonl", [HELLASWAG_RECORD, plain])
    write_jsonl(folder / "a.jsonl", [{"question": "Q", "choices": ["x", "y"], "answer": "y"}, ""])
    (folder / "notes.txt").write_text("not read")
    items = load_items(folder)
    assert [i.where for i in items] == [f"{folder}/a.jsonl:1", f"{folder}/b.jsonl:1", f"{folder}/b.jsonl:2"]
    assert items[0].gold == 1  # an answer given as the choice's text
    assert items[2] == Item("A man", ("runs", "sits"), 1, items[2].where)  # "ctx": used as written
    assert task_name(folder) == "my_task"


def test_hellaswag_records_are_preprocessed_as_lm_evals_hellaswag_task() -> None:
    item = parse_item(HELLASWAG_RECORD)
    assert item.context == (
        "Removing ice from car: Then, the man writes over the snow covering the window of a car, and a "
        "woman wearing winter clothes smiles. Then"
    )
    assert item.choices[3] == ", the man continues removing the snow on his car." and item.gold == 3
    wiki = parse_item(WIKIHOW_RECORD)
    assert wiki.context == "Home and Garden: How to grow tomatoes. Pick a sunny spot. tomatoes need sun"
    assert wiki.choices == ("eight hours of light a day. Water them.", "a boat.", "not. so.", "x")
    assert hellaswag_preprocess(" a [title] b [x] c ") == "a. b c"


def test_hellaswag_preprocessing_equals_lm_evals_own_code() -> None:
    utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    datasets = pytest.importorskip("datasets")
    for record in (HELLASWAG_RECORD, WIKIHOW_RECORD):
        (doc,) = utils.process_docs(datasets.Dataset.from_list([dict(record, label=str(record["label"]))]))
        item = parse_item(record)
        assert (item.context, list(item.choices), item.gold) == (doc["query"], doc["choices"], doc["gold"])


@pytest.mark.parametrize(
    "record,message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"text": "x"}, "not a multiple-choice item"),
        ({"question": "Q", "choices": ["a"]}, "needs answer"),
        ({"question": "Q", "choices": "ab", "answer": 0}, "choices must be a non-empty list of strings"),
        ({"question": "Q", "choices": [], "answer": 0}, "non-empty list"),
        ({"question": 3, "choices": ["a"], "answer": 0}, "question must be a string"),
        ({"question": "Q", "choices": ["a", "b"], "answer": 2}, "answer 2 is out of range for 2 choices"),
        ({"question": "Q", "choices": ["a", "b"], "answer": "c"}, "neither a choice index"),
        ({"question": "Q", "choices": ["a", "b"], "answer": True}, "neither a choice index"),
        (dict(HELLASWAG_RECORD, label=""), "label '' is neither"),  # (the unlabelled test split)
        (dict(HELLASWAG_RECORD, label="4"), "label 4 is out of range for 4 choices"),
        ({k: v for k, v in HELLASWAG_RECORD.items() if k != "ctx_b"}, "HellaSwag layout needs ctx_b"),
        ({"endings": ["a"], "label": 0}, "needs ctx"),
    ],
)
def test_a_malformed_item_is_one_line_naming_file_and_line(tmp_path, record, message) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "ok", "choices": ["a"], "answer": 0}, "", record])
    with pytest.raises(UserError, match=message) as e:
        load_items(path)
    assert f"{path}:3: " in str(e.value)


def test_missing_empty_or_wrong_inputs_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="no such file or folder"):
        load_items(tmp_path / "absent.jsonl")
    with pytest.raises(UserError, match=r"holds no \.jsonl files"):
        load_items(tmp_path)
    with pytest.raises(UserError, match=r"expected a \.jsonl file"):
        load_items(write_jsonl(tmp_path / "t.json", []))
    with pytest.raises(UserError, match="no items"):
        load_items(write_jsonl(tmp_path / "t.jsonl", ["", "  "]))


# ------------------------------------------------------------------------------------ encoding

TRICKY = [
    ("The king sat upon his", " throne"),
    ("Question: who reigns?\nAnswer: ", " the king"),  # trailing space: moves to the continuation
    ("Ends in a newline\n", " word"),  # trailing newline, likewise
    ("two spaces  ", " x"),
    ("", " Once upon a time"),  # empty context: the prefix token <|endoftext|>
    ("", "<|endoftext|> after"),  # ... unless the continuation starts with it
    ("<|endoftext|>Once", " more"),  # special-token text is the special token, as in transformers
    ("café au", " lait, naïve ünïcödé 😀"),
    ("He said don", "'t"),  # the whole's tokens minus the context's: "'t" splits off either way
]


def test_requests_encode_as_lm_evals_hflm_does_with_the_exported_tokenizer(tmp_path) -> None:
    """lm-eval's own code (TemplateLM.loglikelihood, _encode_pair, HFLM.tok_encode) on the tokenizer the
    export writes: the requests it would score."""
    pytest.importorskip("lm_eval")
    transformers = pytest.importorskip("transformers")
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.huggingface import HFLM

    from gpt2.export import save_tokenizer

    save_tokenizer(tmp_path)

    class Requests(TemplateLM):
        tok_encode = HFLM.tok_encode
        prefix_token_id = HFLM.prefix_token_id
        eot_token_id = HFLM.eot_token_id

        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
            self.add_bos_token = self.custom_prefix_token_id = None

        def _loglikelihood_tokens(self, requests, **kwargs):
            return [(ctx, cont) for _, ctx, cont in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    theirs = Requests().loglikelihood([SimpleNamespace(args=a) for a in TRICKY], disable_tqdm=True)
    assert [encode_request(*a) for a in TRICKY] == theirs
    assert theirs[4][0] == [50256] and theirs[5] == ([50256], encode_request("x", " after")[1])


def test_the_encoded_task_holds_each_request_once() -> None:
    items = [Item("To be, or not to", ("be", "sky"), 0, "t:1"), Item("", ("Once",), 0, "t:2")]
    task = encode_task(items, "t")
    assert len(task) == 2 and task.max_choices == 2 and task.gold.tolist() == [0, 0]
    assert task.request(0, 1) == encode_request("To be, or not to", " sky")
    assert task.request(1, 0) == ([50256], encode_request("x", " Once")[1])
    assert task.choice_chars.tolist() == [2.0, 3.0, 4.0]  # acc_norm divides by the choice's characters
    with pytest.raises(IndexError):
        task.request(1, 1)
    with pytest.raises(UserError, match=r"t:1: .* encodes to no tokens"):
        encode_task([Item("   ", ("a",), 0, "t:1")], "t")  # all whitespace: no context is left


# ------------------------------------------------------------------------------------ scoring


def uniform(idx: torch.Tensor) -> torch.Tensor:
    """Every token equally likely: a choice's log-likelihood is -(its tokens) * log V."""
    return torch.zeros(*idx.shape, V)


def repeat_bonus(idx: torch.Tensor) -> torch.Tensor:
    """Logit 3 on repeating the current token, 0 elsewhere: tells a position off by one from the right one."""
    logits = torch.zeros(*idx.shape, V)
    return logits.scatter_(-1, idx[..., None], 3.0)


def test_acc_and_acc_norm_on_a_known_model() -> None:
    # " cat" is 1 token of 3 characters, " unquestionably" 2 tokens of 14: the raw sums prefer "cat",
    # per character "unquestionably"
    assert [len(encode_request("The", f" {c}")[1]) for c in ("cat", "unquestionably")] == [1, 2]
    items = [
        Item("The", ("cat", "unquestionably"), 1, "t:1"),
        Item("The", ("cat", "unquestionably"), 0, "t:2"),
        Item("The", ("unquestionably", "ha ha", "cat"), 2, "t:3"),
    ]
    task = encode_task(items, "t")
    s = score(uniform, task, block_size=16, batch_size=2)
    log_v = math.log(V)
    assert s.loglik.dtype == torch.float64 and s.loglik.shape == (3, 3)
    assert torch.allclose(s.loglik[0, :2], torch.tensor([-log_v, -2 * log_v], dtype=torch.float64))
    assert s.loglik[0, 2] == -math.inf  # past the item's last choice
    assert s.correct.tolist() == [False, True, True]
    assert s.correct_norm.tolist() == [True, False, False]
    assert s.items.tolist() == [0, 1, 2]
    m = metrics(s.correct, s.correct_norm)
    assert m["acc"] == pytest.approx(2 / 3) and m["acc_norm"] == pytest.approx(1 / 3)


def test_the_continuation_positions_are_the_scored_ones() -> None:
    # "ha ha ha" + " ha": the continuation repeats the last context token; " ho" does not
    assert [len(encode_request("ha ha ha", f" {c}")[1]) for c in ("ha", "ho", "ha ha")] == [1, 1, 2]
    task = encode_task([Item("ha ha ha", ("ha", "ho", "ha ha"), 0, "t:1")], "t")
    s = score(repeat_bonus, task, block_size=16)
    log_z = math.log(math.exp(3.0) + V - 1)
    expected = torch.tensor([[3.0 - log_z, -log_z, 2 * (3.0 - log_z)]], dtype=torch.float64)
    assert torch.allclose(s.loglik, expected, atol=1e-5)
    assert s.correct.tolist() == [True] and s.correct_norm.tolist() == [False]  # per character, "ha ha" wins


def test_long_requests_lose_tokens_on_the_left_as_lm_evals(tmp_path) -> None:
    task = load_task(TINY_MC)
    rows: list[list[int]] = []

    def recording(idx: torch.Tensor) -> torch.Tensor:
        rows.extend(idx.tolist())
        return repeat_bonus(idx)

    block = 8
    s = score(recording, task, block_size=block, batch_size=5)
    assert all(len(row) <= block for row in rows)
    for i in range(len(task)):
        for j in range(4):
            ctx, cont = task.request(i, j)
            window = (ctx + cont)[-(block + 1) :][:-1]
            padded = [window + [0] * (len(row) - len(window)) for row in rows]  # (right padding: id 0)
            assert window in [row for row, want in zip(rows, padded) if row == want]
    # batching and the choice of items change nothing
    again = score(repeat_bonus, task, block_size=block, batch_size=1, items=[5, 0, 47])
    assert again.items.tolist() == [5, 0, 47]
    assert torch.allclose(again.loglik, s.loglik[[5, 0, 47]])
    assert torch.equal(again.correct, s.correct[[5, 0, 47]])
    assert torch.equal(again.correct_norm, s.correct_norm[[5, 0, 47]])
    assert score(uniform, task, block_size=block, items=[]).loglik.shape == (0, 4)


def test_every_rank_can_call_the_model_as_often() -> None:
    """FSDP's forward is collective: a rank with fewer batches makes up the difference."""
    task = load_task(TINY_MC)
    calls: list[tuple[int, ...]] = []

    def counting(idx: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(idx.shape))
        return uniform(idx)

    shards = [range(rank, len(task), 5) for rank in range(5)]  # 10, 10, 10, 9, 9 items
    counts = [batch_count(task, 8, shard) for shard in shards]
    assert counts == [5, 5, 5, 5, 5] and batch_count(task, 7, shards[3]) == 6
    assert batch_count(task, 7, shards[0]) == 6 and batch_count(task, 8) == len(task) * 4 // 8
    s = score(counting, task, block_size=32, batch_size=7, items=shards[3], min_batches=6)
    assert len(calls) == 6 and s.items.tolist() == list(shards[3])
    calls.clear()
    score(counting, task, block_size=32, batch_size=7, items=shards[3], min_batches=7)
    assert len(calls) == 7 and calls[-1] == (1, 1)


def test_a_choice_longer_than_the_block_is_refused() -> None:
    task = encode_task([Item("The", ("ha ha ha ha",), 0, "t:1")], "t")
    with pytest.raises(UserError, match="more than the block"):
        score(uniform, task, block_size=3)
    with pytest.raises(IndexError):
        score(uniform, task, block_size=8, items=[1])


def test_the_standard_error_is_lm_evals() -> None:
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    flags = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    norm = torch.tensor([1, 1, 1, 0, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    m = metrics(flags, norm)
    assert m["acc"] == lm_metrics.mean(flags.float().tolist())
    assert m["acc_se"] == pytest.approx(lm_metrics.mean_stderr(flags.float().tolist()), rel=1e-12)
    assert m["acc_norm_se"] == pytest.approx(lm_metrics.mean_stderr(norm.float().tolist()), rel=1e-12)
    assert m == metrics_from_counts(10, 4, 8)
    assert math.isnan(metrics_from_counts(1, 1, 0)["acc_se"])  # lm-eval: N/A
    assert metrics_from_counts(5, 5, 0)["acc_se"] == 0.0


# ------------------------------------------------------------------------------------ against lm-eval


def test_a_trained_models_scores_equal_lm_evals(lm_eval_tiny_mc: LmEvalRun) -> None:
    """lm-eval on the exported model and this scorer on the checkpoint's GPT: the same log-likelihood
    for every choice (left truncation included: some items outgrow the 32-token block), the same
    acc and acc_norm per item, and the same aggregate and standard error."""
    from gpt2.model import GPT, GPTConfig
    from gpt2.trainer import checkpoint

    state = checkpoint.load(lm_eval_tiny_mc.checkpoint)
    model = GPT(GPTConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    model.eval()
    task: EncodedTask = load_task(TINY_MC)
    assert max(int(task.starts[r + 1] - task.starts[r]) for r in range(len(task.cont_len))) > 33
    s = score(model, task, model.config.block_size, batch_size=16)

    samples = lm_eval_tiny_mc.samples
    assert [d["doc_id"] for d in samples] == list(range(len(task)))
    theirs = torch.tensor([[float(r[0]) for r in d["filtered_resps"]] for d in samples], dtype=torch.float64)
    assert (s.loglik - theirs).abs().max() < 1e-4
    assert s.correct.tolist() == [d["acc"] == 1.0 for d in samples]
    assert s.correct_norm.tolist() == [d["acc_norm"] == 1.0 for d in samples]
    ours, r = metrics(s.correct, s.correct_norm), lm_eval_tiny_mc.results
    assert ours["acc"] == r["acc,none"] and ours["acc_norm"] == r["acc_norm,none"]
    assert ours["acc_se"] == pytest.approx(r["acc_stderr,none"], rel=1e-9)
    assert ours["acc_norm_se"] == pytest.approx(r["acc_norm_stderr,none"], rel=1e-9)
