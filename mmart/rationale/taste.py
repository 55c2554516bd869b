"""The taste teacher's evidence for a target, in words the member's history shows.

The taste teacher (``mmart.eval.teacher.TasteTeacher``) ranks a decision's candidates by
``logit P(play) = a * (x_k . w) + b_art * logit(artwork's play rate) + (title and member terms,
equal across candidates)``, ``x_k`` the candidate's features (``candidate_features``). A target's
margin over the alternatives is a sum of one term per feature,
``a * w_f * (x_target,f - mean over the alternatives of x_k,f)``, plus the play-rate term:
``contributions`` computes those terms exactly (the features of one tag family, and the genre
share with its square, are each one piece of evidence), and ``verbalise`` names the largest
positive ones with the counts from the history the prompt shows. Deterministic: the same
teacher, decision and target always give the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmart.eval.teacher import TasteTeacher, candidate_features, feature_names
from mmart.examples import Example, ExampleBuilder
from mmart.model.readout import LETTERS

FAMILY_WORDS = {"title": "title size"}  # how a tag family reads after its value: "large title size"


@dataclass
class Evidence:
    """One piece of the teacher's evidence: ``contribution`` to the target's logit P(play) over the alternatives'
    mean. ``kind``: ``choice:<family>``, ``genre`` (share and its square), ``lead``, ``rated`` or ``rate``."""

    kind: str
    contribution: float
    difference: float = 0.0  # choice:<family>: the target's feature minus the alternatives' mean (its sign)


def contributions(teacher: TasteTeacher, ex: Example, target: int) -> list[Evidence]:
    """The target's margin over the mean alternative, split into evidence, largest first (sums to the margin)."""
    if len(ex.candidates) < 2:
        return []
    art = teacher._art(ex.candidates)
    x = candidate_features(teacher._profiles([ex.user_id]), teacher.cat, art[None])[0]  # [K, F]
    others = [k for k in range(len(ex.candidates)) if k != target]
    a, b_art = teacher.weights[0], teacher.weights[1]
    terms = a * teacher.choice_weights * (x[target] - x[others].mean(0))  # [F]: sum(terms) + rate = the margin
    diffs = x[target] - x[others].mean(0)
    groups: dict[str, Evidence] = {}
    for name, value, diff in zip(feature_names(teacher.cat), terms, diffs):
        kind = "genre" if name in ("genre_share", "genre_share_sq") else name.replace("_share", "")
        e = groups.setdefault(kind, Evidence(kind, 0.0, float(diff)))
        e.contribution += float(value)
    rate = teacher._rate_features([ex.user_id] * len(art), list(ex.candidates), art)[:, 0]
    groups["rate"] = Evidence("rate", float(b_art * (rate[target] - rate[others].mean())))
    return sorted(groups.values(), key=lambda e: (-e.contribution, e.kind))


def _letters(ks: list[int]) -> str:
    names = [LETTERS[k] for k in ks]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class TasteVerbaliser:
    """Rationales from a fitted taste teacher and the prompt's example builder (history, tags, genres)."""

    def __init__(self, teacher: TasteTeacher, builder: ExampleBuilder, evidence: int = 2):
        self.teacher, self.builder, self.evidence = teacher, builder, evidence

    def __call__(self, ex: Example, target: int) -> str:
        found = contributions(self.teacher, ex, target)
        if not found:
            return f"{LETTERS[target]} is the only artwork of this title."
        positive = [e for e in found if e.contribution > 0][: self.evidence]
        sentences = [self.sentence(e, ex, target) for e in positive]
        if not positive:  # a played target the teacher does not favour: say so, and what counts most for it
            sentences = [f"Their history does not favour {LETTERS[target]} over the others; the least against it: "
                         + self.sentence(found[0], ex, target)]
        return " ".join(sentences) + f" So {LETTERS[target]}."

    # --- one sentence per kind of evidence ------------------------------------------------------------
    def sentence(self, e: Evidence, ex: Example, target: int) -> str:
        if e.kind.startswith("choice:"):
            return self._choice(e.kind.split(":", 1)[1], ex, target, e.difference)
        if e.kind in ("genre", "lead", "rated"):
            return self._genre(e.kind, ex, target)
        return self._rate(ex, target)

    def _tag(self, artwork_id: str, family: str) -> str | None:
        return next((t for t in self.builder.tags.get(artwork_id, []) if t.rpartition(":")[0] == family), None)

    def _look(self, tag: str) -> str:
        family, _, value = tag.rpartition(":")
        return f"{value} {FAMILY_WORDS.get(family, family)}"

    def _offered_and_chosen(self, ex: Example, tag: str) -> tuple[int, int, float]:
        """History titles (as the prompt shows them) that offered ``tag`` beside artworks without it; of those, how
        many the member played from an artwork with it; and how many a pick at random would have (the teacher's
        profile is the difference: played-from tags minus the title's mean)."""
        offered = chosen = 0
        chance = 0.0
        for ev in self.builder.history_events(ex):
            aid = ev.get("artwork_id")
            has = [tag in self.builder.tags.get(a, []) for a in self.builder.artworks_of.get(ev["title_id"], [])]
            if aid is None or not any(has) or all(has):
                continue
            offered += 1
            chosen += tag in self.builder.tags.get(aid, [])
            chance += sum(has) / len(has)
        return offered, chosen, chance

    def _choice(self, family: str, ex: Example, target: int, diff: float) -> str:
        letter = LETTERS[target]
        tag = self._tag(ex.candidates[target], family)
        others = [k for k in range(len(ex.candidates)) if k != target]
        looks = {k: self._tag(ex.candidates[k], family) for k in others}
        counted = {t: self._offered_and_chosen(ex, t) for t in {tag, *looks.values()} if t is not None}

        def told(t: str, verb: str) -> str:
            offered, chosen, chance = counted[t]
            n = chosen if verb == "played from" else offered - chosen
            return (f"In {n} of the {offered} titles in their history that offered a {self._look(t)} beside other "
                    f"looks, they {verb} it ({chance if verb == 'played from' else offered - chance:.1f} by chance)")

        if diff > 0 and tag is not None and counted[tag][1] > counted[tag][2]:
            same = [k for k in others if looks[k] == tag]
            return f"{told(tag, 'played from')}; {letter} has a {self._look(tag)}, " + (
                f"as does {_letters(same)}." if same else "the others do not.")
        if diff > 0:  # the target's look is no draw: an alternative's look the member passed over is
            passed = [t for t in set(looks.values()) - {tag, None} if counted[t][1] < counted[t][2]]
            if passed:
                t = min(passed, key=lambda t: (counted[t][1] - counted[t][2], t))
                holders = [k for k in others if looks[k] == t]
                return (f"{told(t, 'passed over')}; {_letters(holders)} {'has' if len(holders) == 1 else 'have'} "
                        f"a {self._look(t)}, {letter} does not.")
            return f"{letter}'s {FAMILY_WORDS.get(family, family)} fits their past choices better than the others'."
        # diff < 0: the teacher's fitted weight for this family is negative, so a weaker match counts for the target
        matched = [t for t in set(looks.values()) - {tag, None} if counted[t][1] > counted[t][2]]
        t = max(matched, key=lambda t: (counted[t][1] - counted[t][2], t)) if matched else None
        said = f"{told(t, 'played from')}, yet " if t else ""
        return (f"{said}the taste teacher, fitted on every member, weighs a {FAMILY_WORDS.get(family, family)} that "
                f"matches past choices against an artwork; {letter}'s matches them least.")

    def _genre(self, kind: str, ex: Example, target: int) -> str:
        letter = LETTERS[target]
        events = self.builder.history_events(ex)
        genres_of = {k: self._genres_named(ex.candidates[k]) for k in range(len(ex.candidates))}
        named = genres_of[target] or sorted({g for gs in genres_of.values() for g in gs})[:1]
        if not named:
            return f"{letter}'s theme fits the genres they watch."
        rest = sorted({g for k, gs in genres_of.items() if k != target for g in gs} - set(named))
        if kind == "rated":
            def avg(g: str) -> str:
                r = [float(ev["rating"]) for ev in events if ev.get("rating") is not None
                     and g in self.builder.titles[ev["title_id"]].genres]
                return f"{np.mean(r):.1f}/5" if r else "unrated"
            others = "; ".join(f"{g} {avg(g)}" for g in rest)
            return (f"They rated their {named[0]} titles {avg(named[0])} on average"
                    f"{f' ({others})' if others else ''}; {letter}'s theme is {named[0]}.")
        if kind == "lead":
            def count(g: str) -> int:
                return sum(len(self.builder.titles[ev["title_id"]].genres) > 0
                           and self.builder.titles[ev["title_id"]].genres[0] == g for ev in events)
            what = "led by"
        else:
            def count(g: str) -> int:
                return sum(g in self.builder.titles[ev["title_id"]].genres for ev in events)
            what = ""  # "3 of the 8 titles they watched were drama"
        others = ", ".join(f"{g} {count(g)}" for g in rest)
        return (f"{count(named[0])} of the {len(events)} title{'s' if len(events) != 1 else ''} they watched were "
                f"{what + ' ' if what else ''}{named[0]}"
                f"{f' (of the other themes here: {others})' if others else ''}; {letter}'s theme is {named[0]}.")

    def _genres_named(self, artwork_id: str) -> list[str]:
        """The genres an artwork's tags name (theme:romance <-> the genre romance), as the teacher matches them."""
        genres = {g for t in self.builder.titles.values() for g in t.genres}
        return sorted({t.rpartition(":")[2] for t in self.builder.tags.get(artwork_id, [])} & genres)

    def _rate(self, ex: Example, target: int) -> str:
        art_rate, prior = self.teacher.rates[0], self.teacher.prior
        rate = {k: art_rate.get(a, prior) for k, a in enumerate(ex.candidates)}
        others = ", ".join(f"{LETTERS[k]} {rate[k]:.0%}" for k in rate if k != target)
        return (f"Shown to members in the training logs, {LETTERS[target]} was played {rate[target]:.0%} of the "
                f"time ({others}).")
