"""Contract rows -> decisions: prompts with artwork slots, answers and preference pairs.

One module for training, scoring and evaluation alike, so the prompt a model is trained
on is the prompt it is scored on. A decision's prompt has two parts:

* the **member prefix**: the chat template's opening, the system text, and the member's
  history before the decision (most recent first, oldest dropped past a token budget, each
  line with the artwork the member played from) and its one-line summary;
* the **title block**: the title, then the readout's lines (``mmart.model.readout``): each
  candidate lettered A, B, C... with its artwork (``slots_per_artwork`` slot tokens, or
  its caption in the text-only variant), and the readout's closing.

A title block depends on its prefix and on nothing after it, so several title blocks of
one member can share one prefix (``mmart.model.packing``). The two parts are tokenized
apart and concatenated, so a decision has the same tokens alone or packed.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from mmart.data.contract import Contract
from mmart.errors import UserError
from mmart.model.readout import LETTERS, Art, Piece, Read, ReadAll, Readout, Text, make_readout

SYSTEM_PROMPT = "Pick the artwork this streaming member is most likely to play."
_SPLIT = "\x00mmart-user-message\x00"  # stands for the user message when the chat template is split
ANSWER_CUE = "\nAnswer:"  # after the rationale the model writes before its letter (sft.reasoning: before_answer)
RATIONALE_CUE = "\nWhy:"  # between a rationale block's title block and its rationale (sft.reasoning: auxiliary)


@dataclass
class PromptConfig:
    answer: Literal["letter", "per_candidate"] = field(default="letter", metadata={
        "help": "The readout. letter = log-probs of the letters at the answer position (large LLMs); per_candidate = "
                "log p(' yes') after each candidate's artwork (small LLMs: SmolLM2-135M cannot map slots back to "
                "letters)."})
    artwork_input: Literal["embeddings", "caption"] = field(
        default="embeddings", metadata={"help": "embeddings = artwork slots; caption = text-only variant."})
    history_artworks: bool = field(default=True, metadata={"help": "Show the artwork each history title was played from."})
    max_history: int = field(default=20, metadata={"help": "At most this many recent history titles."})
    history_token_budget: int = field(default=320, metadata={"help": "Drop the oldest history lines past this many tokens."})
    shuffle_seed: int = field(default=0, metadata={"help": "Candidate order is shuffled per example with this seed."})
    synopsis: bool = field(default=True, metadata={"help": "Include the title's synopsis."})
    repeat_letter: bool = field(default=True, metadata={
        "help": "letter readout: write each candidate's letter again after its slots ('A: <artwork> A'), so a letter "
                "token can attend to its own artwork (causal attention only looks back)."})
    history_summary: bool = field(default=False, metadata={
        "help": "Add one line summarising the tags of every artwork the member played from before the decision "
                "(all history, not just max_history lines; how: history_summary_looks): the member's looks in "
                "~25-40 tokens. Needs artwork tags."})
    history_summary_looks: Literal["played", "chosen"] = field(default="played", metadata={
        "help": "played = count the tags of the artworks played from; chosen = per tag, how often the member played "
                "from an artwork with it beyond what the title's artworks offered (played minus the candidates' "
                "mean, summed), preferred looks first with that margin: the contrast, without the catalog's base "
                "rates (a look every title offers counts high for every member). (evidence: docs/experiments.md)"})
    history_summary_top: int = field(default=0, metadata={
        "help": "0 = every tag with its count; N = only the N most played-from tags of each family, no counts "
                "(shorter, and a plainer matching task for a small LLM); with history_summary_looks: chosen, the "
                "N most preferred looks of each family, margins kept."})
    history_summary_margins: Literal["numbers", "repeat"] = field(default="numbers", metadata={
        "help": "How history_summary_looks: chosen writes a look's margin: numbers = 'close-up +3'; repeat = the "
                "look's word once per unit of margin ('close-up close-up close-up'), so a candidate's artwork slot "
                "that matches it meets it as often as the member preferred it (about as many tokens as numbers)."
                " (evidence: docs/experiments.md)"})
    history_genres: int = field(default=0, metadata={
        "help": "N > 0: one more line over the whole history, 'Watched 24 titles: drama 12, romance 8, ...', the N "
                "genres the member watched most with their title counts (the lines show only max_history titles; "
                "~4 + 3N tokens). 0 = no line. (evidence: docs/experiments.md)"})
    names: bool = field(default=True, metadata={
        "help": "Include title names; off shortens prompts (the demo world's names only restate genres)."})
    candidate_context: Literal["title", "own"] = field(default="title", metadata={
        "help": "title = one block per title, its candidates in a row, so each candidate's score also reads the "
                "ones before it (and so depends on their order); own = each candidate in a block of its own (the "
                "title line, then that artwork alone), so its score reads the member and the title only and no "
                "candidate order can change a choice (per_candidate readout only; ~10% more tokens on the default prompt)."
                " (evidence: docs/experiments.md)"})

    def __post_init__(self) -> None:
        from mmart.config_checks import at_least

        at_least(self, 0, "max_history", "history_token_budget", "history_summary_top", "history_genres", "shuffle_seed")
        if self.history_summary_margins == "repeat" and self.history_summary_looks != "chosen":
            raise UserError("prompt.history_summary_margins=repeat writes the margins of history_summary_looks: chosen; "
                            "set prompt.history_summary_looks=chosen or prompt.history_summary_margins=numbers")
        if self.candidate_context == "own" and self.answer != "per_candidate":
            raise UserError("prompt.candidate_context=own reads each candidate in its own block, which only the "
                            "per_candidate readout can (letter reads all candidates at one answer position): "
                            "set prompt.answer=per_candidate or prompt.candidate_context=title")


@dataclass
class Example:
    """One (member, title) decision. ``candidates`` are artwork ids in letter order."""

    example_id: str
    user_id: str
    title_id: str
    split: str
    timestamp: int
    candidates: list[str]
    answer: int | None = None  # index of the played artwork in ``candidates``
    rejected: list[int] = field(default_factory=list)  # indices for preference pairs
    propensity: float | None = None
    shown_artwork_id: str | None = None
    logging_policy: str | None = None


def _stable_rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class ExampleBuilder:
    """Derives examples from a contract and renders their prompts as pieces (text, artworks, read marks)."""

    def __init__(self, contract: Contract, cfg: PromptConfig):
        self.cfg = cfg
        self.readout: Readout = make_readout(cfg.answer, cfg.repeat_letter)
        titles = contract.frame("titles")
        self.titles = {r.title_id: r for r in titles.itertuples(index=False)}
        arts = contract.frame("artworks")
        self.tags = {a: list(t) for a, t in zip(arts.artwork_id, arts["tags"])} if "tags" in arts else {}
        self.captions = dict(zip(arts.artwork_id, arts["caption"] if "caption" in arts else arts.artwork_id))
        self.artworks_of: dict[str, list[str]] = defaultdict(list)
        for aid, tid in zip(arts.artwork_id, arts.title_id):
            self.artworks_of[tid].append(aid)
        users = contract.frame("users")
        self.history = {uid: sorted(h, key=lambda e: -int(e["timestamp"])) for uid, h in zip(users.user_id, users.history)}
        self.impressions = contract.frame("impressions").sort_values(["user_id", "title_id", "timestamp", "impression_id"])

    # --- Which examples ---------------------------------------------------------------------------
    def _shuffled(self, title_id: str, key: str, seed: int | None = None) -> list[str]:
        cands = list(self.artworks_of[title_id])
        if len(cands) > len(LETTERS):
            raise UserError(f"title {title_id} has {len(cands)} artworks; at most {len(LETTERS)} candidates are supported")
        order = _stable_rng(self.cfg.shuffle_seed if seed is None else seed, key).permutation(len(cands))
        return [cands[i] for i in order]

    def reordered(self, ex: Example, order: int) -> Example:
        """``ex`` (a pair example) with its candidates in the order ``shuffle_seed + order`` gives (0: as it is)."""
        from dataclasses import replace

        if order == 0:
            return ex
        return replace(ex, example_id=f"{ex.example_id}#order{order}",
                       candidates=self._shuffled(ex.title_id, ex.example_id, self.cfg.shuffle_seed + order))

    def _split(self, split: str):
        return self.impressions[self.impressions.split == split]

    def choice_examples(self, split: str) -> list[Example]:
        """One example per played impression; the answer is the shown (played) artwork."""
        imps = self._split(split)
        imps = imps[imps.played]
        policies = imps["logging_policy"] if "logging_policy" in imps else [None] * len(imps)
        out = []
        for iid, uid, tid, ts, shown, prop, pol in zip(imps.impression_id, imps.user_id, imps.title_id, imps.timestamp,
                                                       imps.shown_artwork_id, imps.propensity, policies):
            cands = self._shuffled(tid, iid)
            out.append(Example(iid, uid, tid, split, int(ts), cands, answer=cands.index(shown),
                               propensity=float(prop), shown_artwork_id=shown, logging_policy=pol))
        return out

    def unlogged_examples(self, examples: list[Example], per_prefix: int, seed: int = 0) -> list[Example]:
        """For each member prefix among ``examples``, ``per_prefix`` catalog titles the member has neither
        watched nor been shown (in any split), at the prefix's time, with all their artworks and no label.

        A teacher's choice distribution is defined on any member and title, not only on logged ones;
        packed behind a prefix the member's history is read once for all of them, so each costs only
        its title block (``sft.unlogged_titles``).
        """
        if per_prefix <= 0:
            return []
        touched: dict[str, set[str]] = defaultdict(set)
        for uid, tid in zip(self.impressions.user_id, self.impressions.title_id):
            touched[uid].add(tid)
        titles = sorted(t for t, a in self.artworks_of.items() if 2 <= len(a) <= len(LETTERS))
        first: dict[object, Example] = {}
        for ex in examples:
            first.setdefault(self.prefix_key(ex), ex)
        out = []
        for key, ex in first.items():
            seen = touched[ex.user_id] | {e["title_id"] for e in self.history.get(ex.user_id, [])}
            pool = [t for t in titles if t not in seen]
            rng = _stable_rng(seed, f"unlogged:{ex.user_id}:{ex.timestamp}")
            for i in rng.permutation(len(pool))[:per_prefix]:
                tid = pool[i]
                eid = f"unlogged|{ex.user_id}|{tid}|{ex.timestamp}"
                out.append(Example(eid, ex.user_id, tid, ex.split, ex.timestamp, self._shuffled(tid, eid)))
        return out

    def _not_played(self, split: str) -> dict[tuple[str, str], set[str]]:
        imps = self.impressions[(self.impressions.split == split) & ~self.impressions.played]
        out: dict[tuple[str, str], set[str]] = defaultdict(set)
        for uid, tid, aid in zip(imps.user_id, imps.title_id, imps.shown_artwork_id):
            out[(uid, tid)].add(aid)
        return out

    def preference_examples(self, split: str) -> list[Example]:
        """DPO: chosen = the played artwork; rejected = shown-and-not-played for the pair, else the others."""
        not_played = self._not_played(split)
        out = []
        for ex in self.choice_examples(split):
            skipped = not_played.get((ex.user_id, ex.title_id), set()) - {ex.shown_artwork_id}
            rejected = [i for i, a in enumerate(ex.candidates) if a in skipped]
            ex.rejected = rejected or [i for i in range(len(ex.candidates)) if i != ex.answer]
            out.append(ex)
        return out

    def pair_examples(self, split: str, labels: bool = False) -> list[Example]:
        """One example per member-title pair, at its first impression (the policy's decision).

        ``labels``: also the logged outcome, for training on every logged decision: ``answer`` is the
        played artwork (None when no impression was played), ``rejected`` the shown-and-not-played
        ones, ``propensity`` that of the played impression (else of the first).
        """
        imps = self._split(split)
        first = imps.drop_duplicates(["user_id", "title_id"], keep="first")
        played = {}
        if labels:
            for uid, tid, aid, prop in zip(imps.user_id[imps.played], imps.title_id[imps.played],
                                           imps.shown_artwork_id[imps.played], imps.propensity[imps.played]):
                played[(uid, tid)] = (aid, float(prop))
        not_played = self._not_played(split) if labels else {}
        policies = first["logging_policy"] if "logging_policy" in first else [None] * len(first)
        out = []
        for uid, tid, ts, shown, prop, pol in zip(first.user_id, first.title_id, first.timestamp,
                                                  first.shown_artwork_id, first.propensity, policies):
            key = f"{uid}|{tid}"
            ex = Example(key, uid, tid, split, int(ts), self._shuffled(tid, key), logging_policy=pol)
            if labels:
                won = played.get((uid, tid))
                ex.shown_artwork_id, ex.propensity = won if won else (shown, float(prop))
                ex.answer = ex.candidates.index(won[0]) if won else None
                skipped = not_played.get((uid, tid), set()) - {won[0] if won else None}
                ex.rejected = [i for i, a in enumerate(ex.candidates) if a in skipped]
            out.append(ex)
        return out

    # --- Rendering ----------------------------------------------------------------------------------
    def history_events(self, ex: Example) -> list[dict]:
        """The member's history events before the decision, most recent first."""
        return [ev for ev in self.history.get(ex.user_id, []) if int(ev["timestamp"]) < ex.timestamp]

    def history_lines(self, ex: Example) -> list[list[Piece]]:
        """One line per recent history title (at most ``max_history``), most recent first, as pieces."""
        lines: list[list[Piece]] = []
        for ev in self.history_events(ex)[: self.cfg.max_history]:  # max_history 0: no lines
            t = self.titles[ev["title_id"]]
            text = f'- "{t.name}" ({", ".join(t.genres)})' if self.cfg.names else f"- {', '.join(t.genres)}"
            if ev.get("rating") is not None:
                text += f", rated {int(ev['rating'])}/5"
            if self.cfg.history_artworks and ev.get("artwork_id") is not None:
                lines.append([Text(text + ", played from "), Art(ev["artwork_id"])])
            else:
                lines.append([Text(text)])
        return lines

    def history_summary(self, ex: Example) -> str | None:
        """'Played from looks: close-up 9 group 3; horror 5 comedy 2; ...' over the whole history (~40 tokens).

        Tags are grouped by family (the part before ':'), most frequent first within a family.
        ``history_summary_looks: chosen``: 'Chose looks over the others: close-up +3; romance +2 action +1; ...'.
        """
        if self.cfg.history_summary_looks == "chosen":
            return self._chosen_summary(ex)
        counts: dict[str, Counter] = defaultdict(Counter)
        for ev in self.history_events(ex):
            if ev.get("artwork_id") is not None:
                for tag in self.tags.get(ev["artwork_id"], []):
                    family, _, value = tag.rpartition(":")
                    counts[family][value] += 1
        if not counts:
            return None
        top = self.cfg.history_summary_top
        if top > 0:
            groups = [", ".join(v for v, _ in c.most_common(top)) for _, c in sorted(counts.items())]
        else:
            groups = [" ".join(f"{v} {n}" for v, n in c.most_common()) for _, c in sorted(counts.items())]
        return "Played from looks: " + "; ".join(groups)

    def _chosen_summary(self, ex: Example) -> str | None:
        margin: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for ev in self.history_events(ex):
            aid = ev.get("artwork_id")
            offered = self.artworks_of.get(ev["title_id"], [])
            if aid is None or len(offered) < 2:  # one artwork: no choice was made
                continue
            for tag in self.tags.get(aid, []):
                family, _, value = tag.rpartition(":")
                margin[family][value] += 1.0
            for other in offered:
                for tag in self.tags.get(other, []):
                    family, _, value = tag.rpartition(":")
                    margin[family][value] -= 1.0 / len(offered)
        top = self.cfg.history_summary_top
        groups = []
        for _, m in sorted(margin.items()):
            kept = [(v, round(x)) for v, x in sorted(m.items(), key=lambda kv: -kv[1]) if round(x) > 0]
            kept = kept[:top] if top > 0 else kept
            if kept and self.cfg.history_summary_margins == "repeat":
                groups.append(" ".join(" ".join([v] * n) for v, n in kept))
            elif kept:
                groups.append(" ".join(f"{v} +{n}" for v, n in kept))
        return "Chose looks over the others: " + "; ".join(groups) if groups else None

    def genre_summary(self, ex: Example) -> str | None:
        """'Watched 24 titles: drama 12, romance 8, comedy 5' over the whole history (``history_genres`` genres)."""
        events = self.history_events(ex)
        counts = Counter(g for ev in events for g in self.titles[ev["title_id"]].genres)
        if not counts:
            return None
        top = ", ".join(f"{g} {n}" for g, n in counts.most_common(self.cfg.history_genres))
        return f"Watched {len(events)} title{'s' if len(events) != 1 else ''}: {top}"

    def prefix_key(self, ex: Example) -> tuple[str, int]:
        """Decisions with equal keys render the same member prefix: same member, same history before them."""
        return ex.user_id, len(self.history_events(ex))

    def prefix_pieces(self, ex: Example, count_tokens=None) -> list[Piece]:
        """The member prefix's body (the user message's start): history lines and summary, each ending in a newline."""
        lines, used = [], 0
        for line in self.history_lines(ex):
            cost = count_tokens(line) if count_tokens else 0
            if lines and used + cost > self.cfg.history_token_budget:
                break  # the oldest go first
            lines.append(line)
            used += cost
        pieces: list[Piece] = []
        if self.cfg.max_history > 0:  # max_history 0 shows no lines at all (the summary stands for the history)
            pieces.append(Text("History, most recent first:\n"))
            for line in lines or [[Text("- (none)")]]:
                pieces.extend([*line, Text("\n")])
        summary = self.history_summary(ex) if self.cfg.history_summary else None
        if summary:
            pieces.append(Text(summary + "\n"))
        genres = self.genre_summary(ex) if self.cfg.history_genres else None
        if genres:
            pieces.append(Text(genres + "\n"))
        preamble = self.readout.preamble()
        if preamble:
            pieces.append(Text(preamble + "\n"))
        return pieces

    def title_line(self, ex: Example) -> str:
        t = self.titles[ex.title_id]
        line = f'Title: "{t.name}" ({", ".join(t.genres)})' if self.cfg.names else f"Title: {', '.join(t.genres)}"
        if self.cfg.synopsis and getattr(t, "synopsis", None):
            line += f". {t.synopsis}"
        return line

    def block_pieces(self, ex: Example, chat_tail: str = "") -> list[list[Piece]]:
        """The title's blocks: one (title line, the readout's question, candidate lines, closing), or with
        ``candidate_context: own`` one per candidate, each that candidate alone (read as the first)."""
        line = self.title_line(ex)
        if self.cfg.candidate_context == "own":
            return [self.readout.block_pieces(line, [aid], chat_tail) for aid in ex.candidates]
        return [self.readout.block_pieces(line, ex.candidates, chat_tail)]

    def caption_text(self, artwork_id: str) -> str:
        caption = " ".join(str(self.captions.get(artwork_id) or "no description").split())  # one line
        return f'"{caption}"'


@dataclass
class Segment:
    """Token ids with their artworks (slot order) and read positions (``reads[k]``: candidate k's position)."""

    ids: list[int]
    artworks: list[str]
    reads: list[int] = field(default_factory=list)
    labels: list[int] | None = None  # per token: its id where trained as text, IGNORE elsewhere (None: none)


@dataclass
class Decision:
    """One example, encoded: its member prefix (shared by key), its title block(s) and the tokens it reads.

    ``blocks``: one block per title, or one per candidate (``candidate_context: own``); each attends to
    the prefix and to itself only; their reads, in block order, are the candidates'.
    """

    example: Example
    prefix_key: tuple[str, int]
    prefix: Segment
    blocks: list[Segment]
    read_ids: list[int]  # [K] token read for each candidate
    # ``sft.reasoning: auxiliary``: a block of its own (the title block, a cue, the rationale) whose last
    # ``rationale_tokens`` tokens are trained as text; never scored.
    rationale: Segment | None = None
    rationale_tokens: int = 0

    @property
    def block(self) -> Segment:
        """The title's one block (``candidate_context: title``)."""
        if len(self.blocks) != 1:
            raise ValueError(f"decision {self.example.example_id} has {len(self.blocks)} blocks, one per candidate")
        return self.blocks[0]


class PromptEncoder:
    """Pieces -> token ids for one tokenizer: the chat template split around the user message, slots expanded.

    The chat template is rendered once with a placeholder user message and split there: the
    member prefix gets the opening (system turn, start of the user turn), and a readout that
    ends at the answer (``letter``) closes its block with the rest (end of turn, generation prompt).
    """

    def __init__(self, builder: ExampleBuilder, tokenizer, slots_per_artwork: int = 1, slot_token: str | None = None):
        from mmart.model.llm import SLOT_TOKEN

        self.builder, self.tokenizer, self.slots = builder, tokenizer, slots_per_artwork
        self.slot_token = slot_token or SLOT_TOKEN
        self.embeddings = builder.cfg.artwork_input == "embeddings"
        slot_id = tokenizer.convert_tokens_to_ids(self.slot_token)
        if self.embeddings and (slot_id is None or slot_id == tokenizer.unk_token_id):
            raise UserError(f"the tokenizer has no {self.slot_token!r} token; load the LLM through mmart.model.llm "
                            "(load_llm / build_chooser) so the slot token is added")
        self.slot_id = slot_id
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": _SPLIT}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(_SPLIT) != 1:
            raise UserError("the tokenizer's chat template does not copy the user message verbatim; mmart needs it to")
        self.chat_head, self.chat_tail = text.split(_SPLIT)
        self.read_ids_of = {}  # K -> read token ids
        self._prefixes: dict[tuple[str, int], Segment] = {}

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode_pieces(self, pieces: list[Piece], k: int = 0) -> Segment:
        ids: list[int] = []
        arts: list[str] = []
        reads: dict[int, int] = {}
        for p in pieces:
            if isinstance(p, Text):
                ids.extend(self._ids(p.text))
            elif isinstance(p, Art):
                if self.embeddings:
                    ids.extend([self.slot_id] * self.slots)
                    arts.append(p.artwork_id)
                else:
                    ids.extend(self._ids(self.builder.caption_text(p.artwork_id)))
            elif isinstance(p, Read):
                reads[p.k] = len(ids) - 1
            elif isinstance(p, ReadAll):
                reads.update({j: len(ids) - 1 for j in range(k)})
        if self.embeddings and ids.count(self.slot_id) != self.slots * len(arts):
            raise UserError(f"a prompt's text contains the slot token {self.slot_token!r} itself (e.g. in a caption or "
                            "title name); remove it from the catalog")
        return Segment(ids, arts, [reads[j] for j in sorted(reads)])

    def count_tokens(self, pieces: list[Piece]) -> int:
        return sum(len(self._ids(p.text)) if isinstance(p, Text) else self.slots if isinstance(p, Art) else 0
                   for p in pieces)

    def prefix(self, ex: Example) -> tuple[tuple[str, int], Segment]:
        """The member prefix of ``ex`` (encoded once per key)."""
        key = self.builder.prefix_key(ex)
        if key not in self._prefixes:
            pieces = [Text(self.chat_head), *self.builder.prefix_pieces(ex, self.count_tokens)]
            self._prefixes[key] = self.encode_pieces(pieces)
        return key, self._prefixes[key]

    def decision(self, ex: Example) -> Decision:
        key, prefix = self.prefix(ex)
        k = len(ex.candidates)
        tail = self.chat_tail if self.builder.readout.ends_at_answer else ""
        parts = self.builder.block_pieces(ex, tail)
        blocks = [self.encode_pieces(pieces, k if len(parts) == 1 else 1) for pieces in parts]
        reads = sum(len(b.reads) for b in blocks)
        if reads != k:
            raise AssertionError(f"readout {self.builder.readout.name} marked {reads} reads for {k} candidates")
        if k not in self.read_ids_of:
            self.read_ids_of[k] = self.builder.readout.read_token_ids(self.tokenizer, k)
        return Decision(ex, key, prefix, blocks, self.read_ids_of[k])

    def with_rationale(self, d: Decision, rationale: str) -> Decision:
        """``d`` with its rationale block: the title block as the decision's prompt renders it (all candidates in
        one block, also under ``candidate_context: own``), the cue ``RATIONALE_CUE``, then ``rationale``'s tokens,
        the only ones trained (``Decision.rationale_tokens``)."""
        from dataclasses import replace

        head = self._rationale_head(d)
        text = self._ids(" " + " ".join(rationale.split()))
        if self.embeddings and self.slot_id in text:
            raise UserError(f"the rationale of decision {d.example.example_id} contains the slot token "
                            f"{self.slot_token!r}; write the rationales again without it")
        block = Segment(list(head.ids) + text, list(head.artworks))
        return replace(d, rationale=block, rationale_tokens=len(text))

    def _rationale_head(self, d: Decision) -> Segment:
        """A rationale block up to its cue: the title block with every candidate, then ``RATIONALE_CUE``."""
        if len(d.blocks) == 1:
            title = d.blocks[0]
        else:
            tail = self.chat_tail if self.builder.readout.ends_at_answer else ""
            pieces = self.builder.readout.block_pieces(self.builder.title_line(d.example), d.example.candidates, tail)
            title = self.encode_pieces(pieces, len(d.example.candidates))
        return Segment(list(title.ids) + self._ids(RATIONALE_CUE), list(title.artworks))

    def rationale_prompt(self, d: Decision, reasoning: str) -> Segment:
        """The block after the member prefix that the model writes its rationale behind: under ``before_answer``
        the title block up to the answer turn's start; under ``auxiliary`` the rationale block up to its cue."""
        if reasoning == "before_answer":
            return Segment(list(d.block.ids), list(d.block.artworks))
        if reasoning == "auxiliary":
            return self._rationale_head(d)
        raise UserError(f"a model trained with sft.reasoning={reasoning!r} writes no rationale: train it with "
                        "sft.reasoning: before_answer or auxiliary to have it explain its choices")

    def with_answer_after(self, d: Decision, rationale: str, trained: bool = False) -> Decision:
        """``d`` as ``sft.reasoning: before_answer`` reads it: the title block, the answer turn's ``rationale``,
        ``ANSWER_CUE``, then every candidate's letter read at the cue's last token (" A", " B", ...).

        ``trained``: the rationale's and the cue's tokens are labelled (SFT learns to write them, and to close
        its rationale with the cue, where generation stops); scoring passes the model's own rationale unlabelled.
        """
        from dataclasses import replace

        from mmart.model.packing import IGNORE

        if not self.builder.readout.ends_at_answer or len(d.blocks) != 1:
            raise UserError("sft.reasoning: before_answer needs one answer position after every candidate "
                            "(prompt.answer: letter, prompt.candidate_context: title)")
        title = d.block
        text = self._ids(" ".join(rationale.split())) + self._ids(ANSWER_CUE)
        if self.embeddings and self.slot_id in text:
            raise UserError(f"the rationale of decision {d.example.example_id} contains the slot token "
                            f"{self.slot_token!r}; write the rationales again without it")
        ids = list(title.ids) + text
        k = len(d.example.candidates)
        labels = [IGNORE] * len(title.ids) + text if trained else None
        block = Segment(ids, list(title.artworks), [len(ids) - 1] * k, labels)
        return replace(d, blocks=[block], read_ids=self.builder.readout.read_token_ids(self.tokenizer, k, spaced=True))

    def text(self, ex: Example) -> str:
        """The decision's prompt as text (slots shown as the slot token): for reading and tests."""
        d = self.decision(ex)
        return self.tokenizer.decode(d.prefix.ids + [t for b in d.blocks for t in b.ids])
