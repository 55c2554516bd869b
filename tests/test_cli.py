"""The one CLI: every stage has --help that explains it; user errors print a message, not a traceback."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from mmart.cli import build_parser, main


def test_help_lists_stages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for stage in ("world", "validate"):
        assert stage in out


def test_every_stage_has_a_description():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "stage")
    for name, p in sub.choices.items():
        assert p.description and len(p.description) > 40, f"mmart {name} --help needs a description"


def test_config_error_is_a_message_not_a_traceback(tmp_path):
    bad = tmp_path / "w.yaml"
    bad.write_text("num_titels: 3\n")
    r = subprocess.run([sys.executable, "-m", "mmart.cli", "world", "--config", str(bad), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "did you mean 'num_titles'" in r.stderr and "Traceback" not in r.stderr


def test_help_names_every_stage_in_its_pipeline_line_and_lists_each_with_a_help_line(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "stage")
    names = list(sub.choices)
    assert {"init", "vision", "cache", "export", "config"} <= set(names)
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    listing = out.split("positional arguments:")[1]
    for action in sub._choices_actions:
        assert action.help, f"mmart {action.dest} needs a help line"
        assert f"    {action.dest} " in listing
        assert action.dest in parser.description
    assert names.index("world") < names.index("cache") < names.index("sft") < names.index("eval")


def test_cache_probe_help_prints_a_single_percent_sign(capsys):
    with pytest.raises(SystemExit):
        main(["cache", "probe", "--help"])
    out = capsys.readouterr().out
    assert "seeded 70% of" in out and "%%" not in out


def test_train_sh_help_prints_the_usage_only():
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(["bash", str(root / "scripts" / "train.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith("The whole mmart pipeline") and "Run as:" in r.stdout
    assert "set -euo" not in r.stdout and "#" not in r.stdout


def test_eval_refuses_a_negative_bootstrap_count(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--data", "d", "--pred", "m=p.parquet", "--out", "o", "--n-boot", "-1"])
    assert e.value.code == 2
    assert "argument --n-boot: must be >= 1, got -1" in capsys.readouterr().err


def _subparsers(parser, path=("mmart",)):
    """(command words, parser) of every subcommand at any depth (mmart cache verify, ...)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, p in action.choices.items():
                yield (*path, name), p
                yield from _subparsers(p, (*path, name))


def test_every_number_on_every_command_line_is_range_checked():
    """A number flag parsed with a bare int/float accepts anything (--max-pairs -3 ran and was recorded)."""
    unchecked = [f"{' '.join(path)} {'/'.join(a.option_strings)}" for path, p in _subparsers(build_parser())
                 for a in p._actions if a.type in (int, float)
                 or (callable(a.type) and getattr(a.type, "__name__", "") in ("int", "float")
                     and not hasattr(a.type, "cli_check"))]
    assert unchecked == []
    checked = [a for _, p in _subparsers(build_parser()) for a in p._actions if hasattr(a.type, "cli_check")]
    assert len(checked) >= 10


@pytest.mark.parametrize("argv, line", [
    (["predict", "--model", "m", "--data", "d", "--out", "o.parquet", "--max-pairs", "-3"],
     "argument --max-pairs: must be >= 0, got -3"),
    (["predict", "--model", "m", "--data", "d", "--out", "o.parquet", "--batch-size", "0"],
     "argument --batch-size: must be >= 1, got 0"),
    (["review", "--data", "d", "--out", "o", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["plan", "--gpu-memory", "0"], "argument --gpu-memory: must be > 0, got 0.0"),
    (["plan", "--gpu-memory", "nan"], "argument --gpu-memory: expected a finite number, got 'nan'"),
    (["cache", "probe", "--seed", "x"], "argument --seed: expected an integer, got 'x'"),
])
def test_an_out_of_range_cli_number_is_refused_naming_flag_value_and_range(argv, line, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(line), err


def test_a_misspelt_config_is_one_line_with_a_suggestion(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "configs/defualt.yaml"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mmart config: error: config 'configs/defualt.yaml' not found")
    assert err.endswith("did you mean 'configs/default.yaml'?")


def test_stages_find_the_shipped_configs_from_another_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "configs/smoke.yaml", "--get", "output_dir"]) == 0
    assert capsys.readouterr().out.strip() == "outputs/smoke"


def test_config_fields_prints_a_section(capsys):
    assert main(["config", "--fields", "sft"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[sft] SFTStageConfig: Supervised fine-tuning.")
    assert "  sft.batch_size: int = 8  [TrainingArguments: per_device_train_batch_size]" in out


def test_sft_with_negative_epochs_fails_before_training(tmp_path, capsys):
    # Today's main saved an untrained model and exited 0.
    rc = main(["sft", "--config", "configs/smoke.yaml", "--set", "sft.epochs=-1", f"output_dir={tmp_path / 'o'}"])
    assert rc == 1
    assert capsys.readouterr().err.strip() == "mmart sft: error: --set: sft.epochs must be > 0, got -1.0"
    assert not (tmp_path / "o").exists()


def test_eval_pred_repeated_keeps_every_model():
    """`--pred a=x --pred b=y` scores both (argparse's nargs="+" alone kept only the last one)."""
    from mmart.cli import build_parser

    args = build_parser().parse_args(["eval", "--data", "d", "--pred", "a=x", "--pred", "b=y", "c=z", "--out", "o"])
    assert args.pred == ["a=x", "b=y", "c=z"]
