"""The one CLI: every stage has --help that explains it; user errors print a message, not a traceback."""

from __future__ import annotations

import subprocess
import sys

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
