"""The demo world's knobs (docs/data.md, the demo world). Presets live in configs/world/*.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmart.config_checks import at_least, length, positive, probability, seeds, within

ALL_THEMES = ("romance", "action", "comedy", "horror", "family", "sci-fi", "drama", "documentary")


@dataclass
class WorldConfig:
    seed: int = field(default=0, metadata={"help": "Everything is a function of the seed: same seed, same bytes."})
    themes: list[str] = field(default_factory=lambda: list(ALL_THEMES), metadata={"help": f"Subset of {ALL_THEMES}."})

    # Catalog.
    num_titles: int = 400
    themes_per_title: list[int] = field(default_factory=lambda: [2, 3], metadata={"help": "min, max themes mixed in a title."})
    artworks_per_title: int = field(default=4, metadata={"help": "2-8 candidates per title."})
    image_width: int = 96
    image_height: int = 128

    # Members and their histories.
    num_members: int = 3000
    theme_concentration: float = field(default=0.3, metadata={"help": "Dirichlet alpha; small = members love few themes."})
    style_pref_std: float = field(default=1.0, metadata={"help": "Spread of members' shot/tone/title-size preferences."})
    history_length: list[int] = field(default_factory=lambda: [8, 30], metadata={"help": "min, max titles watched."})
    history_artwork_known: float = field(default=0.8, metadata={"help": "Share of history events that record the artwork played from."})
    pairs_per_member: list[int] = field(default_factory=lambda: [3, 6], metadata={"help": "min, max titles impressed per member."})

    # Play model (ground truth): logit = base + w_popularity*pop + w_affinity*affinity + w_theme*theme + w_style*style + noise.
    base_logit: float = -1.6
    w_popularity: float = 0.6
    w_affinity: float = 0.35
    w_theme: float = 0.45
    w_style: float = 0.55
    style_weights: list[float] = field(default_factory=lambda: [1.0, 0.8, 0.4], metadata={"help": "Relative weight of shot, tone, title size."})
    noise_std: float = field(default=0.25, metadata={"help": "Per member-artwork taste no feature explains."})

    # Logging policy ("production"): softmax over tag/genre-count scores, mixed to a floor.
    production_genre_weight: float = field(default=3.0, metadata={"help": "How strongly production follows history genre counts."})
    production_temperature: float = 0.7
    production_style_prior: list[float] = field(default_factory=lambda: [0.4, 0.3, 0.2], metadata={"help": "Global shot, tone, size bias."})
    propensity_floor: float = field(default=0.05, metadata={"help": "Every candidate is shown with at least this probability."})
    max_impressions_per_pair: int = 3
    continue_prob: float = field(default=0.6, metadata={"help": "Chance of another impression after one without a play."})

    # Splits by member-title pair.
    val_fraction: float = 0.05
    test_fraction: float = 0.15
    random_slice_fraction: float = field(default=0.35, metadata={"help": "Share of test pairs logged by a uniform random policy."})
    new_title_fraction: float = field(default=0.03, metadata={
        "help": "Share of titles held out of every training decision (no train or val pair, in no member's "
                "history): all their pairs are test pairs, so the report can score artworks the model never "
                "saw in training (new_titles.json lists them). 0 reproduces worlds generated before this option."})

    def __post_init__(self) -> None:
        unknown = [t for t in self.themes if t not in ALL_THEMES]
        if unknown or len(self.themes) < 2:
            raise ValueError(f"themes must be 2+ of {list(ALL_THEMES)}, got {self.themes}")
        if not 2 <= self.artworks_per_title <= 8:
            raise ValueError(f"artworks_per_title must be in 2..8, got {self.artworks_per_title}")
        lo, hi = self.themes_per_title
        if not 1 <= lo <= hi <= len(self.themes):
            raise ValueError(f"themes_per_title {self.themes_per_title} must satisfy 1 <= min <= max <= {len(self.themes)}")
        if not 0 < self.propensity_floor * self.artworks_per_title <= 1:
            raise ValueError(f"propensity_floor * artworks_per_title must be in (0, 1], got "
                             f"{self.propensity_floor} * {self.artworks_per_title}")
        seeds(self, "seed")
        at_least(self, 1, "num_titles", "num_members", "max_impressions_per_pair")
        at_least(self, 32, "image_width", "image_height")  # the renderer places motifs 12 px in and a 26 px title band
        positive(self, "theme_concentration", "production_temperature")
        at_least(self, 0, "style_pref_std", "noise_std")
        probability(self, "history_artwork_known", "continue_prob", "random_slice_fraction")
        length(self, "style_weights", 3, "shot, tone, title size")
        length(self, "production_style_prior", 3, "shot, tone, title size")
        within(self, "val_fraction", 0, 1, hi_open=True)
        within(self, "test_fraction", 0, 1, lo_open=True, hi_open=True)  # the report evaluates on test
        within(self, "new_title_fraction", 0, 1, hi_open=True)
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave room for train")
        for name in ("history_length", "pairs_per_member"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be [min, max] with 1 <= min <= max, got {getattr(self, name)}")
