"""Ablation mode (reference §10, fixed): isolation, crash isolation, skip/resume, seeds, summary files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2.analysis import stats
from gpt2.cli import parse
from gpt2.config import resolve
from gpt2.errors import UserError
from gpt2.launch.coordinator import run_ablation
from gpt2.launch.outcome import START_MARK
from gpt2.launch.plan import arms_of
from tests.conftest import as_argv

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small local text folder (about 40k tokens); the trainer prepares it on first use."""
    words = (
        "the quick brown fox jumps over a lazy dog while seven kings sing of old rivers and "
        "bright stars under the cold moon"
    ).split()
    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = (" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) + "." for i in range(3000))
    (folder / "a.txt").write_text("\n".join(lines))
    return folder


# A 2-layer, 2-head, 32-wide model: each step is cheap, and head_dim 16 fits every V-step's R.
MODEL = [
    "--model-name",
    "tiny",
    "--n-layer",
    "2",
    "--n-embd",
    "32",
    "--n-head",
    "2",
    "--block-size",
    "32",
    "--batch-size",
    "4",
    "--architecture",
    "unified-ra",
    "--ablation-mode",
]


def tiny_args(corpus: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        *MODEL,
        "--eval-samples",
        "2",
        "--dataset",
        str(corpus),
        "--data-dir",
        str(tmp_path / "data"),
        "--output-dir",
        str(tmp_path / "out"),
        "--sample-tokens",
        "0",
        *extra,
    ]


# ----------------------------------------------------------------------------- with a fake executor


class FakeExecutor:
    """Stands in for a launcher: "runs" each job at once by writing the results a run would leave,
    so that the coordinator's planning, bookkeeping and summary are tested without training."""

    name = "local"
    threads = 1

    def __init__(self, losses: dict[tuple[str, int], float], fail: set[str] = frozenset()) -> None:
        self.losses, self.fail = losses, fail
        self.received = []  # the configurations the jobs were given, in submission order
        self._ended: list[int] = []

    def describe(self) -> str:
        return "a fake executor"

    def free(self) -> int:
        return 1

    def live(self) -> list:
        return []

    def reattach(self, job, record) -> bool:
        return False

    def stop(self) -> None:
        pass

    def submit(self, jobs) -> dict[int, dict]:
        for job in jobs:
            c = job.config
            self.received.append(c)
            step, seed = c.model.ra_step, c.train.seed
            c.train.max_iters = 999  # a run that mutates its config must not affect the next one
            out = Path(c.output.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            self._ended.append(job.index)
            if step in self.fail:
                job.log_path.write_text(f"Traceback (most recent call last):\nRuntimeError: boom in {step}\n")
                continue
            loss = self.losses[(step, seed)]
            records = [
                {"step": 0, "tokens": 0, "elapsed_s": 0.0, "val_loss": loss + 1.0},
                {
                    "step": 10,
                    "tokens": 1280,
                    "elapsed_s": 1.0,
                    "train_loss": loss,
                    "ms_per_step": 100.0,
                    "tokens_per_s": 1280.0,
                },
                {"step": 10, "tokens": 1280, "elapsed_s": 1.1, "val_loss": loss},
            ]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            results = {
                "final_val_loss": loss,
                "best_val_loss": loss,
                "iters": 10,
                "tokens_seen": 1280,
                "n_params": 1000,
                "wall_time_s": 1.1,
                "train_time_s": 1.0,
                "peak_memory_bytes": 1,
                "stop_reason": "max_iters",
            }
            (out / "results.json").write_text(json.dumps(results))
        return {job.index: {"job_id": f"fake {job.index}"} for job in jobs}

    def states(self) -> dict[int, str]:
        ended, self._ended = self._ended, []
        return dict.fromkeys(ended, "ended")


def ablation_config(output_dir, steps: str, **extra):
    """A resolved ablation config of the tiny model over ``steps`` (fake trainers run it)."""
    return resolve(
        dict(
            architecture="unified-ra",
            ablation_mode=True,
            ablation_steps=steps,
            model_name="tiny",
            output_dir=str(output_dir),
            **extra,
        )
    )


def test_each_step_gets_its_own_fresh_config_and_the_shared_one_is_untouched(tmp_path) -> None:
    cfg = ablation_config(tmp_path / "out", "V2,V7,V0", max_iters=50)
    before = cfg.to_dict()
    fake = FakeExecutor({(s, 1337): 3.0 for s in ("V2", "V7", "V0")})
    received = fake.received
    run_ablation(cfg, fake)
    assert cfg.to_dict() == before
    assert [c.model.ra_step for c in received] == ["V2", "V7", "V0"]
    assert len({id(c) for c in received}) == 3
    for c in received:
        assert c.model.architecture == "unified-ra" and c.train.seed == 1337
        assert c.output.output_dir == str(tmp_path / "out" / c.model.ra_step)
        assert c.output.resume == "auto" and c.output.save_checkpoint and not c.ablation.ablation_mode
    # each was handed the original budget although the previous "trainer" changed its own copy
    assert {c.model.ra_step: c.train.max_iters for c in received} == {"V2": 999, "V7": 999, "V0": 999}
    assert all(c is not cfg for c in received)
    models = {c.model.ra_step: c.gpt_config() for c in received}  # the model follows from the config
    assert models["V2"].self_restart and not models["V7"].self_restart  # no leak from V2 into V7
    assert models["V7"].ra_rank == 8 and models["V0"].attention == "standard"


def test_a_failing_step_is_recorded_with_its_log_and_the_others_still_run(tmp_path) -> None:
    cfg = ablation_config(tmp_path, "V0,V1,V3")
    fake = FakeExecutor({("V0", 1337): 3.0, ("V3", 1337): 2.5}, fail={"V1"})
    received = fake.received
    with pytest.raises(UserError, match=r"1 of 3 ablation runs failed \(V1 \(seed 1337\): RuntimeError"):
        run_ablation(
            cfg, fake
        )  # exits non-zero, but only after the other steps ran and the summary is written
    summary = json.loads((tmp_path / "ablation_summary.json").read_text())
    assert [c.model.ra_step for c in received] == ["V0", "V1", "V3"]
    status = {r["step"]: r["status"] for r in summary["runs"]}
    assert status == {"V0": "done", "V1": "failed", "V3": "done"}
    md = (tmp_path / "ablation_summary.md").read_text()
    assert "boom in V1" in md and "Traceback (most recent call last):" in md  # the tail of its log
    v3 = next(a for a in summary["by_step"] if a["step"] == "V3")
    assert v3["delta_val_loss_vs_control"] == pytest.approx(-0.5)


def test_finished_steps_are_skipped_and_signal_stopped_ones_run_again(tmp_path) -> None:
    cfg = ablation_config(tmp_path, "V0,V1,V3")
    fake = FakeExecutor({(s, 1337): 3.0 for s in ("V0", "V1", "V3")})
    received = fake.received
    run_ablation(cfg, fake)
    v1 = tmp_path / "V1" / "results.json"
    v1.write_text(json.dumps({**json.loads(v1.read_text()), "stop_reason": "signal SIGTERM"}))
    received.clear()
    summary = run_ablation(cfg, fake)
    assert [c.model.ra_step for c in received] == ["V1"]
    assert [r["status"] for r in summary["runs"]] == ["done"] * 3


def test_seeds_give_mean_std_and_a_paired_noise_test(tmp_path) -> None:
    cfg = ablation_config(tmp_path, "V0,V1,V3", ablation_seeds=3, seed=10)
    v0 = {10: 3.00, 11: 3.20, 12: 2.90}
    losses = {("V0", s): v for s, v in v0.items()}
    losses |= {("V1", s): v - 0.10 + d for (s, v), d in zip(v0.items(), (0.002, -0.001, -0.001))}  # real gain
    losses |= {("V3", s): v + d for (s, v), d in zip(v0.items(), (0.09, -0.05, 0.02))}  # +0.02, within noise
    fake = FakeExecutor(losses)
    received = fake.received
    summary = run_ablation(cfg, fake)
    assert len(received) == 9
    assert (tmp_path / "V1" / "seed11" / "results.json").exists()
    by = {a["step"]: a for a in summary["by_step"]}
    assert by["V0"]["final_val_loss"] == pytest.approx(9.1 / 3)
    assert by["V0"]["final_val_loss_std"] == pytest.approx(0.152752523, rel=1e-6)
    assert by["V1"]["delta_val_loss_vs_control"] == pytest.approx(-0.1)
    assert by["V1"]["beyond_seed_noise"] is True
    assert by["V3"]["beyond_seed_noise"] is False
    assert by["V0"]["beyond_seed_noise"] is None
    md = (tmp_path / "ablation_summary.md").read_text()
    assert "± " in md and "paired t-test" in md
    rows = (tmp_path / "ablation_summary.csv").read_text().splitlines()
    assert len(rows) == 1 + 9 and rows[0].startswith("step,seed,status,final_val_loss")


def test_dry_run_builds_and_steps_each_model_without_data_or_files(tmp_path, capsys) -> None:
    cfg = parse([*MODEL, "--output-dir", str(tmp_path / "out"), "--ablation-steps", "V0,V4,V10", "--dry-run"])
    summary = run_ablation(cfg)
    assert [r["status"] for r in summary["runs"]] == ["dry-run"] * 3
    v0, v4, v10 = (r["n_params"] for r in summary["runs"])
    L, H, C = 2, 2, 32
    assert v4 - v0 == L * (2 * H + 2 + 64 * 64 + 64)  # RA gates, R-MLP gates, mixer (R_ff=64) with bias
    assert v10 - v0 == L * (3 * H + 2 * C * 2 * C + 2 * C)  # RA gates + restart alpha, 4x -> 6x MLP
    assert not (tmp_path / "out").exists()
    assert "3/3 steps ok" in capsys.readouterr().out


# ----------------------------------------------------------------------------- real runs on CPU


def test_killed_ablation_resumes_the_unfinished_step_and_keeps_the_finished_one(corpus, tmp_path) -> None:
    """SIGKILL to the coordinator and its runs during V1 (a dead machine or job); the rerun trains only
    the rest of V1 (from its checkpoint) and writes a summary."""
    args = tiny_args(
        corpus,
        tmp_path,
        "--ablation-steps",
        "V0,V1",
        "--max-iters",
        "24",
        "--eval-interval",
        "12",
        "--checkpoint-interval",
        "4",
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "gpt2/train.py", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the kill takes the coordinator and its runs
    )
    deadline = time.monotonic() + 120
    try:
        while not (out / "V1" / "checkpoint_last.pt").exists():
            assert proc.poll() is None, f"ablation ended before V1 saved: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no V1 checkpoint within 120 s"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "V1" / "results.json").exists(), "V1 finished before the kill: the test proves nothing"
    v0_results = out / "V0" / "results.json"
    v0_before = (v0_results.read_bytes(), v0_results.stat().st_mtime_ns)
    assert not (out / "V0" / "checkpoint_last.pt").exists()  # resume-only checkpoints go once a step is done

    summary = run_ablation(parse(args))

    attempts = {a: (out / a / "job.log").read_text().split(START_MARK) for a in ("V0", "V1")}
    assert len(attempts["V0"]) == 2 and len(attempts["V1"]) == 3  # V0 ran once, V1 twice
    assert (v0_results.read_bytes(), v0_results.stat().st_mtime_ns) == v0_before
    resumed = re.search(r"resumed from (\S+) at step (\d+)", attempts["V1"][-1])
    assert (
        resumed and resumed.group(1) == str(out / "V1" / "checkpoint_last.pt") and int(resumed.group(2)) >= 4
    )
    results = {s: json.loads((out / s / "results.json").read_text()) for s in ("V0", "V1")}
    assert results["V1"]["iters"] == 24 and results["V1"]["ra_step"] == "V1"

    saved = json.loads((out / "ablation_summary.json").read_text())
    assert saved["steps"] == ["V0", "V1"] == [a["step"] for a in summary["by_step"]]
    for row in saved["runs"]:
        r = results[row["step"]]
        assert row["status"] == "done"
        assert row["final_val_loss"] == r["final_val_loss"] and row["n_params"] == r["n_params"]
        assert row["tokens_seen"] == 24 * 4 * 32 and row["ms_per_step"] > 0 and row["tokens_per_s"] > 0
    v1 = saved["by_step"][1]
    assert v1["n_params"] - saved["by_step"][0]["n_params"] == 2 * 2 * 2  # gates only: 2 per head and layer
    delta = results["V1"]["final_val_loss"] - results["V0"]["final_val_loss"]
    assert v1["delta_val_loss_vs_control"] == pytest.approx(delta)
    md = (out / "ablation_summary.md").read_text()
    assert "| V0 |" in md and "| V1 |" in md and f"{results['V1']['final_val_loss']:.4f}" in md
    assert len((out / "ablation_summary.csv").read_text().splitlines()) == 3
    for png in ("loss_vs_tokens.png", "loss_vs_time.png"):  # val loss of both steps, by gpt2.track.report
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "V1" in (out / "report" / "report.html").read_text()
    # gate analysis of the RA step: in every evaluation record, and plotted
    evals = [json.loads(line) for line in (out / "V1" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 12, 24]
    assert all("gates/attn_w_rec_mean" in r and "gates/L1/attn_w_std_h1" in r for r in evals)
    assert (out / "V1" / "gates.png").exists() and not (out / "V0" / "gates.png").exists()
    assert results["V1"]["final_gates"]["gates/attn_w_std_mean"] == evals[-1]["gates/attn_w_std_mean"]


# ------------------------------------------------------------------ --ablate over any setting


def test_ablate_axes_parse_and_form_a_grid(tmp_path) -> None:
    cfg = parse(
        ["--model-name", "tiny", "--output-dir", str(tmp_path), "--ablate", "optimizer=adamw,adamwspam",
         "--ablate", "learning-rate=3e-4,6e-4"]
    )  # fmt: skip
    arms, control = arms_of(cfg)
    assert [a.name for a in arms] == [
        "optimizer=adamw_learning_rate=0.0003",
        "optimizer=adamw_learning_rate=0.0006",
        "optimizer=adamwspam_learning_rate=0.0003",
        "optimizer=adamwspam_learning_rate=0.0006",
    ]
    assert control == arms[0].name and arms[3].values == {"optimizer": "adamwspam", "learning_rate": 6e-4}
    steps = parse(["--model-name", "tiny", "--output-dir", str(tmp_path), "--ablate", "ra_step=V0,V1"])
    assert [(a.name, a.values["architecture"]) for a in arms_of(steps)[0]] == [
        ("V0", "unified-ra"),
        ("V1", "unified-ra"),
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ablate", "optimiser=adamw,sgd"], "unknown setting 'optimiser'"),
        (["--ablate", "learning-rate=fast"], "'fast' is not a float"),
        (["--ablate", "optimizer"], "write KEY=V1,V2"),
        (["--ablate", "output-dir=a,b"], "not a setting an arm can vary"),
        (["--ablate", "optimizer=adamw,adamw"], "listed twice"),
        (["--ablate", "seed=1,2"], "use --ablation-seeds"),
        (["--ablate", "optimizer=adamw,sgd", "--optimizer", "sgd"], "--optimizer is ablated"),
        (["--ablate", "optimizer=adamw", "--ablation-mode", "--architecture", "unified-ra"], "not both"),
    ],
)
def test_bad_ablate_flags_are_one_line(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_an_arm_that_cannot_run_stops_the_ablation_before_any_training(tmp_path) -> None:
    cfg = parse(
        ["--model-name", "tiny", "--output-dir", str(tmp_path), "--ablate", "pruning-method=none,state"]
    )
    with pytest.raises(
        UserError, match="ablation arm state: --pruning-method state needs --optimizer adamwprune"
    ):
        run_ablation(cfg)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # (the default suite's time: test_local's bitwise test runs real arms)
def test_ablate_optimizer_runs_every_arm_from_the_same_start(tiny_flags, tmp_path) -> None:
    flags = tiny_flags | dict(max_iters=6, eval_interval=3, output_dir=str(tmp_path / "abl"))
    del flags["optimizer"]  # the ablated setting
    cfg = parse([*as_argv(flags), "--ablate", "optimizer=adamw,adamwspam", "--ablation-seeds", "2"])
    summary = run_ablation(cfg)
    assert summary["control"] == "adamw" and [a["step"] for a in summary["by_step"]] == ["adamw", "adamwspam"]
    assert all(r["status"] == "done" for r in summary["runs"])
    spam = summary["by_step"][1]
    assert spam["runs_done"] == 2 and spam["delta_ci95"] is not None and spam["beyond_seed_noise"] is not None
    lo, hi = spam["delta_ci95"]
    assert lo <= spam["delta_val_loss_vs_control"] <= hi
    for seed in (1337, 1338):  # same seed: the same initial weights and data, so the same step-0 loss
        first = [
            json.loads((tmp_path / "abl" / arm / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()[0])
            for arm in ("adamw", "adamwspam")
        ]
        assert first[0]["step"] == 0 and first[0]["val_loss"] == first[1]["val_loss"]
    text = (tmp_path / "abl" / "ablation_summary.md").read_text()
    assert "| arm |" in text and "95% CI" in text and "control: adamw" in text
    replay = parse(["--config", str(tmp_path / "abl" / "config.toml")])  # the whole ablation replays
    assert replay.ablation.ablate == cfg.ablation.ablate and replay.ablation.ablation_seeds == 2


def test_the_report_opens_with_the_answer_and_every_image_decodes(tiny_flags, tmp_path) -> None:
    import base64
    import io
    import re

    from matplotlib.image import imread

    flags = tiny_flags | dict(max_iters=4, eval_interval=2, output_dir=str(tmp_path / "abl"))
    summary = run_ablation(parse([*as_argv(flags), "--ablate", "learning-rate=1e-3,3e-3"]))
    for arm in summary["by_step"]:  # both ran 4 steps: the equal-token comparison is at the end
        assert arm["val_loss_at_equal_tokens"] == pytest.approx(arm["final_val_loss"])
    page = (tmp_path / "abl" / "report" / "report.html").read_text()
    body = page[page.index("<body>") :]
    assert body.index('<table id="answer">') < body.index('<table id="runs">')
    assert "Δ vs 0.001" in body
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 3
    for data in images:
        pixels = imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    tex = (tmp_path / "abl" / "ablation_summary.tex").read_text()
    assert tex.startswith("\\begin{tabular}") and "0.001 &" in tex and "\\bottomrule" in tex


def test_every_run_is_its_own_process_with_its_own_peak_memory(tiny_flags, tmp_path) -> None:
    """The larger model first: in one process the second run would report the first one's peak."""
    flags = tiny_flags | dict(max_iters=2, eval_interval=2, output_dir=str(tmp_path / "abl"))
    summary = run_ablation(parse([*as_argv(flags), "--ablate", "n_embd=256,32"]))
    big, small = (a["peak_memory_mib"] for a in summary["by_step"])
    assert small < big - 20, (big, small)
    pids = {json.loads((tmp_path / "abl" / "jobs.json").read_text())["jobs"][k]["pid"] for k in ("1", "2")}
    assert len(pids) == 2 and os.getpid() not in pids


def test_the_ablation_is_validated_as_its_control_arm_and_arm_folders_are_safe(tmp_path) -> None:
    # flags that only some method uses are fine when the ablated method uses them
    ablate = ["--ablate", "pruning_method=magnitude,movement"]
    flags = ["--max-iters", "1000", "--pruning-ramp-end", "800", "--pruning-warmup", "100"]
    cfg = parse(["--model-name", "tiny", "--output-dir", str(tmp_path), *flags, *ablate])
    assert cfg.pruning.pruning_method == "magnitude" and "pruning_method" not in cfg.explicit
    gates = parse(["--model-name", "tiny", "--output-dir", str(tmp_path), "--ablate", "ra_step=V1,V3",
                   "--ra-gates", "per-layer"])  # fmt: skip
    assert [a.values["architecture"] for a in arms_of(gates)[0]] == ["unified-ra", "unified-ra"]
    paths = parse(
        ["--model-name", "tiny", "--output-dir", str(tmp_path), "--ablate", f"dataset={tmp_path},shakespeare"]
    )
    names = [a.name for a in arms_of(paths)[0]]
    assert "/" not in names[0] and names[1] == "shakespeare"


def test_auto_seeds_run_in_rounds_until_every_arm_is_decided(tmp_path) -> None:
    """V1 is 0.5 better on every seed: decided at the first look (2 seeds), no further round."""
    cfg = ablation_config(tmp_path, "V0,V1", ablation_seeds=0, max_seeds=6, seed=10)
    fake = FakeExecutor(
        {(s, 10 + k): 3.0 - 0.5 * (s == "V1") + 0.001 * k * k for s in ("V0", "V1") for k in range(6)}
    )
    summary = run_ablation(cfg, fake)
    assert sorted((c.model.ra_step, c.train.seed) for c in fake.received) == [
        ("V0", 10), ("V0", 11), ("V1", 10), ("V1", 11)
    ]  # fmt: skip
    assert summary["seeds"] == [10, 11] and summary["sequential"]["decided"]
    v1 = summary["by_step"][1]
    assert v1["verdict"] == "difference" and v1["p_holm"] < stats.look_alpha(2, 6)
    md = (tmp_path / "ablation_summary.md").read_text()
    assert "| better |" in md and "Lan-DeMets" in md and "Holm-Bonferroni" in md


def test_auto_seeds_stop_at_the_maximum_and_say_what_is_ruled_out(tmp_path) -> None:
    noise = [0.3, -0.2, 0.25, -0.35]  # V3 - V0 swings by more than the effect of interest
    cfg = ablation_config(tmp_path, "V0,V3", ablation_seeds=0, max_seeds=4, min_effect=0.01, seed=10)
    fake = FakeExecutor(
        {**{("V0", 10 + k): 3.0 for k in range(4)}, **{("V3", 10 + k): 3.0 + d for k, d in enumerate(noise)}}
    )
    summary = run_ablation(cfg, fake)
    assert len(fake.received) == 8 and summary["seeds"] == [10, 11, 12, 13]
    v3 = summary["by_step"][1]
    assert v3["verdict"] == "undecided" and not summary["sequential"]["decided"] and v3["ruled_out"] > 0.3
    assert "undecided (rules out >" in (tmp_path / "ablation_summary.md").read_text()
