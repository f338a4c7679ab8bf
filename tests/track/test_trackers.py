"""Trackers (reference §11, fixed): wandb offline with its run files, trackio local, failures survived."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import struct
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from gpt2.config import resolve
from gpt2.track import trackers as trackers_module
from gpt2.track.trackers import Trackers, flatten_scalars, parse_tracker_names
from gpt2.trainer.run import train_once
from tests.conftest import tiny_run_flags

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- reading wandb's run file
def wandb_records(run_file: Path) -> list[Any]:
    """The protobuf records of an offline ``run-<id>.wandb`` file (a LevelDB-style log after a
    7-byte ``:W&B`` header: 32 KiB blocks of chunks ``crc32 u32, length u16, type u8, data``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = run_file.read_bytes()
    assert raw[:4] == b":W&B", f"{run_file} is not a wandb run file"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding up to the next block
            pos += block - pos % block if pos % block else 0
            continue
        pending = data if kind in (1, 2) else pending + data  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def finished_records(run_dir: Path, timeout_s: float = 60.0) -> list[Any]:
    """The records of a finished offline run; waits for its ``exit`` record, because ``finish()``
    returns before wandb's writer process has flushed the file."""
    (run_file,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        records = wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def read_wandb_run(run_dir: Path) -> dict[str, Any]:
    """Name, project, config, history rows, merged summary and exit code of an offline run folder."""
    run: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "exit_code": None}

    def key(item: Any) -> str:
        return item.key or "/".join(item.nested_key)

    for r in finished_records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run["name"], run["project"] = r.run.display_name, r.run.project
            run["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            run["history"].append({key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            run["summary"].update({key(i): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "exit":
            run["exit_code"] = r.exit.exit_code
    return run


def offline_runs(root: Path) -> dict[str, Path]:
    """Offline run folders under ``root`` by run display name."""
    return {read_wandb_run(d)["name"]: d for d in sorted(root.glob("**/offline-run-*")) if d.is_dir()}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def wandb_root(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Offline wandb writing only under a temporary folder, for the whole module."""
    root = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(root))
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(root / var.lower()))
        mp.delenv("WANDB_API_KEY", raising=False)
        yield root


class FakeTrackioRun:
    def __init__(self, fail_log: bool) -> None:
        self.fail_log, self.logged, self.finished = fail_log, [], False

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.fail_log:
            raise ConnectionError("database is locked\nsecond line that must not be printed")
        self.logged.append((step, metrics))

    def finish(self) -> None:
        self.finished = True


def fake_trackio(fail_log: bool) -> types.ModuleType:
    mod = types.ModuleType("trackio")
    mod.runs = []

    def init(project: str, name: str, config: dict) -> FakeTrackioRun:
        mod.runs.append(FakeTrackioRun(fail_log))
        return mod.runs[-1]

    mod.init = init
    return mod


@pytest.fixture(scope="module")
def tracked_run(wandb_root: Path, corpus_dir: Path, data_dir: Path, tmp_path_factory) -> dict[str, Any]:
    """One tiny CPU run (the shared ``tiny_flags``, with Unified RA gates and magnitude pruning so that
    gate and sparsity keys flow) tracked by real offline wandb and by a trackio whose every log raises."""
    out = tmp_path_factory.mktemp("tracked") / "out"
    flags = tiny_run_flags(corpus_dir, data_dir, out)
    flags.update(
        architecture="unified-ra", pruning_method="magnitude", pruning_warmup=2, pruning_frequency=2,
        target_sparsity=0.5, tracker="wandb,trackio", tracker_project="gpt2-tests",
        tracker_run_name="tracked",
    )  # fmt: skip
    fake = fake_trackio(fail_log=True)
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setitem(sys.modules, "trackio", fake)
        results = train_once(resolve(flags))
    return {"results": results, "out": out, "stderr": err.getvalue(), "trackio": fake}


# ----------------------------------------------------------------------------- real runs
def test_wandb_offline_run_holds_config_metrics_gates_sparsity_and_summary(tracked_run, wandb_root):
    runs = offline_runs(wandb_root)
    assert "tracked" in runs, f"no offline run named 'tracked' under {wandb_root}: {sorted(runs)}"
    run = read_wandb_run(runs["tracked"])
    assert run["project"] == "gpt2-tests"
    assert run["config"]["train"]["max_iters"] == 8
    assert run["config"]["pruning"]["pruning_method"] == "magnitude"

    keys = set().union(*run["history"])
    for k in ("train_loss", "lr", "tokens_per_s", "val_loss", "val_perplexity", "sparsity"):
        assert k in keys, f"{k} was not logged to wandb"
    assert any(k.startswith("gates/") for k in keys), "no gate statistics reached wandb"
    assert any(k.startswith("sparsity/") for k in keys), "no per-layer sparsity reached wandb"
    steps = [row["_step"] for row in run["history"]]
    assert steps == sorted(steps) and steps[-1] == 8

    # the same numbers as the local records
    local = [json.loads(line) for line in (tracked_run["out"] / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in local if "val_loss" in r][-1]
    assert run["summary"]["val_loss"] == pytest.approx(last_eval["val_loss"])
    res = tracked_run["results"]
    assert run["summary"]["final_val_loss"] == pytest.approx(res["final_val_loss"])
    assert run["summary"]["final_sparsity"] == pytest.approx(res["final_sparsity"])
    assert run["summary"]["iters"] == 8
    assert run["exit_code"] == 0


def test_raising_tracker_costs_one_warning_and_training_goes_on(tracked_run):
    assert tracked_run["results"]["iters"] == 8
    assert (tracked_run["out"] / "results.json").is_file()
    lines = [ln for ln in tracked_run["stderr"].splitlines() if "trackio" in ln]
    assert len(lines) == 1, tracked_run["stderr"]
    assert lines[0].startswith("warning: tracker trackio: log failed")
    assert "ConnectionError: database is locked" in lines[0]
    (fake_run,) = tracked_run["trackio"].runs
    assert fake_run.finished, "a tracker that failed to log must still be finished"


def test_trackio_logs_into_trackio_dir(tmp_path: Path):
    # trackio reads TRACKIO_DIR once, at import: a fresh process gets the value we set
    script = """
import json, sys
from pathlib import Path
from gpt2.track.trackers import Trackers
t = Trackers("trackio", project="gpt2-tests", run_name="tk-run", config={"train": {"max_iters": 8}},
             out_dir=Path(sys.argv[1]), quiet=True)
print(json.dumps(t.locations))
t.log({"train_loss": 3.5, "lr": 1e-3}, step=2)
t.log({"val_loss": 3.25, "gates/attn_w_rec_mean": 0.5, "sparsity": 0.25, "note": None}, step=4)
t.finish({"final_val_loss": 3.25})
"""
    tk = tmp_path / "tk"
    env = {**os.environ, "TRACKIO_DIR": str(tk), "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "warning" not in p.stderr, p.stderr
    assert p.stdout.strip().splitlines() == [json.dumps({"trackio": str(tk)})], "quiet: no trackio banner"
    (db,) = tk.glob("*.db")
    with contextlib.closing(sqlite3.connect(db)) as con:
        rows = con.execute(
            "select step, metrics from metrics where run_name = 'tk-run' order by step"
        ).fetchall()
        (config,) = con.execute("select config from configs where run_name = 'tk-run'").fetchone()
    logged = {step: json.loads(m) for step, m in rows}
    assert logged[2] == {"train_loss": 3.5, "lr": 1e-3}
    assert logged[4] == {"val_loss": 3.25, "gates/attn_w_rec_mean": 0.5, "sparsity": 0.25}
    assert json.loads(config)["train"] == {"max_iters": 8}


def test_wandb_without_key_or_mode_logs_offline_next_to_the_run(tmp_path, monkeypatch, capsys, wandb_root):
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    t = Trackers("wandb", project="gpt2-tests", run_name="no-key", config={"a": 1}, out_dir=tmp_path / "run",
                 quiet=True)  # fmt: skip
    assert t.backends, "wandb did not start"
    assert "warning" not in capsys.readouterr().err
    location = Path(t.locations["wandb"])
    assert location.parent == tmp_path / "run" / "wandb" and location.name.startswith("offline-run-")
    t.log({"train_loss": 2.0}, step=1)
    t.finish({"final_val_loss": 1.5})
    run = read_wandb_run(location)
    assert run["name"] == "no-key" and run["config"]["a"] == 1
    assert run["history"][0]["train_loss"] == 2.0 and run["summary"]["final_val_loss"] == 1.5


def test_a_new_trackers_finishes_the_run_a_crashed_one_left_open(wandb_root: Path):
    first = Trackers(
        "wandb", project="gpt2-tests", run_name="leaked", config={}, out_dir=wandb_root, quiet=True
    )
    first.log({"train_loss": 1.0}, step=1)
    # ... the training raised before first.finish(); an ablation goes on with the next step
    second = Trackers(
        "wandb", project="gpt2-tests", run_name="next", config={}, out_dir=wandb_root, quiet=True
    )
    assert first.finished
    import wandb

    assert wandb.run is second.backends[0].run
    second.log({"train_loss": 0.5}, step=1)
    second.finish({})
    runs = offline_runs(wandb_root)
    leaked, nxt = read_wandb_run(runs["leaked"]), read_wandb_run(runs["next"])
    assert leaked["exit_code"] == 1, "the left-open run must be closed, as failed"
    assert nxt["exit_code"] == 0 and nxt["history"][0]["train_loss"] == 0.5
    assert [h["train_loss"] for h in leaked["history"]] == [1.0], "the second run's metrics went elsewhere"


# ----------------------------------------------------------------------------- with a stand-in wandb
class FakeWandbRun:
    def __init__(self, fail: str, mode: str | None) -> None:
        self.fail, self.mode = fail, mode
        self.logged: list[tuple[int, dict]] = []
        self.summary: dict[str, Any] = {}
        self.exit_code: int | None = None
        self.dir = "/nowhere/offline-run-x/files"

    def log(self, metrics: dict, step: int) -> None:
        if self.fail == "log":
            raise RuntimeError("log exploded")
        self.logged.append((step, metrics))

    def finish(self, exit_code: int = 0) -> None:
        if self.fail == "finish":
            raise RuntimeError("finish exploded")
        self.exit_code = exit_code


def fake_wandb(monkeypatch, fail: str = "", online_fails: bool = False) -> types.ModuleType:
    mod = types.ModuleType("wandb")
    mod.runs = []
    mod.calls = []
    mod.Settings = lambda **kw: kw

    def init(**kw: Any) -> FakeWandbRun:
        mod.calls.append(kw)
        if fail == "init" or (online_fails and kw.get("mode") != "offline"):
            raise TimeoutError("init timed out")
        mod.runs.append(FakeWandbRun(fail, kw.get("mode")))
        return mod.runs[-1]

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    monkeypatch.setenv("WANDB_DIR", "/tmp")
    return mod


def warnings_of(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning")]


@pytest.mark.parametrize("stage", ["init", "log", "finish"])
def test_a_tracker_that_raises_is_survived_with_one_warning_line(stage, monkeypatch, capsys, tmp_path):
    mod = fake_wandb(monkeypatch, fail=stage)
    t = Trackers("wandb", project="p", run_name="r", config={}, out_dir=tmp_path)
    for step in range(1, 4):
        t.log({"train_loss": 1.0 / step}, step=step)
    t.finish({"final_val_loss": 0.3})
    t.finish({"final_val_loss": 0.3})  # idempotent
    lines = warnings_of(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"warning: tracker wandb: {stage}" if stage != "init" else "warning: tracker wandb"
    )
    assert f"{stage} exploded" in lines[0] or stage == "init"
    if stage == "log":
        (run,) = mod.runs
        assert run.logged == [] and run.exit_code == 0, "a run whose log failed is still finished"
        assert run.summary == {}, "no summary for a run that stopped logging midway"


def test_online_start_failure_falls_back_to_offline(monkeypatch, capsys, tmp_path):
    mod = fake_wandb(monkeypatch, online_fails=True)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    t = Trackers("wandb", project="p", run_name="r", config={"a": 1}, out_dir=tmp_path)
    assert [c["mode"] for c in mod.calls] == [None, "offline"]
    assert mod.calls[0]["settings"]["init_timeout"] > 0, "an online start must not wait wandb's 90 s"
    (line,) = warnings_of(capsys)
    assert "logging offline instead" in line and "TimeoutError" in line
    t.log({"train_loss": torch.tensor(2.5)}, step=3)
    t.finish({"final_val_loss": 2.0, "stop_reason": "max_iters", "config": {"nested": {"x": 1}}})
    (run,) = mod.runs
    assert run.logged == [(3, {"train_loss": 2.5})]
    assert run.summary == {"final_val_loss": 2.0, "stop_reason": "max_iters", "config/nested/x": 1}


def test_without_an_api_key_wandb_starts_offline_and_with_one_online(monkeypatch, capsys, tmp_path):
    mod = fake_wandb(monkeypatch)
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    Trackers("wandb", project="p", run_name="r", config={}, out_dir=tmp_path).finish()
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    Trackers("wandb", project="p", run_name="r", config={}, out_dir=tmp_path).finish()
    assert [c["mode"] for c in mod.calls] == ["offline", None]
    assert warnings_of(capsys) == []


def test_wandb_mode_from_the_environment_is_respected(monkeypatch, tmp_path):
    mod = fake_wandb(monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    Trackers("wandb", project="p", run_name="r", config={}, out_dir=tmp_path).finish()
    assert mod.calls[0]["mode"] == "disabled" and mod.calls[0]["dir"] == "/tmp"


def test_leaving_a_with_block_by_an_exception_finishes_the_run_as_failed(monkeypatch, tmp_path):
    mod = fake_wandb(monkeypatch)
    with pytest.raises(ValueError), Trackers("wandb", project="p", run_name="r", config={}, out_dir=tmp_path):
        raise ValueError("training crashed")
    assert mod.runs[0].exit_code == 1
    with Trackers("wandb", project="p", run_name="r", config={}, out_dir=tmp_path) as t:
        t.log({"x": 1.0}, step=1)
    assert mod.runs[1].exit_code == 0
    assert not trackers_module.Trackers._open


def test_tracker_names_and_what_is_logged(monkeypatch, capsys, tmp_path):
    assert parse_tracker_names("none") == []
    assert parse_tracker_names(" wandb, trackio,wandb ,none") == ["wandb", "trackio"]
    assert parse_tracker_names(["trackio"]) == ["trackio"]
    nested = {"a": 1, "b": {"c": torch.tensor(0.5), "d": None}, "e": "text", "f": True, "g": [1, 2]}
    assert flatten_scalars(nested) == {"a": 1, "b/c": 0.5, "f": 1}
    assert flatten_scalars(nested, keep_strings=True)["e"] == "text"
    t = Trackers("none", project="p", run_name="r", config={}, out_dir=tmp_path)
    t.log({"x": 1.0}, step=1)
    t.finish({})
    Trackers("mlflow", project="p", run_name="r", config={}, out_dir=tmp_path).finish()
    (line,) = warnings_of(capsys)
    assert "unknown tracker" in line
