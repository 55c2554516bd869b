"""The readout: how one forward pass becomes a score per candidate.

A readout is the one place that knows an answer form. It owns

* the text of a title block after the title line: the question, each candidate's line
  (its letter, its artwork, and whatever follows), and the block's closing; and the member
  prefix's last line when the question is the same for every title (``preamble``: said once
  per member, not once per title, so a packed home page repeats fewer tokens);
* what it reads: for candidate k, a token id and the block position where its
  log-probability is taken (``Read`` marks in the block, ``read_token_ids``);
* how those log-probabilities become candidate scores (``candidate_scores``).

Two readouts ship (``prompt.answer``):

* ``letter``: the candidates' letters at the answer position, after the chat template's
  generation prompt (large LLMs such as Llama 3.1 8B);
* ``per_candidate``: the log-probability of " yes" right after each candidate's artwork and
  a marker word (small LLMs: SmolLM2-135M cannot map an artwork back to its letter).

Adding a readout is one subclass registered in ``READOUTS``; a new LLM family needs
nothing here unless it splits a letter or " yes" into several tokens (``read_token_ids``
refuses that with a clear error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Union

from mmart.errors import UserError

if TYPE_CHECKING:  # torch is not needed to render prompts (and `mmart config` stays fast)
    import torch

LETTERS = "ABCDEFGH"  # at most 8 candidates per title (the data contract's limit)


@dataclass(frozen=True)
class Text:
    """Plain text, tokenized as one piece."""

    text: str


@dataclass(frozen=True)
class Art:
    """One artwork: its slot tokens (embeddings) or its caption (text-only variant)."""

    artwork_id: str


@dataclass(frozen=True)
class Read:
    """Candidate ``k``'s score is read at the last token before this mark."""

    k: int


@dataclass(frozen=True)
class ReadAll:
    """Every candidate's score is read at the last token before this mark (one answer position)."""


Piece = Union[Text, Art, Read, ReadAll]


def single_token_id(tokenizer, text: str, what: str) -> int:
    """The id of ``text`` as one token; a readout reads one position per candidate, so it must be one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(f"the tokenizer splits {what} {text!r} into {len(ids)} tokens {ids}; this readout needs it "
                        "to be one token: pick the other prompt.answer, or an LLM whose vocabulary has it")
    return int(ids[0])


class Readout:
    """Base class; see the module docstring. Subclasses set ``name`` and the text hooks."""

    name: ClassVar[str]
    #: the block ends with the chat template's end of turn and generation prompt (the answer position)
    ends_at_answer: ClassVar[bool] = False

    def preamble(self) -> str | None:
        """A line ending the member prefix, said once for all its titles (None: nothing)."""
        return None

    def question(self, k: int) -> str | None:
        """The block's question after the title line (None: none; the preamble asked it)."""
        raise NotImplementedError

    def candidate(self, k: int, artwork_id: str) -> list[Piece]:
        raise NotImplementedError

    def closing(self, k: int, chat_tail: str) -> list[Piece]:
        return []

    def block_pieces(self, title_line: str, candidates: list[str], chat_tail: str) -> list[Piece]:
        """The whole title block: title line, question, one line per candidate, closing."""
        if not 1 <= len(candidates) <= len(LETTERS):
            raise UserError(f"a title has {len(candidates)} candidate artworks; 1 to {len(LETTERS)} are supported")
        question = self.question(len(candidates))
        pieces: list[Piece] = [Text(title_line if question is None else f"{title_line}\n{question}")]
        for k, aid in enumerate(candidates):
            pieces.append(Text("\n"))
            pieces.extend(self.candidate(k, aid))
        pieces.extend(self.closing(len(candidates), chat_tail))
        return pieces

    def read_token_ids(self, tokenizer, k: int) -> list[int]:
        """The token id read for each of ``k`` candidates."""
        raise NotImplementedError

    def candidate_scores(self, read_log_probs: "torch.Tensor") -> "torch.Tensor":
        """``[..., K]`` log-probabilities of the read tokens -> candidate scores (softmax gives the choice)."""
        return read_log_probs


class LetterReadout(Readout):
    name = "letter"
    ends_at_answer = True

    def __init__(self, repeat_letter: bool = True) -> None:
        self.repeat_letter = repeat_letter

    def question(self, k: int) -> str:
        return "Artworks:"  # the closing names this title's letters, so the question stays per block

    def candidate(self, k: int, artwork_id: str) -> list[Piece]:
        letter = LETTERS[k]
        # The letter again after the artwork: causal attention lets that token see its own artwork.
        return [Text(f"{letter}: "), Art(artwork_id), *([Text(f" {letter}")] if self.repeat_letter else [])]

    def closing(self, k: int, chat_tail: str) -> list[Piece]:
        return [Text(f"\nAnswer with one letter ({LETTERS[0]}-{LETTERS[k - 1]}).{chat_tail}"), ReadAll()]

    def read_token_ids(self, tokenizer, k: int, spaced: bool = False) -> list[int]:
        """``spaced``: the letters as they follow "Answer:" in running text (" A"), after a rationale the
        model wrote (``sft.reasoning: before_answer``); else as the first token of the answer turn ("A")."""
        ids = [single_token_id(tokenizer, f" {letter}" if spaced else letter, "answer letter") for letter in LETTERS[:k]]
        if len(set(ids)) != len(ids):
            raise UserError(f"answer letters {list(LETTERS[:k])} do not map to distinct tokens: {ids}")
        return ids


class PerCandidateReadout(Readout):
    name = "per_candidate"
    MARKER = "match"  # the word after each artwork; the next token's log-probability is the score
    SCORE_TOKEN = " yes"

    def preamble(self) -> str:
        return "For each title: would they play it from each artwork (yes/no)?"

    def question(self, k: int) -> None:
        return None

    def candidate(self, k: int, artwork_id: str) -> list[Piece]:
        # The block stops after the last marker: later tokens cannot change any score.
        return [Text(f"{LETTERS[k]}: "), Art(artwork_id), Text(f" {self.MARKER}"), Read(k)]

    def read_token_ids(self, tokenizer, k: int) -> list[int]:
        return [single_token_id(tokenizer, self.SCORE_TOKEN, "the score token")] * k


READOUTS: dict[str, type[Readout]] = {r.name: r for r in (LetterReadout, PerCandidateReadout)}


def make_readout(answer: str, repeat_letter: bool = True) -> Readout:
    """The readout for ``prompt.answer``."""
    if answer not in READOUTS:
        raise UserError(f"prompt.answer={answer!r} is not a readout; choose one of {sorted(READOUTS)}")
    return LetterReadout(repeat_letter) if answer == "letter" else READOUTS[answer]()
