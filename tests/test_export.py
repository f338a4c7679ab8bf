"""Hugging Face in and out: the exported directory loads offline in transformers with this project's
logits; RA gates and R-MLPs fold exactly; unexportable mechanisms are refused; export then import
is bitwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2.config import resolve
from gpt2.errors import UserError
from gpt2.export import export, load_hf_weights
from gpt2.model import GPT
from gpt2.trainer import checkpoint
from gpt2.trainer.loop import Trainer
from gpt2.trainer.run import train_once
from tests.conftest import REPO

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _trained(tiny_flags: dict, step: str | None = None, **extra) -> tuple[dict, torch.nn.Module]:
    flags = dict(tiny_flags, max_iters=4, save_checkpoint=True, checkpoint_interval=4, **extra)
    if step:
        flags |= dict(architecture="unified-ra", ra_step=step)
    train_once(resolve(flags))
    state = checkpoint.load(Path(flags["output_dir"]) / checkpoint.LAST)
    from gpt2.model import GPTConfig

    model = GPT(GPTConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    return flags, model.eval()


def _hf_logits(directory, idx: torch.Tensor) -> torch.Tensor:
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize(
    "step,extra",
    [
        (None, {}),
        pytest.param("V1", {}, marks=pytest.mark.slow),  # (V6 folds gates and an R-MLP, V12 RA gates)
        pytest.param("V3", {}, marks=pytest.mark.slow),
        ("V6", {}),
        ("V12", {"gate_delay_steps": 2}),  # a gate schedule's coupling folds too
        (None, {"bias": False}),
    ],
    ids=["vanilla", "V1-gates", "V3-rmlp", "V6-mixer-gates", "V12-coupling", "no-bias"],
)
def test_exported_logits_equal_ours(tiny_flags, tmp_path, step, extra) -> None:
    flags, model = _trained(tiny_flags, step, **extra)
    out = tmp_path / "hf"
    export(Path(flags["output_dir"]) / checkpoint.LAST, out)
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.lm_head(model.hidden_states(idx))
    theirs = _hf_logits(out, idx)
    assert (theirs - ours).abs().max() < 1e-5


def test_the_directory_loads_offline_with_its_tokenizer_and_generates_the_same(tiny_flags, tmp_path) -> None:
    flags, model = _trained(tiny_flags)
    out = tmp_path / "hf"
    record = export(Path(flags["output_dir"]) / checkpoint.LAST, out)
    written = {p.name for p in out.iterdir()}
    assert written >= {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"}
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Hello world")["input_ids"] == [15496, 995] and tok.eos_token_id == 50256
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.activation_function == "gelu" and config.vocab_size == 50304
    assert record["gpt2_sparsity"] == config.gpt2_sparsity == 0.0
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    prompt = torch.tensor([tok("The king")["input_ids"]])
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=50256)
    ours = model.generate(prompt, 12, temperature=0.0)
    assert torch.equal(theirs, ours)


def test_pruned_models_export_their_zeros_and_sparsity(tiny_flags, tmp_path) -> None:
    flags, model = _trained(
        tiny_flags, pruning_method="magnitude", target_sparsity=0.5, pruning_warmup=1, pruning_frequency=1
    )
    record = export(Path(flags["output_dir"]) / checkpoint.LAST, tmp_path / "hf")
    assert record["gpt2_sparsity"] == pytest.approx(0.5, abs=0.02)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    w = hf.transformer.h[0].mlp.c_fc.weight
    assert torch.equal(w == 0, model.transformer.h[0].mlp.c_fc.weight.t() == 0)


@pytest.mark.parametrize("step,what", [("V2", "self-restart"), ("V14", "KV pruning")])
def test_mechanisms_without_a_gpt2_equivalent_are_refused(tiny_flags, tmp_path, step, what) -> None:
    flags = dict(tiny_flags, max_iters=1, save_checkpoint=True, architecture="unified-ra", ra_step=step)
    train_once(resolve(flags))
    with pytest.raises(UserError, match=f"cannot export .* to GPT-2: {what}"):
        export(Path(flags["output_dir"]) / checkpoint.LAST, tmp_path / "hf")


def test_export_then_import_is_bitwise(tiny_flags, tmp_path) -> None:
    flags, model = _trained(tiny_flags)
    export(Path(flags["output_dir"]) / checkpoint.LAST, tmp_path / "hf")
    trainer = Trainer(
        resolve(dict(tiny_flags, init_from=str(tmp_path / "hf"), output_dir=str(tmp_path / "ft")))
    )
    for (name, a), b in zip(model.state_dict().items(), trainer.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow  # (the bitwise import test covers the loading; this one trains from it)
def test_fine_tuning_from_a_directory_trains(tiny_flags, tmp_path) -> None:
    flags, _ = _trained(tiny_flags)
    export(Path(flags["output_dir"]) / checkpoint.LAST, tmp_path / "hf")
    results = train_once(
        resolve(dict(tiny_flags, init_from=str(tmp_path / "hf"), output_dir=str(tmp_path / "ft")))
    )
    assert results["iters"] == tiny_flags["max_iters"]


def test_an_import_that_does_not_fit_is_one_clear_line(tiny_flags, tmp_path) -> None:
    flags, _ = _trained(tiny_flags)
    export(Path(flags["output_dir"]) / checkpoint.LAST, tmp_path / "hf")
    other = dict(tiny_flags, init_from=str(tmp_path / "hf"), output_dir=str(tmp_path / "other"))
    with pytest.raises(UserError, match=r"shapes differ: n_layer 2 \(this run: 3\)"):
        Trainer(resolve(dict(other, n_layer=3)))
    with pytest.raises(UserError, match="loads into standard GPT-2 blocks"):
        Trainer(resolve(dict(other, architecture="unified-ra", ra_step="V1")))
    with pytest.raises(UserError, match="not a transformers directory"):
        load_hf_weights(GPT(Trainer(resolve(dict(other, init_from=None))).gpt_config), tmp_path)


def test_the_export_command(tiny_flags, tmp_path) -> None:
    flags, _ = _trained(tiny_flags)
    ckpt = Path(flags["output_dir"]) / checkpoint.LAST
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2.export", str(ckpt), "--out", str(tmp_path / "hf")],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "exported" in proc.stdout and (tmp_path / "hf" / "model.safetensors").is_file()
