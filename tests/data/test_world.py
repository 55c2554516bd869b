"""The demo world: contract-valid, deterministic, and a fair test (artworks matter, floors hold)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mmart.config import CONFIG_ROOT, load_config
from mmart.data.contract import load_contract, validate
from mmart.data.world import WorldConfig, generate_world


def test_tiny_world_is_contract_valid(tiny_world):
    assert validate(tiny_world) == []
    contract = load_contract(tiny_world)
    assert len(contract.titles) == 24
    assert len(contract.artworks) == 24 * 3
    for name in ("oracle.parquet", "world_summary.json", "contact_sheet.png"):
        assert (tiny_world / name).is_file()


def test_same_seed_gives_identical_bytes(tiny_world, tiny_world_cfg, tmp_path):
    generate_world(tiny_world_cfg, tmp_path / "again", progress=False)
    for name in ("titles", "artworks", "users", "impressions", "oracle"):
        assert (tiny_world / f"{name}.parquet").read_bytes() == (tmp_path / "again" / f"{name}.parquet").read_bytes()
    first = sorted(p.name for p in (tiny_world / "images").iterdir())
    assert first == sorted(p.name for p in (tmp_path / "again" / "images").iterdir())
    assert (tiny_world / "images" / first[0]).read_bytes() == (tmp_path / "again" / "images" / first[0]).read_bytes()


def test_other_seed_gives_another_world(tiny_world, tiny_world_cfg, tmp_path):
    from dataclasses import replace

    generate_world(replace(tiny_world_cfg, seed=1), tmp_path / "other", progress=False)
    assert (tiny_world / "users.parquet").read_bytes() != (tmp_path / "other" / "users.parquet").read_bytes()


def test_oracle_is_beside_the_contract_and_covers_every_pair(tiny_world):
    oracle = pd.read_parquet(tiny_world / "oracle.parquet")
    imps = pd.read_parquet(tiny_world / "impressions.parquet")
    arts = pd.read_parquet(tiny_world / "artworks.parquet")
    assert "p_play" not in imps.columns and "p_play" not in arts.columns
    pairs = set(zip(imps.user_id, imps.title_id))
    assert pairs == set(zip(oracle.user_id, oracle.title_id))
    per_pair = oracle.groupby(["user_id", "title_id"]).size()
    assert (per_pair == 3).all()
    assert oracle.p_play.between(0, 1).all()
    assert oracle.groupby(["user_id", "title_id"]).production_prob.sum().round(9).eq(1).all()


def test_taste_oracle_is_the_play_probability_without_the_noise(tiny_world, tiny_world_cfg, tmp_path):
    from dataclasses import replace

    oracle = pd.read_parquet(tiny_world / "oracle.parquet")
    assert oracle.p_taste.between(0, 1).all() and not (oracle.p_taste == oracle.p_play).all()
    summary = json.loads((tiny_world / "world_summary.json").read_text())["test_policy_values"]
    assert summary["random"] < summary["taste_oracle"] <= summary["oracle"]
    # Without the noise term the two coincide, and every table is as it was: p_taste draws no random number.
    generate_world(replace(tiny_world_cfg, noise_std=0.0), tmp_path / "quiet", progress=False)
    quiet = pd.read_parquet(tmp_path / "quiet" / "oracle.parquet")
    assert (quiet.p_taste - quiet.p_play).abs().max() < 1e-12
    for name in ("titles", "artworks"):
        assert (tiny_world / f"{name}.parquet").read_bytes() == (tmp_path / "quiet" / f"{name}.parquet").read_bytes()


def test_new_titles_are_in_no_training_decision(tiny_world):
    from mmart.eval.policies import new_titles

    held = set(json.loads((tiny_world / "new_titles.json").read_text())["title_ids"])
    assert len(held) == 1  # 3% of 24 titles, at least one
    imps = pd.read_parquet(tiny_world / "impressions.parquet")
    users = pd.read_parquet(tiny_world / "users.parquet")
    on_held = imps[imps.title_id.isin(held)]
    assert len(on_held) and set(on_held.split) == {"test"}
    assert not held & {e["title_id"] for h in users.history for e in h}
    assert new_titles(load_contract(tiny_world, check=False)) == held  # what the report computes from the tables


def test_holding_titles_out_disturbs_nothing_else(tiny_world, tiny_world_cfg, tmp_path):
    """The held-out titles draw from their own stream: without them, the same members watch and are shown the
    same titles with the same true play probabilities; only the held-out titles' traces move."""
    from dataclasses import replace

    generate_world(replace(tiny_world_cfg, new_title_fraction=0.0), tmp_path / "none", progress=False)
    assert not json.loads((tmp_path / "none" / "new_titles.json").read_text())["title_ids"]
    held = set(json.loads((tiny_world / "new_titles.json").read_text())["title_ids"])
    for name in ("titles", "artworks"):
        assert (tiny_world / f"{name}.parquet").read_bytes() == (tmp_path / "none" / f"{name}.parquet").read_bytes()
    key = ["user_id", "title_id", "artwork_id"]
    with_held = pd.read_parquet(tiny_world / "oracle.parquet").sort_values(key).reset_index(drop=True)
    without = pd.read_parquet(tmp_path / "none" / "oracle.parquet").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(with_held[key + ["p_play", "p_taste"]], without[key + ["p_play", "p_taste"]])
    moved = with_held.split != without.split
    assert with_held.title_id[moved].isin(held).all()
    strip = lambda h: [dict(e) for e in h if e["title_id"] not in held]  # noqa: E731
    users = pd.read_parquet(tiny_world / "users.parquet"), pd.read_parquet(tmp_path / "none" / "users.parquet")
    assert [strip(h) for h in users[0].history] == [strip(h) for h in users[1].history]


def test_logged_propensities_match_the_logging_policy(tiny_world, tiny_world_cfg):
    imps = pd.read_parquet(tiny_world / "impressions.parquet")
    oracle = pd.read_parquet(tiny_world / "oracle.parquet")
    merged = imps.merge(oracle, left_on=["user_id", "title_id", "shown_artwork_id"],
                        right_on=["user_id", "title_id", "artwork_id"])
    prod = merged[merged.logging_policy == "production"]
    assert (prod.propensity - prod.production_prob).abs().max() < 1e-12
    uni = merged[merged.logging_policy == "uniform"]
    assert len(uni) and (uni.propensity == 1 / tiny_world_cfg.artworks_per_title).all()
    assert set(uni.split_x) == {"test"}
    assert imps.propensity.min() >= tiny_world_cfg.propensity_floor


def test_history_reveals_taste(tiny_world):
    """Ratings follow affinity and most history events record the artwork played from."""
    users = pd.read_parquet(tiny_world / "users.parquet")
    events = [e for h in users.history for e in h]
    assert {e["rating"] for e in events} <= {1, 2, 3, 4, 5}
    assert len({e["rating"] for e in events}) >= 3
    known = sum(e["artwork_id"] is not None for e in events) / len(events)
    assert 0.6 < known < 0.95


def test_summary_printed_by_cli(tmp_path, capsys):
    from mmart.cli import main

    assert main(["world", "--config", str(CONFIG_ROOT / "world" / "tiny.yaml"), "--out", str(tmp_path / "w"),
                 "--no-progress", "--set", "num_members=20"]) == 0
    out = capsys.readouterr().out
    assert "test_mean_best_minus_worst_gap" in out
    summary = json.loads((tmp_path / "w" / "world_summary.json").read_text())
    assert summary["sizes"]["members"] == 20


def test_impossible_sizes_are_refused(tmp_path):
    from mmart.errors import UserError

    cfg = WorldConfig(num_titles=10, history_length=[8, 30], pairs_per_member=[3, 6])
    with pytest.raises(UserError, match="exceeds num_titles"):
        generate_world(cfg, tmp_path / "w", progress=False)


@pytest.mark.slow
def test_default_world_is_a_fair_test(tmp_path):
    """The issue's bars on the default preset: artwork gap, value ordering, floor, random slice."""
    cfg = load_config(WorldConfig, CONFIG_ROOT / "world" / "default.yaml")
    summary = generate_world(cfg, tmp_path / "w", progress=False)
    assert summary["test_mean_best_minus_worst_gap"] >= 0.05
    v = summary["test_policy_values"]
    assert v["oracle"] > v["taste_oracle"] > v["teacher"] > v["production"] > v["random"]
    assert 0.59 < v["taste_oracle"] < 0.61 and 0.5 < v["production"] < 0.51
    assert 300 < summary["sizes"]["new_title_test_pairs"] < 500
    assert summary["min_propensity"] >= cfg.propensity_floor
    assert summary["share_test_pairs_uniform_random"] >= 0.20
    assert summary["share_pairs_with_multiple_impressions"] > 0.1
    assert validate(tmp_path / "w") == []
