"""``mmart world --out`` never deletes a folder's images unless it is empty, an mmart world, or --force (issue 12)."""

from __future__ import annotations

from mmart.cli import main
from mmart.config import CONFIG_ROOT

TINY = ["--config", str(CONFIG_ROOT / "world" / "tiny.yaml"), "--no-progress", "--set", "num_members=20"]


def test_a_used_folder_is_refused_unless_forced(tmp_path, capsys):
    used = tmp_path / "photos"
    (used / "images").mkdir(parents=True)
    (used / "images" / "holiday.png").write_bytes(b"mine")
    assert main(["world", "--out", str(used), *TINY]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(used) in err and "world_summary.json" in err and "--force" in err
    assert (used / "images" / "holiday.png").read_bytes() == b"mine"  # untouched
    assert main(["world", "--out", str(used), *TINY, "--force"]) == 0
    assert not (used / "images" / "holiday.png").exists()


def test_new_empty_or_earlier_world_folders_are_written(tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        assert main(["world", "--out", str(out), *TINY]) == 0
        assert (out / "world_summary.json").is_file()
    assert main(["world", "--out", str(tmp_path / "new"), *TINY, "--set", "seed=1"]) == 0  # an mmart world: rewritten
