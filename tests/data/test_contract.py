"""Each contract rule, broken on a copy of the tiny world, is reported with file, key and fix."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mmart.data.contract import ContractError, load_contract, validate


def edit(world: Path, table: str, fn) -> None:
    df = pd.read_parquet(world / f"{table}.parquet")
    df = fn(df)
    df.to_parquet(world / f"{table}.parquet", index=False)


def rules(problems) -> set[str]:
    return {p.rule for p in problems}


def only(problems, rule: str):
    hits = [p for p in problems if p.rule == rule]
    assert hits, f"rule {rule} not reported; got {[str(p) for p in problems]}"
    return hits


def test_valid_world_has_no_problems(world_copy):
    assert validate(world_copy) == []


def test_missing_table(world_copy):
    (world_copy / "users.parquet").unlink()
    (p,) = only(validate(world_copy), "tables")
    assert p.file == "users.parquet" and "missing" in p.message


def test_missing_column(world_copy):
    edit(world_copy, "impressions", lambda d: d.drop(columns=["propensity"]))
    (p,) = only(validate(world_copy), "schema")
    assert p.file == "impressions.parquet" and "propensity" in p.key


def test_wrong_type(world_copy):
    edit(world_copy, "titles", lambda d: d.assign(genres=d.genres.map(lambda g: ",".join(g))))
    p = only(validate(world_copy), "schema")[0]
    assert p.file == "titles.parquet" and p.key.startswith("title_id=") and "genres" in p.message


def test_duplicate_ids(world_copy):
    edit(world_copy, "titles", lambda d: pd.concat([d, d.iloc[[0]]]))
    (p,) = only(validate(world_copy), "unique-ids")
    assert p.file == "titles.parquet" and p.key == "title_id=t0000"


def test_dangling_foreign_keys(world_copy):
    edit(world_copy, "impressions", lambda d: d.assign(user_id=d.user_id.where(d.index != 0, "ghost")))
    edit(world_copy, "artworks", lambda d: d.assign(title_id=d.title_id.where(d.index != 0, "t9999")))
    problems = only(validate(world_copy), "foreign-keys")
    text = " ".join(str(p) for p in problems)
    assert "'ghost' is not in users.parquet" in text
    assert "'t9999' is not in titles.parquet" in text


def test_shown_artwork_of_another_title(world_copy):
    imps = pd.read_parquet(world_copy / "impressions.parquet")
    arts = pd.read_parquet(world_copy / "artworks.parquet")
    other = arts[arts.title_id != imps.title_id[0]].artwork_id.iloc[0]
    edit(world_copy, "impressions", lambda d: d.assign(shown_artwork_id=d.shown_artwork_id.where(d.index != 0, other)))
    p = only(validate(world_copy), "foreign-keys")[0]
    assert p.key == f"impression_id={imps.impression_id[0]}" and "belongs to title" in p.message


def test_history_artwork_must_exist(world_copy):
    def break_history(d):
        h = list(d.history[0])
        h[0] = {**h[0], "artwork_id": "nope"}
        d.at[0, "history"] = h
        return d

    edit(world_copy, "users", break_history)
    p = only(validate(world_copy), "foreign-keys")[0]
    assert p.file == "users.parquet" and "history[0]" in p.key and "'nope'" in p.message


def test_title_needs_two_artworks(world_copy):
    edit(world_copy, "artworks", lambda d: d[~((d.title_id == "t0003") & (d.artwork_id != "t0003_a0"))])
    edit(world_copy, "impressions", lambda d: d[d.title_id != "t0003"])
    edit(world_copy, "users", lambda d: d.assign(history=d.history.map(lambda h: [e for e in h if e["title_id"] != "t0003"])))
    (p,) = only(validate(world_copy), "artworks-per-title")
    assert p.key == "title_id=t0003" and "1 artwork" in p.message


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.2])
def test_propensity_range(world_copy, bad):
    edit(world_copy, "impressions", lambda d: d.assign(propensity=d.propensity.where(d.index != 2, bad)))
    (p,) = only(validate(world_copy), "propensity")
    assert p.key.startswith("impression_id=") and "(0, 1]" in p.message


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.png", "images/../../outside.png", "images/missing.png"])
def test_image_paths_stay_inside_and_exist(world_copy, path):
    (world_copy.parent / "outside.png").write_bytes(b"x")
    edit(world_copy, "artworks", lambda d: d.assign(path=d.path.where(d.index != 0, path)))
    (p,) = only(validate(world_copy), "paths")
    assert p.key == "artwork_id=t0000_a0"


def test_symlink_out_of_the_folder_is_refused(world_copy, tmp_path):
    (tmp_path / "secret.png").write_bytes(b"x")
    (world_copy / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    edit(world_copy, "artworks", lambda d: d.assign(path=d.path.where(d.index != 0, "images/link.png")))
    (p,) = only(validate(world_copy), "paths")
    assert "escapes" in p.message
    with pytest.raises(ContractError):
        load_contract(world_copy, check=False).image_path("images/link.png")


def test_history_from_the_future_is_leakage(world_copy):
    imps = pd.read_parquet(world_copy / "impressions.parquet")
    uid = imps.user_id[0]
    late = int(imps[imps.user_id == uid].timestamp.min()) + 10

    def leak(d):
        i = d.index[d.user_id == uid][0]
        h = list(d.history[i])
        h.append({**h[-1], "timestamp": late})
        d.at[i, "history"] = h
        return d

    edit(world_copy, "users", leak)
    (p,) = only(validate(world_copy), "leakage")
    assert p.key.startswith(f"user_id={uid}") and "not older than impression" in p.message


def test_pair_in_two_splits(world_copy):
    imps = pd.read_parquet(world_copy / "impressions.parquet")
    pair = imps[imps.split == "train"].iloc[0]
    extra = pair.copy()
    extra["impression_id"], extra["split"] = "i_extra", "test"
    edit(world_copy, "impressions", lambda d: pd.concat([d, extra.to_frame().T.astype(d.dtypes)], ignore_index=True))
    (p,) = only(validate(world_copy), "split-overlap")
    assert p.key == f"user_id={pair.user_id}, title_id={pair.title_id}"


def test_all_problems_reported_at_once(world_copy):
    edit(world_copy, "impressions", lambda d: d.assign(propensity=d.propensity.where(d.index > 2, 2.0)))
    edit(world_copy, "titles", lambda d: pd.concat([d, d.iloc[[1]]]))
    problems = validate(world_copy)
    assert {"propensity", "unique-ids"} <= rules(problems)
    assert len([p for p in problems if p.rule == "propensity"]) == 3
    with pytest.raises(ContractError) as e:
        load_contract(world_copy)
    assert "propensity" in str(e.value) and "Fix:" in str(e.value)


def test_cli_validate_exit_codes(world_copy, capsys):
    from mmart.cli import main

    assert main(["validate", str(world_copy)]) == 0
    edit(world_copy, "impressions", lambda d: d.assign(propensity=d.propensity.where(d.index != 0, 0.0)))
    assert main(["validate", str(world_copy)]) == 1
    err = capsys.readouterr().err
    assert "impressions.parquet" in err and "impression_id=" in err and "Fix:" in err


def test_missing_folder_is_a_clear_error(tmp_path):
    from mmart.errors import UserError

    with pytest.raises(UserError, match="mmart world"):
        load_contract(tmp_path / "nope")
    assert validate(tmp_path / "nope")[0].rule == "tables"


def test_artwork_images_decode_through_datasets(tiny_world):
    images = load_contract(tiny_world).artwork_images()
    first = images[0]
    assert first["image"].size == (96, 128)
    assert first["artwork_id"] == "t0000_a0"


# --- Issue 12 (items 7, 8, 9): nothing to train or evaluate on, and inputs that used to traceback ---------------


@pytest.mark.parametrize("keep, rule_text", [
    (lambda d: d.iloc[0:0], "train split has no played impressions"),
    (lambda d: d.assign(played=False), "train split has no played impressions"),
    (lambda d: d[d.split != "test"], "test split has no impressions"),
])
def test_splits_with_nothing_to_train_or_evaluate_on(world_copy, keep, rule_text, capsys):
    from mmart.cli import main

    edit(world_copy, "impressions", keep)
    problems = only(validate(world_copy), "splits")
    assert any(rule_text in p.message for p in problems)
    assert main(["validate", str(world_copy)]) == 1
    assert rule_text in capsys.readouterr().err


def test_empty_impressions_table_lists_both_splits(world_copy):
    edit(world_copy, "impressions", lambda d: d.iloc[0:0])
    keys = {p.key for p in only(validate(world_copy), "splits")}
    assert keys == {"split=train", "split=test"}


def _symlink_loop(world: Path) -> str:
    (world / "images" / "loop_a.png").symlink_to("loop_b.png")
    (world / "images" / "loop_b.png").symlink_to("loop_a.png")
    return "images/loop_a.png"


def _fifo(world: Path) -> str:
    import os

    os.mkfifo(world / "images" / "fifo.png")
    return "images/fifo.png"


@pytest.mark.parametrize("make_path, message", [
    (lambda w: "images/t0000\x00_a0.png", "NUL byte"),
    (_symlink_loop, "symlink loop"),
    (lambda w: "images/" + "x" * 4993 + ".png", "too long (5004 characters"),
    (lambda w: "/".join(["images"] + ["d"] * 2100) + "/a.png", "too long"),
    (_fifo, "not a regular file"),
    (lambda w: "images", "directory"),
])
def test_unusable_paths_are_problems_not_tracebacks(world_copy, make_path, message, capsys):
    """Reported with the reason; the ones that cannot be a path at all are refused by ``image_path`` too."""
    from mmart.cli import main

    path = make_path(world_copy)
    edit(world_copy, "artworks", lambda d: d.assign(path=d.path.where(d.index != 0, path)))
    (p,) = only(validate(world_copy), "paths")
    assert p.key == "artwork_id=t0000_a0" and message in p.message and len(str(p)) < 400
    assert main(["validate", str(world_copy)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    contract = load_contract(world_copy, check=False)
    if message in ("not a regular file", "directory"):  # a path, just not an image: the image opener refuses it
        assert contract.image_path(path).name in ("fifo.png", "images")
    else:  # what review and the cache ask: a clear refusal, never ValueError/OSError
        with pytest.raises(ContractError, match=message.split(" (")[0]):
            contract.image_path(path)


@pytest.mark.parametrize("retype", [
    lambda t: t.astype(str).where(t.index != 4, "yesterday"),  # a string column, one not even a number
    lambda t: t.astype(float).where(t.index != 4, float("nan")),  # a float column with a NaN
])
def test_timestamp_of_the_wrong_type_is_a_problem(world_copy, retype):
    edit(world_copy, "impressions", lambda d: d.assign(timestamp=retype(d.timestamp)))
    problems = only(validate(world_copy), "schema")
    assert any("'timestamp'" in p.message and p.file == "impressions.parquet" for p in problems)
