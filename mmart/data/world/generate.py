"""Generate the demo world: tables (the contract), rendered artworks, oracle, summary, contact sheet.

Run as: ``mmart world --config configs/world/default.yaml --out data/world``
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from mmart.config import to_dict
from mmart.data.world import simulate as sim
from mmart.data.world.config import WorldConfig
from mmart.data.world.render import ArtworkSpec, contact_sheet, render_artwork
from mmart.data.world.themes import THEMES
from mmart.errors import UserError

DAY = 86_400
T0 = 1_600_000_000  # history starts here; impressions start HISTORY_DAYS later
HISTORY_DAYS, IMPRESSION_DAYS = 300, 60
STYLE_TAGS = (("close-up", "group"), ("bright", "dark"), ("large", "small"))

NEW_TITLES_FILE = "new_titles.json"  # beside the tables: the titles held out of every training decision
NEW_TITLE_STREAM = 0x6E6577  # the held-out titles draw from their own stream: the main one stays as it was

HISTORY_TYPE = pa.list_(pa.struct([("title_id", pa.string()), ("rating", pa.int64()),
                                   ("artwork_id", pa.string()), ("timestamp", pa.int64())]))


def _ids(prefix: str, n: int) -> list[str]:
    width = max(4, len(str(n - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def _title_text(cfg: WorldConfig, catalog: sim.Catalog, rng: np.random.Generator):
    names, synopses, genres = [], [], []
    for themes in catalog.title_themes:
        main = THEMES[cfg.themes[themes[0]]]
        second = THEMES[cfg.themes[themes[-1]]]
        if rng.random() < 0.5:
            names.append(f"The {rng.choice(main.adjectives)} {rng.choice(second.nouns)}")
        else:
            names.append(f"{rng.choice(main.nouns)} of the {rng.choice(second.adjectives)} {rng.choice(main.nouns)}")
        parts = [str(rng.choice(THEMES[cfg.themes[k]].premise)) for k in themes]
        synopses.append(("When " + parts[0] + ", " + "; meanwhile ".join(parts[1:]) + ".") if len(parts) > 1
                        else parts[0].capitalize() + ".")
        genres.append([cfg.themes[k] for k in themes])
    return names, synopses, genres


def _render_one(args: tuple[ArtworkSpec, int, int, str]) -> None:
    spec, w, h, path = args
    render_artwork(spec, w, h).save(path, format="PNG", optimize=False)


def _write(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def new_titles(cfg: WorldConfig) -> np.ndarray:
    """Which titles are held out of every training decision: a bool per title, from its own RNG stream."""
    is_new = np.zeros(cfg.num_titles, dtype=bool)
    if cfg.new_title_fraction > 0:
        k = max(1, round(cfg.new_title_fraction * cfg.num_titles))
        is_new[np.random.default_rng([cfg.seed, NEW_TITLE_STREAM]).choice(cfg.num_titles, k, replace=False)] = True
    return is_new


def _gumbel_topk(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sample k items per row without replacement, proportional to exp(score): [rows, k]."""
    g = scores + rng.gumbel(size=scores.shape)
    top = np.argpartition(-g, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(g, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


@dataclass
class _Draws:
    """Who watched and was shown what: the member-by-title draws every later table reads."""
    hist_user: np.ndarray  # [events] member index of each history event
    hist_title: np.ndarray  # [events] title index
    pair_user: np.ndarray  # [pairs] member index of each impression pair
    pair_title: np.ndarray  # [pairs] title index


def generate_world(cfg: WorldConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Every table of the world from one random stream, drawn in a fixed order (each step below draws in turn, so
    reordering the steps would change every world): catalog, who watched and was shown what, histories,
    impressions, the oracle; then the files."""
    start = time.perf_counter()
    out = Path(out_dir)
    _check_sizes(cfg)
    is_new = new_titles(cfg)
    rng = np.random.default_rng(cfg.seed)
    catalog = sim.sample_catalog(cfg, rng)
    members = sim.sample_members(cfg, rng)
    title_ids, user_ids = _ids("t", cfg.num_titles), _ids("u", cfg.num_members)
    art_ids = [[f"{tid}_a{j}" for j in range(cfg.artworks_per_title)] for tid in title_ids]

    titles_tbl, artworks_tbl, specs = _catalog_tables(cfg, catalog, rng, title_ids, art_ids)
    draws = _draw_titles(cfg, members, catalog, rng)
    users_tbl, kept, genre_share = _histories(cfg, members, catalog, rng, draws, is_new, title_ids, art_ids, user_ids)
    imp = _impressions(cfg, members, catalog, rng, draws, is_new, genre_share)
    imp_tbl = _impressions_table(imp, draws, title_ids, user_ids, art_ids)
    oracle_tbl = _oracle_table(cfg, imp, draws, title_ids, user_ids, art_ids)

    _write_world(cfg, out, specs, artworks_tbl, progress,
                 {"titles": titles_tbl, "artworks": artworks_tbl, "users": users_tbl, "impressions": imp_tbl,
                  "oracle": oracle_tbl})
    (out / NEW_TITLES_FILE).write_text(json.dumps({
        "about": "titles held out of every training decision (new_title_fraction): no train or val pair, "
                 "in no member's history; all their pairs are test pairs",
        "title_ids": [title_ids[t] for t in np.flatnonzero(is_new)]}, indent=1) + "\n")

    summary = _summary(cfg, imp.p_play, imp.p_taste, imp.prod, imp.split, imp.uniform, draws.pair_title,
                       imp.pair_i, imp.shown, imp.played, imp.logging)
    summary["sizes"].update({"titles": cfg.num_titles, "artworks": len(artworks_tbl), "members": cfg.num_members,
                             "history_events": int(kept.sum()), "new_titles": int(is_new.sum()),
                             "new_title_test_pairs": int(is_new[draws.pair_title].sum())})
    test = imp.split == "test"
    summary["test_policy_values"]["teacher"] = _teacher_value(
        out, [user_ids[u] for u in draws.pair_user[test]], [art_ids[t] for t in draws.pair_title[test]],
        imp.p_play[test])
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["config"] = to_dict(cfg)
    (out / "world_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _contact_sheet(cfg, catalog, specs, out)
    return summary


def _check_sizes(cfg: WorldConfig) -> None:
    h_hi, p_hi = cfg.history_length[1], cfg.pairs_per_member[1]
    if h_hi + p_hi > cfg.num_titles:
        raise UserError(f"history_length max ({h_hi}) + pairs_per_member max ({p_hi}) exceeds num_titles "
                        f"({cfg.num_titles}): a member cannot watch and be shown that many distinct titles")


def _catalog_tables(cfg: WorldConfig, catalog: sim.Catalog, rng: np.random.Generator, title_ids: list[str],
                    art_ids: list[list[str]]) -> tuple[pa.Table, pa.Table, list[ArtworkSpec]]:
    """The titles and artworks tables, and what to render for each artwork (same order as the table)."""
    names, synopses, genres = _title_text(cfg, catalog, rng)
    years = rng.integers(1970, 2026, cfg.num_titles)
    titles_tbl = pa.table({"title_id": title_ids, "name": names, "genres": genres, "synopsis": synopses,
                           "year": pa.array(years, pa.int64())})
    art_rows, specs = [], []
    for t in range(cfg.num_titles):
        for j in range(cfg.artworks_per_title):
            theme = cfg.themes[catalog.art_theme[t, j]]
            style = catalog.art_style[t, j] > 0
            tags = [f"theme:{theme}"] + [f"{kind}:{pair[0] if on else pair[1]}"
                                         for kind, pair, on in zip(("shot", "tone", "title"), STYLE_TAGS, style)]
            shot = "a close-up of one face" if style[0] else "a group of people"
            caption = f"A {theme} artwork: {shot}."  # lossy on purpose: no tone, no title size
            aid = art_ids[t][j]
            art_rows.append((aid, title_ids[t], f"images/{aid}.png", tags, caption))
            specs.append(ArtworkSpec(theme, bool(style[0]), bool(style[1]), bool(style[2]), names[t],
                                     seed=int(cfg.seed * 1_000_003 + t * 8 + j)))
    artworks_tbl = pa.table({k: [r[i] for r in art_rows] for i, k in
                             enumerate(("artwork_id", "title_id", "path", "tags", "caption"))})
    return titles_tbl, artworks_tbl, specs


def _draw_titles(cfg: WorldConfig, members: sim.Members, catalog: sim.Catalog,
                 rng: np.random.Generator) -> _Draws:
    """Each member's watched titles and impression-pair titles, distinct, drawn by affinity and popularity."""
    h_lo, h_hi = cfg.history_length
    p_lo, p_hi = cfg.pairs_per_member
    h_len = rng.integers(h_lo, h_hi + 1, cfg.num_members)
    n_pairs = rng.integers(p_lo, p_hi + 1, cfg.num_members)
    hist_user, hist_title, pair_user, pair_title = [], [], [], []
    chunk = max(1, 2_000_000 // cfg.num_titles)
    all_titles = np.arange(cfg.num_titles)
    for s in range(0, cfg.num_members, chunk):
        users = np.arange(s, min(s + chunk, cfg.num_members))
        aff = len(cfg.themes) * members.theme_pref[users] @ catalog.title_mix.T - 1.0
        picks = _gumbel_topk(aff + 0.5 * catalog.popularity[all_titles][None, :], h_hi + p_hi, rng)
        for row, u in enumerate(users):
            chosen = picks[row, : h_len[u] + n_pairs[u]][rng.permutation(h_len[u] + n_pairs[u])]
            hist_user.append(np.full(h_len[u], u)); hist_title.append(chosen[: h_len[u]])
            pair_user.append(np.full(n_pairs[u], u)); pair_title.append(chosen[h_len[u]:])
    return _Draws(np.concatenate(hist_user), np.concatenate(hist_title), np.concatenate(pair_user),
                  np.concatenate(pair_title))


def _histories(cfg: WorldConfig, members: sim.Members, catalog: sim.Catalog, rng: np.random.Generator,
               draws: _Draws, is_new: np.ndarray, title_ids: list[str], art_ids: list[list[str]],
               user_ids: list[str]) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """The users table (ratings from affinity; the artwork played from, chosen by the play model itself), which
    history events were kept, and each member's genre shares (what production reads from the history)."""
    hist_user, hist_title = draws.hist_user, draws.hist_title
    hist_logits = sim.play_logits(cfg, members, catalog, hist_user, hist_title,
                                  rng.normal(0, cfg.noise_std, (len(hist_user), cfg.artworks_per_title)))
    hist_p = sim.sigmoid(hist_logits)
    hist_choice = (hist_p.cumsum(1) / hist_p.sum(1, keepdims=True) > rng.random((len(hist_user), 1))).argmax(1)
    hist_aff = sim.affinity(cfg, members, catalog, hist_user, hist_title)
    ratings = np.clip(np.rint(2.6 + 0.8 * hist_aff + rng.normal(0, 0.8, len(hist_user))), 1, 5).astype(int)
    known = rng.random(len(hist_user)) < cfg.history_artwork_known
    hist_ts = T0 + rng.integers(0, HISTORY_DAYS * DAY, len(hist_user))
    # Held-out titles leave no trace in any history. Their events are dropped only now, after every draw,
    # so the main random stream (and so every other event and impression) is the same as without them.
    kept = ~is_new[hist_title]
    histories: list[list[dict]] = [[] for _ in range(cfg.num_members)]
    for i in np.lexsort((hist_ts, hist_user)):
        if not kept[i]:
            continue
        u, t = int(hist_user[i]), int(hist_title[i])
        histories[u].append({"title_id": title_ids[t], "rating": int(ratings[i]),
                             "artwork_id": art_ids[t][hist_choice[i]] if known[i] else None,
                             "timestamp": int(hist_ts[i])})
    users_tbl = pa.table({"user_id": user_ids, "history": pa.array(histories, HISTORY_TYPE)})
    genre_counts = np.zeros((cfg.num_members, len(cfg.themes)))
    np.add.at(genre_counts, hist_user[kept], (catalog.title_mix[hist_title[kept]] > 0).astype(float))
    genre_share = genre_counts / np.maximum(np.bincount(hist_user[kept], minlength=cfg.num_members), 1)[:, None]
    return users_tbl, kept, genre_share


@dataclass
class _Impressions:
    """Per pair ([pairs] or [pairs, artworks]) and per logged impression ([impressions], sorted by pair, round)."""
    split: np.ndarray
    uniform: np.ndarray
    p_play: np.ndarray
    p_taste: np.ndarray
    prod: np.ndarray
    logging: np.ndarray
    pair_ts: np.ndarray
    pair_i: np.ndarray  # [impressions] the pair each impression belongs to
    rnd: np.ndarray  # [impressions] its round within the pair
    shown: np.ndarray
    propensity: np.ndarray
    played: np.ndarray


def _impressions(cfg: WorldConfig, members: sim.Members, catalog: sim.Catalog, rng: np.random.Generator,
                 draws: _Draws, is_new: np.ndarray, genre_share: np.ndarray) -> _Impressions:
    """Splits, the logging policy, and the rounds of impressions of each pair until a play or a stop."""
    pair_user, pair_title, a_per = draws.pair_user, draws.pair_title, cfg.artworks_per_title
    n = len(pair_user)
    u_split = rng.random(n)
    split = np.where(u_split < cfg.test_fraction, "test", np.where(u_split < cfg.test_fraction + cfg.val_fraction, "val", "train"))
    split = np.where(is_new[pair_title], "test", split)  # a held-out title is never trained (or validated) on
    uniform = (split == "test") & (rng.random(n) < cfg.random_slice_fraction)
    p_play = sim.sigmoid(sim.play_logits(cfg, members, catalog, pair_user, pair_title,
                                         rng.normal(0, cfg.noise_std, (n, a_per))))
    # The taste oracle's view: the same play probability without the per member-artwork noise that no
    # model can learn (computed, not drawn: the random stream is untouched).
    p_taste = sim.sigmoid(sim.play_logits(cfg, members, catalog, pair_user, pair_title, np.zeros((n, a_per))))
    prod = sim.production_probs(cfg, catalog, pair_title, genre_share[pair_user])
    logging = np.where(uniform[:, None], 1.0 / a_per, prod)
    pair_ts = T0 + HISTORY_DAYS * DAY + rng.integers(0, IMPRESSION_DAYS * DAY, n)
    rows = {k: [] for k in ("pair", "round", "shown", "propensity", "played")}
    active = np.ones(n, dtype=bool)
    for r in range(cfg.max_impressions_per_pair):
        idx = np.flatnonzero(active)
        if not len(idx):
            break
        shown = (logging[idx].cumsum(1) > rng.random((len(idx), 1))).argmax(1)
        shown = np.minimum(shown, a_per - 1)
        played = rng.random(len(idx)) < p_play[idx, shown]
        for k, v in (("pair", idx), ("round", np.full(len(idx), r)), ("shown", shown),
                     ("propensity", logging[idx, shown]), ("played", played)):
            rows[k].append(v)
        active[idx] = ~played & (rng.random(len(idx)) < cfg.continue_prob)
    pair_i = np.concatenate(rows["pair"]); rnd = np.concatenate(rows["round"])
    order = np.lexsort((rnd, pair_i))
    return _Impressions(split, uniform, p_play, p_taste, prod, logging, pair_ts, pair_i[order], rnd[order],
                        np.concatenate(rows["shown"])[order], np.concatenate(rows["propensity"])[order],
                        np.concatenate(rows["played"])[order])


def _impressions_table(imp: _Impressions, draws: _Draws, title_ids: list[str], user_ids: list[str],
                       art_ids: list[list[str]]) -> pa.Table:
    pair_i, pair_title = imp.pair_i, draws.pair_title
    return pa.table({
        "impression_id": _ids("i", len(pair_i)),
        "user_id": [user_ids[u] for u in draws.pair_user[pair_i]],
        "title_id": [title_ids[t] for t in pair_title[pair_i]],
        "shown_artwork_id": [art_ids[t][s] for t, s in zip(pair_title[pair_i], imp.shown)],
        "propensity": pa.array(imp.propensity, pa.float64()),
        "played": pa.array(imp.played, pa.bool_()),
        "timestamp": pa.array(imp.pair_ts[pair_i] + 3600 * imp.rnd, pa.int64()),
        "split": imp.split[pair_i].tolist(),
        "logging_policy": np.where(imp.uniform[pair_i], "uniform", "production").tolist(),
    })


def _oracle_table(cfg: WorldConfig, imp: _Impressions, draws: _Draws, title_ids: list[str], user_ids: list[str],
                  art_ids: list[list[str]]) -> pa.Table:
    """The true play probability of every pair's candidates (beside the contract, never read by training)."""
    a_per = cfg.artworks_per_title
    return pa.table({
        "user_id": [user_ids[u] for u in np.repeat(draws.pair_user, a_per)],
        "title_id": [title_ids[t] for t in np.repeat(draws.pair_title, a_per)],
        "artwork_id": [art_ids[t][j] for t in draws.pair_title for j in range(a_per)],
        "split": np.repeat(imp.split, a_per).tolist(),
        "p_play": pa.array(imp.p_play.ravel(), pa.float64()),
        "p_taste": pa.array(imp.p_taste.ravel(), pa.float64()),
        "production_prob": pa.array(imp.prod.ravel(), pa.float64()),
    })


def _write_world(cfg: WorldConfig, out: Path, specs: list[ArtworkSpec], artworks_tbl: pa.Table, progress: bool,
                 tables: dict[str, pa.Table]) -> None:
    """Images, then tables; a rerun replaces the folder's content."""
    out.mkdir(parents=True, exist_ok=True)
    img_dir = out / "images"
    if img_dir.exists():
        shutil.rmtree(img_dir)
    img_dir.mkdir()
    jobs = [(spec, cfg.image_width, cfg.image_height, str(out / path))
            for spec, path in zip(specs, artworks_tbl.column("path").to_pylist())]
    workers = min(len(jobs) // 500 + 1, os.cpu_count() or 1)
    it = (map(_render_one, jobs) if workers == 1
          else ProcessPoolExecutor(workers).map(_render_one, jobs, chunksize=64))
    for _ in tqdm(it, total=len(jobs), desc="render artworks", unit="img", disable=not progress):
        pass
    for name, tbl in tables.items():
        _write(tbl, out / f"{name}.parquet")


def _summary(cfg, p_play, p_taste, prod, split, uniform, pair_title, pair_i, shown, played, logging) -> dict:
    n, a_per = p_play.shape
    test = split == "test"
    pt = p_play[test]
    # Popularity: per title, the artwork with the highest smoothed train play rate (one size fits all).
    shows = np.zeros((cfg.num_titles, a_per)); plays = np.zeros((cfg.num_titles, a_per))
    tr = split[pair_i] == "train"
    np.add.at(shows, (pair_title[pair_i][tr], shown[tr]), 1)
    np.add.at(plays, (pair_title[pair_i][tr], shown[tr]), played[tr])
    pop_choice = ((plays + 0.5) / (shows + 1.0)).argmax(1)
    rows = np.arange(int(test.sum()))
    values = {
        "oracle": float(pt.max(1).mean()),
        "taste_oracle": float(pt[rows, p_taste[test].argmax(1)].mean()),
        "production": float(pt[rows, prod[test].argmax(1)].mean()),
        "logging_policy": float((pt * prod[test]).sum(1).mean()),
        "popularity": float(pt[rows, pop_choice[pair_title[test]]].mean()),
        "random": float(pt.mean()),
    }
    imps_per_pair = np.bincount(pair_i, minlength=n)
    sizes = {f"{s}_pairs": int((split == s).sum()) for s in ("train", "val", "test")}
    sizes.update({f"{s}_impressions": int((split[pair_i] == s).sum()) for s in ("train", "val", "test")})
    sizes["train_played_impressions"] = int(played[split[pair_i] == "train"].sum())
    return {
        "sizes": sizes,
        "test_mean_best_minus_worst_gap": float((pt.max(1) - pt.min(1)).mean()),
        "min_propensity": float(logging[pair_i, shown].min()),
        "configured_propensity_floor": cfg.propensity_floor,
        "share_pairs_with_multiple_impressions": float((imps_per_pair > 1).mean()),
        "share_test_pairs_uniform_random": float(uniform[test].mean()),
        "play_rate": float(played.mean()),
        "test_policy_values": values,
    }


def _teacher_value(out: Path, users: list[str], candidates: list[list[str]], p_test: np.ndarray) -> float:
    """True value of the default teacher's greedy choice on the test pairs: what SFT can distil from these logs."""
    from mmart.data.contract import load_contract
    from mmart.eval.teacher import DEFAULT_TEACHER, fit_teacher

    q = fit_teacher(load_contract(out, check=False), DEFAULT_TEACHER).table(users, candidates, p_test.shape[1])
    return float(p_test[np.arange(len(q)), q.argmax(1)].mean())


def _contact_sheet(cfg: WorldConfig, catalog: sim.Catalog, specs: list[ArtworkSpec], out: Path) -> None:
    """24 artworks (three per theme from two titles when the world has them) to eyeball the themes."""
    from PIL import Image

    a_per = cfg.artworks_per_title
    picks: list[int] = []
    for k in range(len(cfg.themes)):
        hits = [int(i) for i in np.flatnonzero(catalog.art_theme.ravel() == k)]
        by_title: dict[int, list[int]] = {}
        for i in hits:
            by_title.setdefault(i // a_per, []).append(i)
        lists = list(by_title.values())
        # Round-robin over titles so each theme shows two titles (and three artworks) when it can.
        chosen = [lst[r] for r in range(a_per) for lst in lists[:3] if r < len(lst)]
        picks.extend(sorted(chosen[:3]))
    picks = picks[:24]
    tids = _ids("t", cfg.num_titles)
    images, labels = [], []
    for i in picks:
        sp = specs[i]
        images.append(Image.open(out / "images" / f"{tids[i // a_per]}_a{i % a_per}.png").convert("RGB"))
        labels.append(f"{sp.theme}\n{'close-up' if sp.closeup else 'group'}, {'bright' if sp.bright else 'dark'}")
    contact_sheet(images, labels, columns=6, cell=(cfg.image_width, cfg.image_height)).save(out / "contact_sheet.png")
