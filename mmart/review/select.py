"""Which members and titles a review shows, and everything a grid or the page says about them.

A review starts from scored member-title pairs (``mmart predict`` output: one row per
impression, with the candidates in the order the model saw them and their probabilities),
joins what the logs say (the played artwork, artworks shown without a play) and, on the demo
world, what ``oracle.parquet`` says (true play probabilities; production's greedy choice),
then applies the reviewer's filters and samples members with a seed. A model trained with
reasoning may have written its own one-line explanation per pair (the optional ``rationale``
column); that column is the only text of the model's a review shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mmart.data.contract import Contract
from mmart.errors import UserError

ORACLE_FILE = "oracle.parquet"
OUTCOMES = ("wins", "losses")
PRED_COLUMNS = ("user_id", "title_id", "candidates", "probs")
RATIONALE_COLUMN = "rationale"  # optional: the model's own explanation of its choice, one per pair
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Candidate:
    """One candidate artwork of a title, as the model saw it (``letter`` = its position)."""

    artwork_id: str
    letter: str
    prob: float  # the model's probability
    image: Path | None  # None when the path is unusable (the grid draws a placeholder)
    caption: str | None = None
    true_p: float | None = None  # oracle play probability (demo world)


@dataclass
class TitleRow:
    """One reviewed member-title decision."""

    title_id: str
    name: str
    genres: list[str]
    year: int | None
    timestamp: int  # the decision: the pair's first impression
    candidates: list[Candidate]
    model_choice: str
    played: str | None = None  # the artwork the member played the title from (logged), if any
    shown_no_play: list[str] = field(default_factory=list)  # shown and not played
    oracle_choice: str | None = None  # argmax true play probability (demo world)
    production_choice: str | None = None  # argmax of the logging model (demo world)
    rationale: str | None = None  # the model's own explanation (the predictions' column), if it wrote one

    def true_p(self, artwork_id: str | None) -> float | None:
        return next((c.true_p for c in self.candidates if c.artwork_id == artwork_id), None)

    @property
    def outcome(self) -> str | None:
        """``win`` / ``loss`` / ``tie``: the model's choice vs production's, by true play probability."""
        mine, prod = self.true_p(self.model_choice), self.true_p(self.production_choice)
        if mine is None or prod is None:
            return None
        return "tie" if mine == prod else ("win" if mine > prod else "loss")

    def candidate(self, artwork_id: str | None) -> Candidate | None:
        return next((c for c in self.candidates if c.artwork_id == artwork_id), None)


@dataclass
class HistoryItem:
    title_id: str
    name: str
    genres: list[str]
    rating: int | None
    artwork_id: str | None
    image: Path | None
    timestamp: int


@dataclass
class MemberReview:
    user_id: str
    history: list[HistoryItem]  # most recent first, before the member's first reviewed decision
    rows: list[TitleRow]

    def count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.rows)


@dataclass
class Filters:
    """What a reviewer asked for; every field is optional."""

    only: str | None = None  # "wins" | "losses"
    title: str | None = None
    genre: str | None = None
    member: str | None = None

    def describe(self) -> str:
        parts = [f"--{k} {v}" for k, v in vars(self).items() if v is not None]
        return " ".join(parts) if parts else "none"


def oracle_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / ORACLE_FILE


def require_oracle(data_dir: str | Path, why: str) -> None:
    """Wins and losses need true values; real data has none, so say so instead of guessing."""
    path = oracle_path(data_dir)
    if not path.is_file():
        raise UserError(
            f"{why} needs the true play probabilities in {path}, which does not exist. Only the demo world has "
            f"them (`mmart world --config configs/world/default.yaml --out DIR` writes {ORACLE_FILE} beside the "
            "tables); on real data, drop --only and review the choices without true values")


def load_predictions(path: str | Path, split: str) -> pd.DataFrame:
    """One row per scored pair of ``split`` from a ``mmart predict`` Parquet file (or frame)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"predictions file {path} does not exist; write one with "
                        "`mmart predict --model DIR --data DATASET --split test --out FILE`, or pass --model DIR")
    try:
        preds = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path} is not a readable Parquet file ({e}); rewrite it with `mmart predict`") from e
    return pairs_of_predictions(preds, split, str(path))


def pairs_of_predictions(preds: pd.DataFrame, split: str, source: str) -> pd.DataFrame:
    missing = [c for c in PRED_COLUMNS if c not in preds]
    if missing:
        raise UserError(f"{source} lacks column(s) {missing}; it must be `mmart predict` output "
                        f"(columns {list(PRED_COLUMNS)}, one row per impression)")
    if "split" in preds:
        present = sorted(set(preds["split"]))
        preds = preds[preds["split"] == split]
        if preds.empty:
            raise UserError(f"{source} has no predictions for split {split!r} (it has {present}); "
                            f"pass --split {present[0] if present else 'test'} or predict that split")
    # A pair's first impression row speaks for the pair (a rationale, when present, is the same on every row).
    pairs = preds.drop_duplicates(["user_id", "title_id"]).reset_index(drop=True)
    for row in pairs.itertuples(index=False):
        if len(row.candidates) != len(row.probs) or len(row.candidates) < 2:
            raise UserError(f"{source}: pair user_id={row.user_id}, title_id={row.title_id} has "
                            f"{len(row.candidates)} candidates and {len(row.probs)} probabilities; "
                            "rewrite the file with `mmart predict`")
    optional = [RATIONALE_COLUMN] if RATIONALE_COLUMN in pairs else []
    return pairs[list(PRED_COLUMNS) + optional]


def decision_pairs(contract: Contract, split: str) -> pd.DataFrame:
    """Every member-title pair of ``split`` at its first impression (user_id, title_id, timestamp)."""
    imps = contract.frame("impressions")
    imps = imps[imps["split"] == split]
    if imps.empty:
        raise UserError(f"{contract.root}/impressions.parquet has no impressions in split {split!r}")
    first = imps.sort_values(["timestamp", "impression_id"]).drop_duplicates(["user_id", "title_id"])
    return first[["user_id", "title_id", "timestamp"]].reset_index(drop=True)


def filter_pairs(pairs: pd.DataFrame, contract: Contract, filters: Filters) -> pd.DataFrame:
    """Apply the filters that need no model (title, genre, member); name the choices when nothing is left."""
    titles = contract.frame("titles").set_index("title_id")
    if filters.member is not None:
        if filters.member not in set(contract.frame("users")["user_id"]):
            raise UserError(f"--member {filters.member}: no such user_id in {contract.root}/users.parquet")
        pairs = pairs[pairs["user_id"] == filters.member]
        if pairs.empty:
            raise UserError(f"--member {filters.member}: the member has no scored pairs in this split")
    if filters.title is not None:
        if filters.title not in titles.index:
            raise UserError(f"--title {filters.title}: no such title_id in {contract.root}/titles.parquet")
        pairs = pairs[pairs["title_id"] == filters.title]
        if pairs.empty:
            raise UserError(f"--title {filters.title}: no scored pair of this title in this split (with the other filters)")
    if filters.genre is not None:
        genres_of = {t: set(g) for t, g in titles["genres"].items()}
        pairs = pairs[[filters.genre in genres_of.get(t, ()) for t in pairs["title_id"]]]
        if pairs.empty:
            known = sorted({g for gs in genres_of.values() for g in gs})
            raise UserError(f"--genre {filters.genre}: no scored pair of that genre in this split "
                            f"(with the other filters); genres in the catalog: {', '.join(known)}")
    return pairs


def sample_members(user_ids, n: int, seed: int) -> list[str]:
    """A seeded sample of ``n`` distinct members (all when n <= 0), in id order."""
    members = sorted(set(user_ids))
    if 0 < n < len(members):
        pick = np.random.default_rng(seed).choice(len(members), n, replace=False)
        members = sorted(members[i] for i in pick)
    return members


def rows_by_member(contract: Contract, scored: pd.DataFrame, split: str) -> dict[str, list[TitleRow]]:
    """Per member, a :class:`TitleRow` for each scored pair (one row per pair of ``PRED_COLUMNS``, and
    ``rationale`` when the predictions carry one)."""
    data_dir = contract.root
    artworks = contract.frame("artworks").set_index("artwork_id")
    titles = contract.frame("titles").set_index("title_id")
    art_title = artworks["title_id"].to_dict()
    captions = artworks["caption"].to_dict() if "caption" in artworks else {}
    oracle = _oracle_lookup(data_dir, scored) if oracle_path(data_dir).is_file() else None
    imps = contract.frame("impressions")
    imps = imps[imps["split"] == split].sort_values(["timestamp", "impression_id"])
    logs: dict[tuple[str, str], list[tuple[str, bool, int]]] = {}
    for r in imps[["user_id", "title_id", "shown_artwork_id", "played", "timestamp"]].itertuples(index=False):
        logs.setdefault((r.user_id, r.title_id), []).append((r.shown_artwork_id, bool(r.played), int(r.timestamp)))

    rows_of: dict[str, list[TitleRow]] = {}
    for p in scored.itertuples(index=False):
        key = (p.user_id, p.title_id)
        cands = [str(a) for a in p.candidates]
        for a in cands:
            if art_title.get(a) != p.title_id:
                raise UserError(f"predictions: candidate {a!r} of pair user_id={p.user_id}, title_id={p.title_id} is not "
                                f"an artwork of that title in {data_dir}/artworks.parquet; were the predictions made "
                                "on another dataset?")
        log = logs.get(key, [])
        truth = oracle.get(key) if oracle is not None else None
        if oracle is not None and (truth is None or any(a not in truth for a in cands)):
            raise UserError(f"{oracle_path(data_dir)} lacks pair user_id={p.user_id}, title_id={p.title_id} "
                            "(or some of its candidates); regenerate the world or review the dataset it came from")
        probs = [float(x) for x in p.probs]
        t = titles.loc[p.title_id]
        row = TitleRow(
            title_id=p.title_id, name=str(t["name"]), genres=[str(g) for g in t["genres"]],
            year=_int_or_none(t.get("year")), timestamp=log[0][2] if log else 0,
            candidates=[Candidate(a, LETTERS[i] if i < len(LETTERS) else str(i + 1), probs[i],
                                  _image_of(contract, artworks, a), _str_or_none(captions.get(a)),
                                  truth[a][0] if truth else None)
                        for i, a in enumerate(cands)],
            model_choice=cands[int(np.argmax(probs))],
            played=next((a for a, played, _ in log if played), None),
            shown_no_play=list(dict.fromkeys(a for a, played, _ in log if not played)),
            rationale=_rationale_text(getattr(p, RATIONALE_COLUMN, None)),
        )
        if truth:
            row.oracle_choice = max(cands, key=lambda a: truth[a][0])
            row.production_choice = max(cands, key=lambda a: truth[a][1])
        rows_of.setdefault(p.user_id, []).append(row)
    return rows_of


def keep_outcome(rows_of: dict[str, list[TitleRow]], only: str | None) -> dict[str, list[TitleRow]]:
    """Only the model's wins (or losses) against production; members left without one drop out."""
    if only is None:
        return rows_of
    want = {"wins": "win", "losses": "loss"}[only]
    kept = {u: k for u, rs in rows_of.items() if (k := [r for r in rs if r.outcome == want])}
    if not kept:
        raise UserError(f"--only {only}: the model has no {only} against production among the scored pairs "
                        "(with the other filters)")
    return kept


def member_reviews(contract: Contract, rows_of: dict[str, list[TitleRow]], members: list[str], seed: int = 0,
                   titles_per_member: int = 6, history_items: int = 8) -> list[MemberReview]:
    """The review of each of ``members``: at most ``titles_per_member`` rows (seeded) and recent history."""
    titles = contract.frame("titles").set_index("title_id")
    artworks = contract.frame("artworks").set_index("artwork_id")
    users = contract.frame("users").set_index("user_id")["history"]
    rng = np.random.default_rng(seed)
    reviews = []
    for uid in members:
        rows = rows_of.get(uid, [])
        if not rows:
            continue
        if 0 < titles_per_member < len(rows):
            rows = [rows[i] for i in sorted(rng.choice(len(rows), titles_per_member, replace=False))]
        rows = sorted(rows, key=lambda r: (r.timestamp, r.title_id))
        history = _history(users.get(uid), titles, lambda a: _image_of(contract, artworks, a),
                           before=min(r.timestamp for r in rows) or None, limit=history_items)
        reviews.append(MemberReview(uid, history, rows))
    return reviews


def _image_of(contract: Contract, artworks: pd.DataFrame, artwork_id: str | None) -> Path | None:
    if artwork_id is None or artwork_id not in artworks.index:
        return None
    try:
        return contract.image_path(artworks.at[artwork_id, "path"])
    except UserError:  # an escaping path: the grid draws a placeholder, `mmart validate` reports it
        return None


def _oracle_lookup(data_dir: Path, scored: pd.DataFrame) -> dict[tuple[str, str], dict[str, tuple[float, float]]]:
    """(user_id, title_id) -> artwork_id -> (true play probability, production probability)."""
    oracle = pd.read_parquet(oracle_path(data_dir), columns=["user_id", "title_id", "artwork_id", "p_play",
                                                                "production_prob"])
    oracle = oracle.merge(scored[["user_id", "title_id"]].drop_duplicates(), on=["user_id", "title_id"])
    out: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
    for r in oracle.itertuples(index=False):
        out.setdefault((r.user_id, r.title_id), {})[r.artwork_id] = (float(r.p_play), float(r.production_prob))
    return out


def _history(events, titles: pd.DataFrame, image_of, before: int | None, limit: int) -> list[HistoryItem]:
    """The member's most recent history events before ``before``, most recent first."""
    items = []
    for ev in sorted(events if events is not None else [], key=lambda e: -int(e["timestamp"])):
        if before is not None and int(ev["timestamp"]) >= before:
            continue  # the model never sees the future; neither should the reviewer
        tid = ev["title_id"]
        t = titles.loc[tid] if tid in titles.index else None
        items.append(HistoryItem(
            title_id=tid, name=str(t["name"]) if t is not None else tid,
            genres=[str(g) for g in t["genres"]] if t is not None else [],
            rating=_int_or_none(ev.get("rating")), artwork_id=ev.get("artwork_id"),
            image=image_of(ev.get("artwork_id")), timestamp=int(ev["timestamp"])))
        if len(items) >= limit:
            break
    return items


def _int_or_none(v) -> int | None:
    try:
        return None if v is None or pd.isna(v) else int(v)
    except (TypeError, ValueError):
        return None


def _str_or_none(v) -> str | None:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)


def _rationale_text(v) -> str | None:
    """The model's rationale, or None when it wrote none (missing, NaN/NA or blank all mean "none")."""
    if v is None or (pd.api.types.is_scalar(v) and pd.isna(v)):
        return None
    text = str(v).strip()
    return text or None
