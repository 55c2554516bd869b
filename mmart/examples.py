"""Contract rows -> prompts with artwork slots, answers and preference pairs.

One module for training, scoring and evaluation alike, so the prompt a model is trained
on is the prompt it is scored on. A prompt is a chat (system + user) whose user message
renders the member's history (most recent first, oldest dropped past a token budget,
never the candidates), the title, and the candidates lettered A, B, C... each followed
by its artwork: ``tokens_per_artwork`` slot tokens (``artwork_input: embeddings``) or
its caption text (``artwork_input: caption``, the paper's text-only variant).

Two answer formats (``answer``), both scored by one forward pass over the prompt:

* ``letter``: the prompt ends at the assistant's turn; the answer is the letter alone.
* ``per_candidate``: each candidate line ends with a marker word, and the candidate's score
  is the log-probability of " yes" right after it. The prompt is cut after the last marker
  (later tokens cannot change any score under causal attention).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from mmart.data.contract import Contract
from mmart.errors import UserError

SLOT_TOKEN = "<artwork>"  # must match mmart.model.llm.SLOT_TOKEN
LETTERS = "ABCDEFGH"
SYSTEM_PROMPT = "Pick the artwork this streaming member is most likely to play."
MARKER = "match"  # per_candidate: the word after each candidate's artwork; its next token is scored
SCORE_TOKEN = " yes"  # per_candidate: the token whose log-probability after MARKER is the candidate's score


@dataclass
class PromptConfig:
    answer: Literal["letter", "per_candidate"] = field(default="letter", metadata={
        "help": "letter = log-probs of the letters at the answer position (large LLMs); per_candidate = log p(' yes') "
                "after each candidate's artwork (small LLMs: SmolLM2-135M cannot map slots back to letters)."})
    artwork_input: Literal["embeddings", "caption"] = field(
        default="embeddings", metadata={"help": "embeddings = artwork slots; caption = text-only variant."})
    history_artworks: bool = field(default=True, metadata={"help": "Show the artwork each history title was played from."})
    max_history: int = field(default=20, metadata={"help": "At most this many recent history titles."})
    history_token_budget: int = field(default=320, metadata={"help": "Drop the oldest history lines past this many tokens."})
    shuffle_seed: int = field(default=0, metadata={"help": "Candidate order is shuffled per example with this seed."})
    synopsis: bool = field(default=True, metadata={"help": "Include the title's synopsis."})
    repeat_letter: bool = field(default=True, metadata={
        "help": "Write each candidate's letter again after its slots ('A: <artwork> A'), so a letter token can "
                "attend to its own artwork (causal attention only looks back)."})
    history_summary: bool = field(default=False, metadata={
        "help": "Add one line counting the tags of every artwork the member played from before the decision "
                "(all history, not just max_history lines): the member's looks in ~30 tokens. Needs artwork tags."})
    history_summary_top: int = field(default=0, metadata={
        "help": "0 = every tag with its count; N = only the N most played-from tags of each family, no counts "
                "(shorter, and a plainer matching task for a small LLM)."})
    names: bool = field(default=True, metadata={
        "help": "Include title names; off shortens prompts ~2x (the demo world's names only restate genres)."})

    def __post_init__(self) -> None:
        from mmart.config_checks import at_least

        at_least(self, 0, "max_history", "history_token_budget", "history_summary_top", "shuffle_seed")


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
    """Derives examples from a contract; holds the lookups every prompt needs."""

    def __init__(self, contract: Contract, cfg: PromptConfig, tokens_per_artwork: int = 1):
        self.cfg = cfg
        self.tokens_per_artwork = tokens_per_artwork  # slots per artwork: PipelineConfig.slots_per_artwork
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
    def _shuffled(self, title_id: str, key: str) -> list[str]:
        cands = list(self.artworks_of[title_id])
        if len(cands) > len(LETTERS):
            raise UserError(f"title {title_id} has {len(cands)} artworks; at most {len(LETTERS)} candidates are supported")
        order = _stable_rng(self.cfg.shuffle_seed, key).permutation(len(cands))
        return [cands[i] for i in order]

    def _split(self, split: str):
        return self.impressions[self.impressions.split == split]

    def choice_examples(self, split: str) -> list[Example]:
        """SFT: one example per played impression; the answer is the shown (played) artwork."""
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

    def preference_examples(self, split: str) -> list[Example]:
        """DPO: chosen = the played artwork; rejected = shown-and-not-played for the pair, else the others."""
        imps = self.impressions[(self.impressions.split == split) & ~self.impressions.played]
        not_played: dict[tuple[str, str], set[str]] = defaultdict(set)
        for uid, tid, aid in zip(imps.user_id, imps.title_id, imps.shown_artwork_id):
            not_played[(uid, tid)].add(aid)
        out = []
        for ex in self.choice_examples(split):
            skipped = not_played.get((ex.user_id, ex.title_id), set()) - {ex.shown_artwork_id}
            rejected = [i for i, a in enumerate(ex.candidates) if a in skipped]
            ex.rejected = rejected or [i for i in range(len(ex.candidates)) if i != ex.answer]
            out.append(ex)
        return out

    def pair_examples(self, split: str) -> list[Example]:
        """Scoring: one example per member-title pair, at its first impression (the policy's decision)."""
        first = self._split(split).drop_duplicates(["user_id", "title_id"], keep="first")
        out = []
        for uid, tid, ts in zip(first.user_id, first.title_id, first.timestamp):
            key = f"{uid}|{tid}"
            out.append(Example(key, uid, tid, split, int(ts), self._shuffled(tid, key)))
        return out

    # --- Rendering ----------------------------------------------------------------------------------
    def _artwork_text(self, artwork_id: str) -> tuple[str, list[str]]:
        if self.cfg.artwork_input == "caption":
            caption = " ".join(str(self.captions.get(artwork_id) or "no description").split())  # one line
            return f'"{caption}"', []
        return SLOT_TOKEN * self.tokens_per_artwork, [artwork_id]

    def history_lines(self, ex: Example) -> list[tuple[str, list[str]]]:
        """The member's history before the decision, most recent first: (line, artwork ids in its slots)."""
        lines: list[tuple[str, list[str]]] = []
        for ev in self.history.get(ex.user_id, []):
            if len(lines) >= self.cfg.max_history:
                break  # max_history 0: no lines (a history_summary can stand for the whole history)
            if int(ev["timestamp"]) >= ex.timestamp:
                continue  # never condition on the future
            t = self.titles[ev["title_id"]]
            text = f'- "{t.name}" ({", ".join(t.genres)})' if self.cfg.names else f"- {', '.join(t.genres)}"
            if ev.get("rating") is not None:
                text += f", rated {int(ev['rating'])}/5"
            arts: list[str] = []
            if self.cfg.history_artworks and ev.get("artwork_id") is not None:
                art_text, arts = self._artwork_text(ev["artwork_id"])
                text += f", played from {art_text}"
            lines.append((text, arts))
        return lines

    def history_summary(self, ex: Example) -> str | None:
        """'Played from looks: close-up 9 group 3; horror 5 comedy 2; ...' over the whole history (~40 tokens).

        Tags are grouped by family (the part before ':'), most frequent first within a family.
        """
        counts: dict[str, Counter] = defaultdict(Counter)
        for ev in self.history.get(ex.user_id, []):
            if int(ev["timestamp"]) < ex.timestamp and ev.get("artwork_id") is not None:
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

    def messages(self, ex: Example, count_tokens=None) -> tuple[list[dict], list[str]]:
        """Chat messages (no answer) and the artwork ids in slot order."""
        t = self.titles[ex.title_id]
        history, arts, used = [], [], 0
        for line, line_arts in self.history_lines(ex):
            cost = count_tokens(line) if count_tokens else 0
            if history and used + cost > self.cfg.history_token_budget:
                break  # the oldest go first; the candidates are never cut
            history.append(line); arts.extend(line_arts); used += cost
        cand_lines = []
        for letter, aid in zip(LETTERS, ex.candidates):
            art_text, art_ids = self._artwork_text(aid)
            if self.cfg.answer == "per_candidate":
                cand_lines.append(f"{letter}: {art_text} {MARKER}")
            else:
                cand_lines.append(f"{letter}: {art_text} {letter}" if self.cfg.repeat_letter else f"{letter}: {art_text}")
            arts.extend(art_ids)
        title = f'Title: "{t.name}" ({", ".join(t.genres)})' if self.cfg.names else f"Title: {', '.join(t.genres)}"
        if self.cfg.synopsis and getattr(t, "synopsis", None):
            title += f". {t.synopsis}"
        summary = [line for line in [self.history_summary(ex)] if line] if self.cfg.history_summary else []
        # max_history 0 shows no lines at all (the summary, if on, stands for the history).
        past = ["History, most recent first:", *(history or ["- (none)"])] if self.cfg.max_history > 0 else []
        if self.cfg.answer == "per_candidate":
            head = [*past, *summary, title, "Would they play it from each artwork (yes/no)?"]
            tail = []
        else:
            head = [*past, *summary, title, "Artworks:"]
            tail = [f"Answer with one letter ({LETTERS[0]}-{LETTERS[len(ex.candidates) - 1]})."]
        user = "\n".join([*head, *cand_lines, *tail])
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}], arts

    def candidate_line_ends(self, user: str, k: int) -> list[int]:
        """Character offsets in the user message just past each candidate's marker (per_candidate)."""
        ends, pos = [], len(user)
        for _ in range(k):  # the candidate lines are the message's last k lines
            pos = user.rfind("\n", 0, pos) if ends else pos
            ends.append(pos)
        ends = ends[::-1]
        for e in ends:
            if not user[:e].endswith(MARKER):
                raise AssertionError(f"candidate line does not end with {MARKER!r}: {user[:e][-40:]!r}")
        return ends


def letter_token_ids(tokenizer, k: int) -> list[int]:
    """The token id of each answer letter as the assistant's first token; each must be one token."""
    ids = []
    for letter in LETTERS[:k]:
        tok = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(tok) != 1:
            raise UserError(f"the tokenizer splits answer letter {letter!r} into {len(tok)} tokens; "
                            "choosing needs single-token letters")
        ids.append(tok[0])
    return ids


def score_token_id(tokenizer) -> int:
    """The per_candidate score token: " yes" (one token in SmolLM2's and Llama 3's vocabularies; else its first)."""
    return tokenizer(SCORE_TOKEN, add_special_tokens=False)["input_ids"][0]


def encode(builder: ExampleBuilder, ex: Example, tokenizer) -> dict:
    """Token ids of the prompt (chat template, generation prompt added), its artwork ids, and the answer.

    Returns ``input_ids`` (prompt only), ``artwork_ids`` (str, slot order), ``answer_ids`` (K token ids),
    ``score_positions`` (K positions for per_candidate, [] for letter: read at the prompt's end),
    ``answer`` (index or None), ``rejected`` (indices). The answer token is ``answer_ids[answer]``.
    """
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    messages, arts = builder.messages(ex, count_tokens=count)
    per_candidate = builder.cfg.answer == "per_candidate"
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not per_candidate)
    input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    positions: list[int] = []
    if per_candidate:
        user = messages[-1]["content"]
        start = text.rfind(user)
        if start < 0:
            raise UserError("the chat template does not copy the user message verbatim; use prompt.answer=letter")
        for end in builder.candidate_line_ends(user, len(ex.candidates)):
            prefix = tokenizer(text[: start + end], add_special_tokens=False)["input_ids"]
            if input_ids[: len(prefix)] != prefix:
                raise UserError(f"the tokenizer merges the marker {MARKER!r} with the text after it; "
                                "per_candidate scoring needs it to end a token (use prompt.answer=letter)")
            positions.append(len(prefix) - 1)
        input_ids = input_ids[: positions[-1] + 1]  # later tokens cannot change any score
    if builder.cfg.artwork_input == "embeddings":
        slot_id = tokenizer.convert_tokens_to_ids(SLOT_TOKEN)
        n_slots = sum(1 for i in input_ids if i == slot_id)
        if slot_id is None or slot_id == tokenizer.unk_token_id or n_slots != len(arts) * builder.tokens_per_artwork:
            raise UserError(f"the tokenizer does not keep {SLOT_TOKEN!r} as one token ({n_slots} slots for "
                            f"{len(arts)} artworks); load the LLM through mmart.model.llm so the slot token is added")
    return {
        "example_id": ex.example_id,
        "input_ids": input_ids,
        "artwork_ids": arts,
        "answer_ids": [score_token_id(tokenizer)] * len(ex.candidates) if per_candidate
        else letter_token_ids(tokenizer, len(ex.candidates)),
        "score_positions": positions,
        "answer": ex.answer,
        "rejected": list(ex.rejected),
    }
