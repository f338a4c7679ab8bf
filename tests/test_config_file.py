"""Experiment files (--config FILE.toml): read, override, refuse bad input in one line, replay a run."""

from __future__ import annotations

import pytest
import torch

from gpt2 import config_file
from gpt2.cli import parse
from gpt2.config_file import CONFIG_TOML, flatten, resolve_with_file
from gpt2.trainer.run import train_once
from tests.conftest import as_argv

EXPERIMENT = """\
# a claim would go here
[model]
model-name = "tiny"
n_layer = 2

[optim]
learning-rate = 3e-4
optimizer = "adamwspam"
spam-interval = 500

[train]
max-iters = 40
"""


def write(tmp_path, text: str):
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_file_settings_apply_and_flags_override_them(tmp_path) -> None:
    path = write(tmp_path, EXPERIMENT)
    cfg = parse(["--config", str(path), "--max-iters", "12", "--output-dir", str(tmp_path / "o")])
    assert (cfg.model.model_name, cfg.model.n_layer, cfg.optim.learning_rate) == ("tiny", 2, 3e-4)
    assert cfg.optim.spam_interval == 500 and cfg.train.max_iters == 12  # the flag wins over the file
    assert {"learning_rate", "spam_interval", "max_iters"} <= set(cfg.explicit)


def test_ablate_in_a_file_takes_a_list_of_axes_like_the_repeated_flag(tmp_path) -> None:
    path = write(tmp_path, '[ablation]\nablate = ["optimizer=adamw,muon", "learning-rate=1e-3,2e-3"]\n')
    from_file = parse(["--config", str(path)])
    from_flags = parse(["--ablate", "optimizer=adamw,muon", "--ablate", "learning-rate=1e-3,2e-3"])
    both = "optimizer=adamw,muon; learning-rate=1e-3,2e-3"
    assert from_file.ablation.ablate == from_flags.ablation.ablate == both


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[optim]\nlerning-rate = 1e-3\n", "unknown key [optim] lerning-rate"),
        ("[optimizer]\nlr = 1\n", "unknown section [optimizer]"),
        ("[optim]\nlearning-rate = '1e-3'\n", "[optim] learning-rate must be float, got str"),
        ("[data]\nbatch-size = 2.5\n", "[data] batch-size must be int, got float"),
        ("[model]\ncompile = 1\n", "[model] compile must be bool, got int"),
        ("[data]\nbatch-size = 0\n", "--batch-size must be positive, got 0"),
        ("[data]\nlearning-rate = 1e-3\n", "[data] learning-rate belongs in [optim]"),
        ("[optim\n", "not valid TOML"),
        ("[ablation]\nablate = ['optimizer=adamw', 3]\n", "[ablation] ablate must be str, got int"),
        ("[ablation]\nablate = []\n", "[ablation] ablate is an empty list"),
    ],
)
def test_bad_files_give_one_line_naming_the_file_and_exit_2(tmp_path, capsys, text, message) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SystemExit) as e:
        parse(["--config", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and message in err, err


def test_missing_file_is_one_line(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        parse(["--config", str(tmp_path / "nope.toml")])
    assert e.value.code == 2 and "cannot read" in capsys.readouterr().err


def test_written_config_resolves_to_the_same_configuration(tmp_path) -> None:
    """Derived values (min-lr, the ramp end, the bitter3 step bump) are not applied twice."""
    cfg = parse(
        [
            "--model-name", "tiny", "--optimizer", "adamwprune", "--pruning-method", "state",
            "--adamwprune-variant", "bitter3", "--learning-rate", "1e-3", "--output-dir", str(tmp_path / "a"),
        ]
    )  # fmt: skip
    assert cfg.train.max_iters == 13000  # 10000 x 1.3, the variant's recipe
    path = config_file.write(cfg, tmp_path / CONFIG_TOML)
    again = resolve_with_file(path, {})
    assert flatten(again) == flatten(cfg) and set(again.explicit) == set(cfg.explicit)
    edited = path.read_text().replace("min-lr = 0.0001", "min-lr = 0.0002")
    path.write_text(edited)
    assert resolve_with_file(path, {}).optim.min_lr == 2e-4  # an edited derived value is an input
    override = resolve_with_file(path, {"learning_rate": 2e-3})
    assert override.optim.learning_rate == 2e-3 and override.optim.min_lr == 2e-4


def test_replaying_a_runs_config_gives_bitwise_the_same_weights(tiny_flags, tmp_path) -> None:
    flags = tiny_flags | dict(save_checkpoint=True, dropout=0.1, architecture="unified-ra", ra_step="V2")
    first = train_once(parse(as_argv(flags)))
    written = tmp_path / "out" / CONFIG_TOML
    assert written.exists() and "[run]" in written.read_text()
    replay = parse(["--config", str(written), "--output-dir", str(tmp_path / "replay")])
    second = train_once(replay)
    assert second["final_val_loss"] == first["final_val_loss"]
    a = torch.load(tmp_path / "out" / "checkpoint_last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "replay" / "checkpoint_last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_flag_after_a_written_config_rederives_what_depends_on_it(tmp_path) -> None:
    base = ["--model-name", "gpt2", "--output-dir", str(tmp_path / "a")]
    cfg = parse([*base, "--pruning-method", "magnitude", "--max-iters", "1000", "--pruning-warmup", "100"])
    path = config_file.write(cfg, tmp_path / CONFIG_TOML)
    assert resolve_with_file(path, {"weight_decay": 0.05}).optim.adamwprune_weight_decay == 0.05
    assert resolve_with_file(path, {"max_iters": 2000}).pruning.pruning_ramp_end == 1600  # 0.8 x max-iters
    longer = resolve_with_file(path, {"max_iters": 2000})
    fresh = parse([*base, "--pruning-method", "magnitude", "--max-iters", "2000", "--pruning-warmup", "100"])
    assert flatten(longer) == flatten(fresh)
