"""Teachers: models of P(play | member, artwork) fit on the logs, for SFT to distil and as a policy in the report.

``fit_teacher(contract, kind)`` returns an object with ``predict(user_ids, artwork_ids) -> P(play)``
(and ``table(user_ids, candidates, width)``, the [P, width] grid the report and DR use):

* ``reward_model``: the four-feature logistic model of mmart/eval/reward_model.py;
* ``taste`` (default): a model of each member's taste in looks. Which artwork a member plays
  a title from depends on how its tags (theme, shot, tone, title size, ...) meet the member's
  tastes, and the history shows those tastes twice: the genres of the titles they watched (and
  how they rated them), and, for every event with a known artwork, which of that title's
  candidates they played it from. Each such event is itself a choice among candidates, so
  the history is training data: tens of thousands of choices. (In the demo world the artwork
  played from is drawn by the play model itself; on real logs it was the one the serving
  policy showed, so these choices carry that policy's bias as well as the member's taste.)

  Features of a candidate (each an interaction of its tags with the member's profile):
  per tag family, how much more the member's past choices carried the candidate's tag than
  their alternatives did (summed over the member's events, shrunk towards 0 for short
  histories); and for tags named like a genre (theme:romance <-> romance), the member's share
  of watched titles of that genre, its square, the share led by it, and the ratings given to it.
  A conditional logit over each event's candidates fits the weights, each event described by
  the profile of the member's *other* events (no event explains itself). A logistic layer on
  the train impressions then puts this choice score beside the reward model's three rates
  (artwork, title, member) to give a calibrated P(play).

Numpy only: the default world (55K history events, 16K train impressions) fits in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from mmart.data.contract import Contract
from mmart.errors import UserError
from mmart.eval.reward_model import _leave_pair_out_rate, _logit, fit_logistic, fit_reward_model, smoothed_rate

TEACHERS = ("reward_model", "taste")
DEFAULT_TEACHER = "taste"
SHRINK = 3.0  # pseudo-events that pull a short history's choice profile towards 0


def _family(tag: str) -> str:
    return tag.split(":", 1)[0] if ":" in tag else "tag"


def _value(tag: str) -> str:
    return tag.split(":", 1)[1] if ":" in tag else tag


@dataclass
class Catalog:
    """Artworks as tag indicator rows, titles as candidate lists and genre rows."""

    art_index: dict[str, int]
    art_title: np.ndarray  # [A] title index
    tags: np.ndarray  # [A, V] 0/1
    families: list[str]
    family_of: np.ndarray  # [V] family index
    genre_of_tag: np.ndarray  # [V, G] 1 where the tag's value names the genre (theme:romance <-> romance)
    title_index: dict[str, int]
    cands: np.ndarray  # [T, K] artwork index, -1 padding
    genres: np.ndarray  # [T, G] 0/1
    lead_genre: np.ndarray  # [T, G] 0/1: the title's first-listed genre

    @classmethod
    def of(cls, contract: Contract) -> "Catalog":
        arts, titles = contract.frame("artworks"), contract.frame("titles")
        title_index = {t: i for i, t in enumerate(titles.title_id)}
        art_tags = ([list(t) if t is not None else [] for t in arts["tags"]] if "tags" in arts
                    else [[] for _ in range(len(arts))])
        vocab = sorted({t for tags in art_tags for t in tags})
        v_index = {t: i for i, t in enumerate(vocab)}
        tags = np.zeros((len(arts), len(vocab)))
        for i, ts in enumerate(art_tags):
            tags[i, [v_index[t] for t in ts]] = 1.0
        families = sorted({_family(t) for t in vocab})
        art_title = np.array([title_index[t] for t in arts.title_id], dtype=int)
        cands = np.full((len(titles), int(np.bincount(art_title, minlength=len(titles)).max())), -1)
        fill = np.zeros(len(titles), dtype=int)
        for i, t in enumerate(art_title):
            cands[t, fill[t]] = i
            fill[t] += 1
        title_genres = [list(g) if g is not None else [] for g in titles.genres]
        names = sorted({g for gs in title_genres for g in gs})
        g_index = {g: i for i, g in enumerate(names)}
        genres, lead = np.zeros((len(titles), len(names))), np.zeros((len(titles), len(names)))
        for i, gs in enumerate(title_genres):
            genres[i, [g_index[g] for g in gs]] = 1.0
            if gs:
                lead[i, g_index[gs[0]]] = 1.0
        genre_of_tag = np.zeros((len(vocab), len(names)))
        for v, tag in enumerate(vocab):
            if _value(tag) in g_index:
                genre_of_tag[v, g_index[_value(tag)]] = 1.0
        return cls({a: i for i, a in enumerate(arts.artwork_id)}, art_title, tags, families,
                   np.array([families.index(_family(t)) for t in vocab], dtype=int), genre_of_tag, title_index,
                   cands, genres, lead)

    def title_mean_tags(self, titles: np.ndarray) -> np.ndarray:
        """[N, V] the mean tag row of each title's candidates."""
        c = self.cands[titles]
        rows = self.tags[np.where(c >= 0, c, 0)] * (c >= 0)[..., None]
        return rows.sum(1) / (c >= 0).sum(1, keepdims=True)


@dataclass
class Profiles:
    """Per member (or per event) sums over history events; subtracting an event's own row leaves it out."""

    choice: np.ndarray  # [U, V] sum over known-artwork events of (played-from tags - mean candidate tags)
    n_known: np.ndarray  # [U] events with a known artwork
    genre: np.ndarray  # [U, G] watched titles with each genre
    lead: np.ndarray  # [U, G] watched titles led by each genre
    rated: np.ndarray  # [U, G] sum of (rating - 3) over watched titles with each genre
    n_watched: np.ndarray  # [U]

    @classmethod
    def of(cls, cat: Catalog, user: np.ndarray, title: np.ndarray, art: np.ndarray, rating: np.ndarray,
           n_users: int) -> "Profiles":
        """Sum the events (member index, title index, artwork index or -1, rating or nan) per member."""
        known = art >= 0
        resid = np.zeros((len(user), cat.tags.shape[1]))
        resid[known] = cat.tags[art[known]] - cat.title_mean_tags(title[known])
        g = cat.genres[title]
        sums = [np.zeros((n_users, w)) for w in (resid.shape[1], g.shape[1], g.shape[1], g.shape[1])]
        for acc, rows in zip(sums, (resid, g, cat.lead_genre[title], g * np.nan_to_num(rating - 3.0)[:, None])):
            np.add.at(acc, user, rows)
        return cls(sums[0], np.bincount(user[known], minlength=n_users).astype(float), sums[1], sums[2], sums[3],
                   np.bincount(user, minlength=n_users).astype(float))

    def rows(self, users: np.ndarray, minus: "Profiles | None" = None) -> "Profiles":
        """The profiles of ``users`` (one row each), less ``minus`` row by row."""
        out = {f.name: getattr(self, f.name)[users] for f in fields(self)}
        if minus is not None:
            out = {k: v - getattr(minus, k) for k, v in out.items()}
        return Profiles(**out)


def candidate_features(prof: Profiles, cat: Catalog, cand: np.ndarray) -> np.ndarray:
    """``cand [N, K]`` artwork indices (-1 padding), one profile row per N -> features ``[N, K, F]``."""
    tags = cat.tags[np.where(cand >= 0, cand, 0)] * (cand >= 0)[..., None]  # [N, K, V]
    per_tag = tags * (prof.choice / (prof.n_known + SHRINK)[:, None])[:, None, :]
    feats = [per_tag[..., cat.family_of == j].sum(-1, keepdims=True) for j in range(len(cat.families))]
    n = np.maximum(prof.n_watched, 1.0)[:, None]
    share = prof.genre / n
    for g in (share, share**2, prof.lead / n, prof.rated / n):
        feats.append(np.einsum("nkv,vg,ng->nk", tags, cat.genre_of_tag, g)[..., None])
    return np.concatenate(feats, -1)


def feature_names(cat: Catalog) -> list[str]:
    return [f"choice:{f}" for f in cat.families] + ["genre_share", "genre_share_sq", "lead_share", "rated"]


def fit_conditional_logit(x: np.ndarray, mask: np.ndarray, chosen: np.ndarray, l2: float = 1e-4,
                          steps: int = 30, weight: np.ndarray | None = None) -> np.ndarray:
    """Weights of P(k) = softmax_k(x[n, k] @ w) maximising the (``weight``ed) log-likelihood of ``chosen`` (L2),
    by Newton."""
    target = np.zeros(mask.shape)
    target[np.arange(len(chosen)), chosen] = 1.0
    return fit_soft_conditional_logit(x, mask, target, l2, steps, weight)


def fit_soft_conditional_logit(x: np.ndarray, mask: np.ndarray, target: np.ndarray, l2: float = 1e-4,
                               steps: int = 30, weight: np.ndarray | None = None) -> np.ndarray:
    """Weights of P(k) = softmax_k(x[n, k] @ w) closest in cross-entropy (L2) to ``target [N, K]``, a
    distribution over each row's candidates (one-hot: a choice), by Newton. ``weight [N]``: each row's
    weight in the likelihood (e.g. importance weights; default 1)."""
    n, _, f = x.shape
    rw = None if weight is None else np.asarray(weight, dtype=float)  # None: the unweighted sums, bit for bit
    w = np.zeros(f)
    penalty = l2 * n * np.eye(f)
    xt = np.einsum("nk,nkf->nf", target, x)
    for _ in range(steps):
        s = np.where(mask, x @ w, -np.inf)
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        xbar = np.einsum("nk,nkf->nf", p, x)
        if rw is None:
            grad = (xt - xbar).sum(0) - penalty @ w
            xs = (x * np.sqrt(p)[..., None]).reshape(-1, f)
            step = np.linalg.solve(xs.T @ xs - xbar.T @ xbar + penalty, grad)
        else:
            grad = (rw[:, None] * (xt - xbar)).sum(0) - penalty @ w
            xs = (x * np.sqrt(rw[:, None] * p)[..., None]).reshape(-1, f)
            step = np.linalg.solve(xs.T @ xs - (rw[:, None] * xbar).T @ xbar + penalty, grad)
        w += step
        if float(np.abs(step).max()) < 1e-8:
            break
    return w


@dataclass
class TasteTeacher:
    """P(play | member, artwork) = sigmoid(a * taste score + b . logit(artwork, title, member rates) + c)."""

    cat: Catalog
    title_ids: list[str]  # by catalog title index
    user_index: dict[str, int]
    profiles: Profiles
    choice_weights: np.ndarray  # the conditional logit's weights over candidate_features
    weights: np.ndarray  # [taste score, 3 rates, intercept]
    rates: tuple[dict[str, float], dict[str, float], dict[str, float]]  # artwork, title, member
    prior: float
    kind: str = "taste"

    def _art(self, artwork_ids) -> np.ndarray:
        try:
            return np.array([self.cat.art_index[a] for a in artwork_ids], dtype=int)
        except KeyError as e:
            raise UserError(f"artwork {e.args[0]!r} is not in the catalog the teacher was fit on") from None

    def _profiles(self, user_ids) -> Profiles:
        idx = np.array([self.user_index.get(u, -1) for u in user_ids], dtype=int)
        prof = self.profiles.rows(np.maximum(idx, 0))
        for f in fields(prof):  # a member without a history has an empty profile
            getattr(prof, f.name)[idx < 0] = 0.0
        return prof

    def choice_scores(self, user_ids, candidates: np.ndarray) -> np.ndarray:
        """``[N, K]`` taste scores of catalog indices ``candidates`` (-1 padding) for each member."""
        x = candidate_features(self._profiles(user_ids), self.cat, candidates)
        return x @ self.choice_weights

    def _rate_features(self, user_ids, artwork_ids, art: np.ndarray) -> np.ndarray:
        art_rate, title_rate, member_rate = self.rates
        r = np.array([(art_rate.get(a, self.prior), title_rate.get(self.title_ids[t], self.prior),
                       member_rate.get(u, self.prior))
                      for u, a, t in zip(user_ids, artwork_ids, self.cat.art_title[art])], dtype=float).reshape(-1, 3)
        return _logit(np.clip(r, 1e-4, 1 - 1e-4))

    def predict(self, user_ids, artwork_ids) -> np.ndarray:
        user_ids, artwork_ids = list(user_ids), list(artwork_ids)
        art = self._art(artwork_ids)
        s = self.choice_scores(user_ids, art[:, None])[:, 0]
        x1 = np.column_stack([s, self._rate_features(user_ids, artwork_ids, art), np.ones(len(s))])
        return 1.0 / (1.0 + np.exp(-(x1 @ self.weights)))

    def table(self, user_ids, candidates, width: int) -> np.ndarray:
        """``[P, width]`` P(play) per (pair, candidate), 0 past a pair's own candidates."""
        users = [u for u, c in zip(user_ids, candidates) for _ in c]
        flat = [a for c in candidates for a in c]
        p = self.predict(users, flat) if flat else np.zeros(0)
        q = np.zeros((len(candidates), width))
        start = 0
        for i, c in enumerate(candidates):
            q[i, : len(c)] = p[start: start + len(c)]
            start += len(c)
        return q


def _history_events(contract: Contract, cat: Catalog, user_index: dict[str, int]):
    u, t, a, r = [], [], [], []
    users = contract.frame("users")
    for uid, history in zip(users.user_id, users.history):
        for ev in history if history is not None else []:
            u.append(user_index[uid])
            t.append(cat.title_index[ev["title_id"]])
            aid = ev.get("artwork_id")
            a.append(cat.art_index[aid] if aid is not None else -1)
            rating = ev.get("rating")
            r.append(float(rating) if rating is not None else np.nan)
    return (np.array(u, dtype=int), np.array(t, dtype=int), np.array(a, dtype=int), np.array(r, dtype=float))


def fit_taste_teacher(contract: Contract, split: str = "train", l2: float = 1e-4) -> TasteTeacher:
    """Fit the choice part on every history event with a known artwork, the calibration on ``split``'s impressions."""
    cat = Catalog.of(contract)
    users = contract.frame("users")
    user_index = {u: i for i, u in enumerate(users.user_id)}
    ev_user, ev_title, ev_art, ev_rating = _history_events(contract, cat, user_index)
    profiles = Profiles.of(cat, ev_user, ev_title, ev_art, ev_rating, len(users))

    # The history's own choices, each seen through the member's other events.
    known = np.flatnonzero(ev_art >= 0)
    n_feat = len(feature_names(cat))
    choice_weights = np.zeros(n_feat)
    if len(known) and cat.tags.shape[1]:
        own = Profiles.of(cat, np.arange(len(known)), ev_title[known], ev_art[known], ev_rating[known], len(known))
        cand = cat.cands[ev_title[known]]
        chosen = (cand == ev_art[known][:, None]).argmax(1)
        x = candidate_features(profiles.rows(ev_user[known], minus=own), cat, cand)
        choice_weights = fit_conditional_logit(x, cand >= 0, chosen, l2)

    imps = contract.frame("impressions")
    train = imps[imps.split == split]
    if train.empty:
        raise UserError(f"impressions.parquet has no {split!r} rows to fit the teacher on")
    prior = float(train.played.mean())
    teacher = TasteTeacher(cat, list(contract.frame("titles").title_id), user_index, profiles, choice_weights, np.zeros(5),
                           (smoothed_rate(train, "shown_artwork_id", prior), smoothed_rate(train, "title_id", prior),
                            smoothed_rate(train, "user_id", prior)), prior)
    s = teacher.choice_scores(list(train.user_id), teacher._art(train.shown_artwork_id)[:, None])[:, 0]
    # Rates without the row's own member-title pair: a rate holding the row's outcome would be trusted too much.
    rates = np.column_stack([_logit(np.clip(_leave_pair_out_rate(train, key, prior), 1e-4, 1 - 1e-4))
                             for key in ("shown_artwork_id", "title_id", "user_id")])
    teacher.weights = fit_logistic(np.column_stack([s, rates]), train.played.to_numpy(dtype=float), 1e-3)
    return teacher


def fit_teacher(contract: Contract, kind: str = DEFAULT_TEACHER, split: str = "train"):
    """The teacher named ``kind`` (one of TEACHERS), fit on ``split``'s impressions and the members' histories."""
    if kind == "reward_model":
        return fit_reward_model(contract, split)
    if kind == "taste":
        return fit_taste_teacher(contract, split)
    raise UserError(f"unknown teacher {kind!r}; choose one of {', '.join(TEACHERS)}")
