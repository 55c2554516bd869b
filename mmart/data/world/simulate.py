"""The world's hidden truth: members' tastes, the play model, and the logging policy.

All arrays, no I/O: ``generate.py`` turns them into the contract's tables. Members
differ in which themes they love (sparse Dirichlet) and in which looks draw them in
(shot, tone, title size), so the best artwork depends jointly on the member's
history (text) and on the artwork's pixels, and no artwork is best for everyone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmart.data.world.config import WorldConfig

STYLE_NAMES = ("shot", "tone", "title")  # +1 = close-up / bright / large, -1 = group / dark / small


@dataclass
class Catalog:
    title_mix: np.ndarray  # [n_titles, n_themes] theme mixture, rows sum to 1
    title_themes: list[list[int]]  # each title's themes, strongest first
    popularity: np.ndarray  # [n_titles]
    art_theme: np.ndarray  # [n_titles, A] emphasised theme index
    art_style: np.ndarray  # [n_titles, A, 3] in {-1, +1}


@dataclass
class Members:
    theme_pref: np.ndarray  # [n_members, n_themes], rows sum to 1
    style_pref: np.ndarray  # [n_members, 3]


def sample_catalog(cfg: WorldConfig, rng: np.random.Generator) -> Catalog:
    n_themes, a = len(cfg.themes), cfg.artworks_per_title
    lo, hi = cfg.themes_per_title
    mix = np.zeros((cfg.num_titles, n_themes))
    themes_of: list[list[int]] = []
    art_theme = np.zeros((cfg.num_titles, a), dtype=np.int64)
    for t in range(cfg.num_titles):
        k = int(rng.integers(lo, hi + 1))
        chosen = rng.choice(n_themes, size=k, replace=False)
        weights = np.sort(rng.dirichlet(np.full(k, 2.0)))[::-1]
        mix[t, chosen] = weights
        themes_of.append([int(x) for x in chosen])
        # Cover every theme of the title first, then emphasise themes by their weight.
        order = list(chosen) + list(rng.choice(chosen, size=max(0, a - k), p=weights))
        art_theme[t] = np.array(order[:a])[rng.permutation(a)]
    art_style = rng.choice([-1.0, 1.0], size=(cfg.num_titles, a, 3))
    popularity = rng.normal(0.0, 1.0, cfg.num_titles)
    return Catalog(mix, themes_of, popularity, art_theme, art_style)


def sample_members(cfg: WorldConfig, rng: np.random.Generator) -> Members:
    n_themes = len(cfg.themes)
    pref = rng.dirichlet(np.full(n_themes, cfg.theme_concentration), size=cfg.num_members)
    style = rng.normal(0.0, cfg.style_pref_std, size=(cfg.num_members, 3))
    return Members(pref, style)


def affinity(cfg: WorldConfig, members: Members, catalog: Catalog, users: np.ndarray, titles: np.ndarray) -> np.ndarray:
    """Member-title affinity, centred so a uniform taste scores 0: [len(users)]."""
    n_themes = len(cfg.themes)
    return n_themes * np.einsum("ik,ik->i", members.theme_pref[users], catalog.title_mix[titles]) - 1.0


def play_logits(cfg: WorldConfig, members: Members, catalog: Catalog, users: np.ndarray, titles: np.ndarray,
                noise: np.ndarray) -> np.ndarray:
    """The ground-truth play logit of every candidate artwork of each (user, title): [n, A]."""
    n_themes = len(cfg.themes)
    theme_pref = members.theme_pref[users][:, None, :]  # [n, 1, T]
    art_theme = catalog.art_theme[titles]  # [n, A]
    theme_term = n_themes * np.take_along_axis(theme_pref, art_theme[..., None], axis=2)[..., 0] - 1.0
    weights = np.asarray(cfg.style_weights)
    style_term = np.einsum("nak,nk->na", catalog.art_style[titles], members.style_pref[users] * weights)
    base = (cfg.base_logit + cfg.w_popularity * catalog.popularity[titles]
            + cfg.w_affinity * affinity(cfg, members, catalog, users, titles))
    return base[:, None] + cfg.w_theme * theme_term + cfg.w_style * style_term + noise


def production_probs(cfg: WorldConfig, catalog: Catalog, titles: np.ndarray, genre_share: np.ndarray) -> np.ndarray:
    """The logging policy: tags + history genre counts (no ratings, no past artworks): [n, A].

    ``genre_share[i, k]`` is the share of the member's watched titles carrying genre k.
    """
    art_theme = catalog.art_theme[titles]
    theme_score = np.take_along_axis(genre_share, art_theme, axis=1)  # [n, A]
    style_score = catalog.art_style[titles] @ np.asarray(cfg.production_style_prior)
    score = (cfg.production_genre_weight * theme_score + style_score) / cfg.production_temperature
    score = score - score.max(axis=1, keepdims=True)
    soft = np.exp(score) / np.exp(score).sum(axis=1, keepdims=True)
    a = cfg.artworks_per_title
    return cfg.propensity_floor + (1.0 - a * cfg.propensity_floor) * soft


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
