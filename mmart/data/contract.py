"""The dataset contract: four Parquet tables plus ``images/``, loaded through ``datasets``.

Every later stage reads a dataset only through :func:`load_contract`, so a real
catalog and the demo world go through the same code. :func:`validate` checks every
rule of the contract and returns *all* problems, each naming the file, the row key
and the fix, because a user repairing an export wants the whole list at once.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import stat
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from mmart.data.image_file import open_rgb
from mmart.errors import UserError

TABLES = ("titles", "artworks", "users", "impressions")

# Required columns per table, and the Python types a value must have.
REQUIRED_COLUMNS: dict[str, dict[str, str]] = {
    "titles": {"title_id": "str", "name": "str", "genres": "list[str]", "synopsis": "str"},
    "artworks": {"artwork_id": "str", "title_id": "str", "path": "str"},
    "users": {"user_id": "str", "history": "list[struct]"},
    "impressions": {
        "impression_id": "str",
        "user_id": "str",
        "title_id": "str",
        "shown_artwork_id": "str",
        "propensity": "float",
        "played": "bool",
        "timestamp": "int",
        "split": "str",
    },
}
OPTIONAL_COLUMNS = {
    "titles": {"year": "int"},
    "artworks": {"tags": "list[str]", "caption": "str"},
    # ``logging_policy`` ("production" / "uniform") marks the uniformly-random slice.
    "impressions": {"logging_policy": "str"},
}
UNIFORM_POLICY = "uniform"  # the logging_policy value of the uniformly random slice
SPLITS = ("train", "val", "test")
ID_COLUMNS = {"titles": "title_id", "artworks": "artwork_id", "users": "user_id", "impressions": "impression_id"}
MAX_PROBLEMS_PER_RULE = 20


class ContractError(UserError, ValueError):
    """A dataset folder that breaks the contract; ``problems`` lists every broken rule."""

    def __init__(self, problems: list["Problem"], root: Path):
        self.problems = problems
        lines = [f"{root}: {len(problems)} contract problem(s):"] + [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class Problem:
    """One broken rule: where (file and row key), what, and how to fix it."""

    rule: str
    file: str
    key: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.file} ({self.key}): {self.message}. Fix: {self.fix}"


@dataclasses.dataclass
class Contract:
    """A loaded dataset folder. Tables are Arrow-backed ``datasets.Dataset`` objects."""

    root: Path
    titles: Any
    artworks: Any
    users: Any
    impressions: Any

    def frame(self, table: str) -> pd.DataFrame:
        """The table as a pandas DataFrame (cached: validation and example building reuse it)."""
        cache = self.__dict__.setdefault("_frames", {})
        if table not in cache:
            cache[table] = getattr(self, table).to_pandas()
        return cache[table]

    def artwork_images(self):
        """The artworks table with an ``image`` column (PIL RGB), decoded lazily on access.

        Decoded by mmart's one image opener (regular files only, within the cache's byte and
        pixel limits); a path that escapes the folder raises ContractError, a bad image
        ``mmart.data.image_file.ImageRefused``, each naming the file.
        """
        def decode(batch: dict[str, list]) -> dict[str, list]:
            return {**batch, "image": [open_rgb(self.image_path(p)) for p in batch["path"]]}

        return self.artworks.with_transform(decode)

    def image_path(self, relative: str) -> Path:
        """Resolve an artwork path inside the dataset folder; refuse anything that escapes it (or cannot be a path)."""
        found = locate(os.path.realpath(self.root), relative)
        if found.path is None:
            raise ContractError(
                [Problem("paths", "artworks.parquet", short(str(relative)), found.problem or "unusable path",
                         "use a path relative to the dataset folder, e.g. images/<artwork_id>.png")],
                self.root,
            )
        return found.path


# Longest path (bytes) and file-name component Linux file systems accept (PATH_MAX - 1, NAME_MAX).
MAX_PATH_BYTES = 4095
MAX_NAME_BYTES = 255


@dataclasses.dataclass(frozen=True)
class Located:
    """Where an artwork path points: ``path`` (resolved, inside the folder) and what is wrong with it, if anything.

    ``path`` is None when the path cannot be used at all (absolute, escaping, NUL byte, too
    long, a symlink loop); a missing file or a non-file keeps its ``path`` and names the problem.
    """

    path: Path | None
    problem: str | None


def locate(real_root: str, relative: Any) -> Located:
    """Resolve ``relative`` inside the already-resolved ``real_root``; never raises on a bad path.

    One rule for the contract, the cache and the review: relative, inside the folder after
    following links, and (to be an image) a regular file, so a FIFO or device is never opened.
    """
    if not isinstance(relative, str) or not relative:
        return Located(None, "path is empty or not a string")
    if "\x00" in relative:
        return Located(None, "path contains a NUL byte")
    if os.path.isabs(relative):
        return Located(None, "path is absolute or escapes the dataset folder")
    raw = relative.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_PATH_BYTES or any(len(part) > MAX_NAME_BYTES for part in raw.split(b"/")):
        return Located(None, f"path is too long ({len(relative)} characters; file systems allow "
                             f"{MAX_PATH_BYTES + 1} bytes, {MAX_NAME_BYTES} per name)")
    joined = os.path.join(real_root, relative)
    try:
        real, missing = os.path.realpath(joined, strict=True), False
    except (FileNotFoundError, NotADirectoryError):
        real, missing = os.path.realpath(joined), True
    except OSError as e:
        if e.errno == errno.ELOOP:
            return Located(None, "path is a symlink loop")
        return Located(None, f"path cannot be resolved ({e.strerror or e})")
    if not real.startswith(real_root + os.sep):
        return Located(None, "path is absolute or escapes the dataset folder")
    if missing:
        return Located(Path(real), "file does not exist")
    try:
        mode = os.stat(real).st_mode
    except OSError as e:
        return Located(Path(real), f"file cannot be read ({e.strerror or e})")
    if stat.S_ISDIR(mode):
        return Located(Path(real), "path is a directory, not an image")
    if not stat.S_ISREG(mode):
        return Located(Path(real), "not a regular file (a FIFO, socket or device is never opened as an image)")
    return Located(Path(real), None)


def short(text: str, limit: int = 80) -> str:
    """``text`` quoted for a one-line message, cut (with its length) when it is long."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def resolve_inside(root: Path, relative: str) -> Path | None:
    """``root/relative`` if it is relative and stays inside ``root`` after resolving links, else None (never raises)."""
    return locate(os.path.realpath(root), relative).path


def _read_table(root: Path, name: str, problems: list[Problem]):
    import datasets

    path = root / f"{name}.parquet"
    if not path.is_file():
        problems.append(Problem("tables", f"{name}.parquet", "-", "file is missing",
                                f"write {name}.parquet into {root} (see docs/data.md)"))
        return None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        problems.append(Problem("tables", f"{name}.parquet", "-", f"not a readable Parquet file ({e})",
                                "rewrite it with pandas.DataFrame.to_parquet or datasets"))
        return None
    missing = [c for c in REQUIRED_COLUMNS[name] if c not in table.column_names]
    for col in missing:
        problems.append(Problem("schema", f"{name}.parquet", f"column {col}", "required column is missing",
                                f"add a {REQUIRED_COLUMNS[name][col]} column named {col!r}"))
    if missing:
        return None
    return datasets.Dataset(table)


def load_contract(root: str | Path, check: bool = True) -> Contract:
    """Load a dataset folder; with ``check`` (the default) raise :class:`ContractError` on any problem."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist; create one with "
                                f"`mmart world --config configs/world/default.yaml --out {root}`")
    problems: list[Problem] = []
    tables = {name: _read_table(root, name, problems) for name in TABLES}
    if problems:
        raise ContractError(problems, root)
    contract = Contract(root=root, **tables)
    if check:
        problems = validate_contract(contract)
        if problems:
            raise ContractError(problems, root)
    return contract


def validate(root: str | Path) -> list[Problem]:
    """Every contract problem of a dataset folder (an empty list means it is valid)."""
    root = Path(root)
    if not root.is_dir():
        return [Problem("tables", str(root), "-", "dataset folder does not exist",
                        "pass the folder that holds titles.parquet, artworks.parquet, users.parquet, impressions.parquet")]
    problems: list[Problem] = []
    tables = {name: _read_table(root, name, problems) for name in TABLES}
    if any(t is None for t in tables.values()):
        return problems
    return validate_contract(Contract(root=root, **tables))


class _Collector:
    """Gathers problems, keeping at most MAX_PROBLEMS_PER_RULE per rule plus a count of the rest."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.counts: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, rule: str, file: str, key: Any, message: str, fix: str) -> None:
        self.counts[(rule, file)] += 1
        if self.counts[(rule, file)] <= MAX_PROBLEMS_PER_RULE:
            self.problems.append(Problem(rule, file, str(key), message, fix))

    def finish(self) -> list[Problem]:
        for (rule, file), n in self.counts.items():
            if n > MAX_PROBLEMS_PER_RULE:
                self.problems.append(Problem(rule, file, "...", f"{n - MAX_PROBLEMS_PER_RULE} more rows break this rule",
                                             "fix the rows above, then run `mmart validate` again"))
        return self.problems


def _check_types(c: _Collector, name: str, df: pd.DataFrame) -> None:
    file = f"{name}.parquet"
    idcol = ID_COLUMNS[name]
    specs = {**REQUIRED_COLUMNS[name], **{k: v for k, v in OPTIONAL_COLUMNS.get(name, {}).items() if k in df}}
    for col, kind in specs.items():
        values = df[col].tolist()
        keys = df[idcol].tolist()
        optional = col in OPTIONAL_COLUMNS.get(name, {})
        for key, v in zip(keys, values):
            if optional and (v is None or (isinstance(v, float) and math.isnan(v))):
                continue
            ok = {
                "str": lambda x: isinstance(x, str) and x != "",
                "int": lambda x: isinstance(x, int) or (hasattr(x, "dtype") and x.dtype.kind in "iu"),
                "float": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
                "bool": lambda x: isinstance(x, bool) or (hasattr(x, "dtype") and x.dtype.kind == "b"),
                "list[str]": lambda x: hasattr(x, "__len__") and not isinstance(x, str) and all(isinstance(i, str) for i in x),
                "list[struct]": lambda x: hasattr(x, "__len__") and not isinstance(x, str) and all(isinstance(i, dict) for i in x),
            }[kind](v)
            if not ok:
                c.add("schema", file, f"{idcol}={key}", f"column {col!r} holds {v!r}, expected {kind}",
                      f"store {col} as {kind}" + ("" if optional else " (it is required, so no nulls)"))


def _as_int(v: Any) -> int | None:
    """An integer value (Python or numpy) as int; None for anything else (strings, floats, NaN, bools)."""
    if isinstance(v, bool) or (hasattr(v, "dtype") and v.dtype.kind == "b"):
        return None
    if isinstance(v, int) or (hasattr(v, "dtype") and v.dtype.kind in "iu"):
        return int(v)
    return None


def validate_contract(contract: Contract) -> list[Problem]:
    """Check every rule of the data contract (docs/data.md) on a loaded contract; problems in rule order."""
    c = _Collector()
    titles, artworks = contract.frame("titles"), contract.frame("artworks")
    users, imps = contract.frame("users"), contract.frame("impressions")
    for name in TABLES:
        _check_types(c, name, contract.frame(name))
    _check_unique_ids(c, contract)
    title_ids = set(titles["title_id"])
    art_title = dict(zip(artworks["artwork_id"], artworks["title_id"]))
    _check_foreign_keys(c, imps, title_ids, set(users["user_id"]), art_title)
    last_history = _check_histories(c, users, title_ids, art_title)
    _check_artworks_per_title(c, titles, artworks)
    _check_impression_values(c, imps)
    _check_paths(c, contract, artworks)
    _check_leakage(c, imps, last_history)
    _check_splits(c, imps)
    _check_split_overlap(c, imps)
    return c.finish()


def _check_unique_ids(c: _Collector, contract: Contract) -> None:
    """Each table's id column holds no id twice."""
    for name in TABLES:
        col = ID_COLUMNS[name]
        dup = contract.frame(name)[col]
        for key in sorted(set(dup[dup.duplicated()].tolist()), key=str):
            c.add("unique-ids", f"{name}.parquet", f"{col}={key}", f"{col} appears more than once",
                  f"give every row of {name}.parquet its own {col}")


def _check_foreign_keys(c: _Collector, imps, title_ids: set, user_ids: set, art_title: dict) -> None:
    """Artworks name known titles; impressions name known members, titles, and an artwork of that title."""
    for aid, tid in art_title.items():
        if tid not in title_ids:
            c.add("foreign-keys", "artworks.parquet", f"artwork_id={aid}", f"title_id {tid!r} is not in titles.parquet",
                  "add the title to titles.parquet or drop the artwork")
    for row in imps[["impression_id", "user_id", "title_id", "shown_artwork_id"]].itertuples(index=False):
        key = f"impression_id={row.impression_id}"
        if row.user_id not in user_ids:
            c.add("foreign-keys", "impressions.parquet", key, f"user_id {row.user_id!r} is not in users.parquet",
                  "add the member to users.parquet or drop the impression")
        if row.title_id not in title_ids:
            c.add("foreign-keys", "impressions.parquet", key, f"title_id {row.title_id!r} is not in titles.parquet",
                  "add the title to titles.parquet or drop the impression")
        shown_title = art_title.get(row.shown_artwork_id)
        if shown_title is None:
            c.add("foreign-keys", "impressions.parquet", key,
                  f"shown_artwork_id {row.shown_artwork_id!r} is not in artworks.parquet",
                  "add the artwork to artworks.parquet or drop the impression")
        elif shown_title != row.title_id:
            c.add("foreign-keys", "impressions.parquet", key,
                  f"shown_artwork_id {row.shown_artwork_id!r} belongs to title {shown_title!r}, not {row.title_id!r}",
                  "log the artwork that was shown for this title")


def _check_histories(c: _Collector, users, title_ids: set, art_title: dict) -> dict[str, tuple[int, str]]:
    """History events' foreign keys, ratings and timestamps; returns each member's last event (time, key),
    which the leakage rule compares with their first impression."""
    last_history: dict[str, tuple[int, str]] = {}
    for uid, history in zip(users["user_id"], users["history"]):
        for i, ev in enumerate(history if history is not None else []):
            key = f"user_id={uid}, history[{i}]"
            if not isinstance(ev, dict):
                continue
            if ev.get("title_id") not in title_ids:
                c.add("foreign-keys", "users.parquet", key, f"history title_id {ev.get('title_id')!r} is not in titles.parquet",
                      "add the title to titles.parquet or drop the event")
            aid = ev.get("artwork_id")
            if aid is not None:
                if aid not in art_title:
                    c.add("foreign-keys", "users.parquet", key, f"history artwork_id {aid!r} is not in artworks.parquet",
                          "set artwork_id to null when the artwork is unknown")
                elif art_title[aid] != ev.get("title_id"):
                    c.add("foreign-keys", "users.parquet", key,
                          f"history artwork_id {aid!r} belongs to title {art_title[aid]!r}, not {ev.get('title_id')!r}",
                          "record the artwork the member played this title from, or null")
            rating = ev.get("rating")
            if rating is not None and not (isinstance(rating, int) and 1 <= rating <= 5):
                c.add("schema", "users.parquet", key, f"rating {rating!r} is not an integer from 1 to 5",
                      "store ratings as integers 1-5, or null when unknown")
            ts = ev.get("timestamp")
            if not isinstance(ts, int):
                c.add("schema", "users.parquet", key, f"timestamp {ts!r} is not an integer",
                      "store event times as integer seconds")
            elif uid not in last_history or ts > last_history[uid][0]:
                last_history[uid] = (ts, key)
    return last_history


def _check_artworks_per_title(c: _Collector, titles, artworks) -> None:
    """A title has at least 2 artworks: choosing needs a choice."""
    counts = artworks.groupby("title_id").size().to_dict()
    for tid in titles["title_id"]:
        if counts.get(tid, 0) < 2:
            c.add("artworks-per-title", "titles.parquet", f"title_id={tid}",
                  f"title has {counts.get(tid, 0)} artwork(s); choosing needs at least 2",
                  "add candidate artworks for it or drop the title and its impressions")


def _check_impression_values(c: _Collector, imps) -> None:
    """Propensity in (0, 1]; valid split names."""
    for iid, p in zip(imps["impression_id"], imps["propensity"]):
        if not (isinstance(p, (int, float)) and 0 < p <= 1):
            c.add("propensity", "impressions.parquet", f"impression_id={iid}", f"propensity {p!r} is not in (0, 1]",
                  "log the probability with which the serving policy chose the shown artwork")
    for iid, s in zip(imps["impression_id"], imps["split"]):
        if s not in SPLITS:
            c.add("schema", "impressions.parquet", f"impression_id={iid}", f"split {s!r} is not one of {list(SPLITS)}",
                  "assign each member-title pair to train, val or test")


def _check_paths(c: _Collector, contract: Contract, artworks) -> None:
    """Image paths: relative, inside the folder, a regular file."""
    real_root = os.path.realpath(contract.root)
    for aid, rel in zip(artworks["artwork_id"], artworks["path"]):
        if not isinstance(rel, str):
            continue  # reported by the schema check
        problem = locate(real_root, rel).problem
        if problem is None:
            continue
        if problem == "file does not exist":
            c.add("paths", "artworks.parquet", f"artwork_id={aid}", f"image {short(rel)} does not exist",
                  "copy the image into the dataset folder or fix the path")
        else:
            c.add("paths", "artworks.parquet", f"artwork_id={aid}", f"path {short(rel)}: {problem}",
                  "store paths relative to the dataset folder, e.g. images/<artwork_id>.png, each naming an image file")


def _check_leakage(c: _Collector, imps, last_history: dict[str, tuple[int, str]]) -> None:
    """No leakage from the future: the member's history is older than every impression it conditions."""
    first_imp: dict[str, tuple[int, str]] = {}
    for uid, ts, iid in zip(imps["user_id"], imps["timestamp"], imps["impression_id"]):
        ts = _as_int(ts)
        if ts is None:
            continue  # reported by the schema check
        if uid not in first_imp or ts < first_imp[uid][0]:
            first_imp[uid] = (ts, iid)
    for uid, (hts, hkey) in last_history.items():
        if uid in first_imp and hts >= first_imp[uid][0]:
            c.add("leakage", "users.parquet", hkey,
                  f"history event at {hts} is not older than impression {first_imp[uid][1]} at {first_imp[uid][0]}",
                  "keep in history only events before the member's first impression (later plays belong in impressions)")


def _check_splits(c: _Collector, imps) -> None:
    """Something to train on and something to evaluate: SFT needs played train impressions, eval needs test ones."""
    split_of = imps["split"]
    played = imps["played"].map(lambda v: v is True or (hasattr(v, "dtype") and v.dtype.kind == "b" and bool(v)))
    if not (played & (split_of == "train")).any():
        n = int((split_of == "train").sum())
        c.add("splits", "impressions.parquet", "split=train",
              f"the train split has no played impressions ({n} impression(s), none played): nothing to train on",
              "log impressions with played=true and assign some member-title pairs to train")
    if not (split_of == "test").any():
        c.add("splits", "impressions.parquet", "split=test", "the test split has no impressions: nothing to evaluate on",
              "assign some member-title pairs to test")


def _check_split_overlap(c: _Collector, imps) -> None:
    """No member-title pair in more than one split."""
    pair_splits = imps.groupby(["user_id", "title_id"])["split"].agg(lambda s: sorted(set(s)))
    for (uid, tid), splits in pair_splits.items():
        if len(splits) > 1:
            c.add("split-overlap", "impressions.parquet", f"user_id={uid}, title_id={tid}",
                  f"member-title pair appears in splits {splits}",
                  "split by member-title pair so every impression of a pair is in one split")
