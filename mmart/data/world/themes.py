"""What each theme looks like and sounds like: a palette, a motif, and words.

Palettes differ mainly in hue, so a vision tower can tell themes apart by colour and
by motif; tone (bright vs dark) moves brightness only, independent of theme.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Theme:
    name: str
    hue: tuple[float, float]  # degrees, the background hue range
    saturation: float  # 0-1
    motif: str  # see render.MOTIFS
    adjectives: tuple[str, ...]
    nouns: tuple[str, ...]
    premise: tuple[str, ...]  # synopsis fragments


THEMES: dict[str, Theme] = {
    t.name: t
    for t in (
        Theme("romance", (335, 355), 0.65, "hearts",
              ("Tender", "Secret", "Last", "Summer", "Golden", "Sweet"),
              ("Kiss", "Promise", "Letters", "Heart", "Wedding", "Waltz"),
              ("two strangers fall slowly in love", "an old flame returns", "a wedding goes sideways")),
        Theme("action", (12, 28), 0.85, "bursts",
              ("Rogue", "Final", "Iron", "Burning", "Rapid", "Lethal"),
              ("Strike", "Pursuit", "Protocol", "Fury", "Convoy", "Heist"),
              ("a car chase crosses the city", "an agent must stop a bomb", "a heist unravels")),
        Theme("comedy", (48, 60), 0.75, "bubbles",
              ("Crazy", "Awkward", "Lucky", "Silly", "Big", "Happy"),
              ("Roommates", "Vacation", "Mix-Up", "Party", "Neighbours", "Week"),
              ("a family trip goes hilariously wrong", "two rivals must share a flat", "a lie snowballs")),
        Theme("horror", (270, 290), 0.55, "silhouettes",
              ("Hollow", "Silent", "Cursed", "Black", "Crawling", "Hungry"),
              ("House", "Woods", "Whisper", "Cellar", "Ritual", "Night"),
              ("something waits in the cellar", "a cabin in the woods is not empty", "the whispers return")),
        Theme("family", (95, 125), 0.6, "suns",
              ("Little", "Brave", "Magic", "Sunny", "Wild", "Merry"),
              ("Puppy", "Garden", "Treehouse", "Friends", "Picnic", "Dragon"),
              ("a child befriends a lost puppy", "siblings find a magic garden", "a town rallies together")),
        Theme("sci-fi", (180, 196), 0.8, "grids",
              ("Quantum", "Stellar", "Neon", "Orbital", "Synthetic", "Distant"),
              ("Signal", "Colony", "Protocol", "Horizon", "Machine", "Drift"),
              ("a crew answers a distant signal", "an android learns to dream", "time folds in on itself")),
        Theme("drama", (212, 232), 0.55, "rain",
              ("Quiet", "Broken", "Long", "Grey", "Honest", "Distant"),
              ("Winter", "River", "Silence", "Years", "Verdict", "Road"),
              ("a family faces a hard winter", "a lawyer doubts her case", "old friends reckon with the past")),
        Theme("documentary", (28, 42), 0.25, "frames",
              ("Inside", "True", "Hidden", "Real", "Untold", "Wild"),
              ("Story", "Planet", "Archive", "Journey", "Oceans", "Record"),
              ("filmmakers follow a vanishing craft", "the untold story of a city", "a year on a remote island")),
    )
}
