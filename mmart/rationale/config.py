"""The ``rationale`` section of the pipeline config (``mmart rationales``)."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Literal

from mmart.config_checks import FieldError, at_least, seeds

DEFAULT_TEMPLATE = (
    "A streaming member chose artwork {target} for a title. Their history, most recent first:\n{history}\n"
    "{title}\nThe artworks:\n{candidates}\n"
    "In one or two sentences, say why artwork {target} suits this member, citing only what the history shows.")
TEMPLATE_FIELDS = ("history", "title", "candidates", "target", "target_caption")


@dataclass
class RationaleConfig:
    teacher: Literal["taste", "llm"] = field(default="taste", metadata={
        "help": "Who writes each decision's rationale. taste = a deterministic verbalisation of the taste teacher's "
                "largest evidence for the target (mmart.eval.teacher; needs sft.teacher taste or none); llm = a local "
                "causal LM with a chat template (rationale.model), prompted with rationale.template."})
    model: str = field(default="", metadata={
        "help": "llm: a local model folder (config, weights, tokenizer with a chat template); never downloaded, "
                "no remote code."})
    template: str = field(default=DEFAULT_TEMPLATE, metadata={
        "help": "llm: the user message, with the fields {history} {title} {candidates} {target} {target_caption} "
                "(the decision as text: captions and tags stand for the artworks). Recorded: a change reruns."})
    max_new_tokens: int = field(default=64, metadata={"help": "llm: at most this many generated tokens a rationale."})
    temperature: float = field(default=0.0, metadata={
        "help": "llm: 0 = greedy decoding (deterministic); > 0 samples, seeded per shard with rationale.seed."})
    seed: int = field(default=0, metadata={"help": "llm: sampling seed (temperature > 0 only)."})
    batch_size: int = field(default=8, metadata={"help": "llm: prompts per generate call (left-padded)."})
    shard_size: int = field(default=64, metadata={
        "help": "llm: decisions per shard: each process writes its shards atomically; a rerun keeps finished ones."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "llm: weights dtype; auto = bfloat16 on a GPU, float32 on a CPU."})
    evidence: int = field(default=2, metadata={
        "help": "taste: name at most this many of the teacher's largest positive contributions to the target."})

    def __post_init__(self) -> None:
        at_least(self, 1, "max_new_tokens", "batch_size", "shard_size", "evidence")
        seeds(self, "seed")
        if not self.temperature >= 0:
            raise FieldError("temperature", self.temperature, ">= 0 (0 = greedy)")
        try:
            named = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
        except ValueError as e:  # a lone brace
            raise FieldError("template", self.template, f"a format string ({e}; write a literal brace as {{{{ or }}}})")
        unknown = sorted(named - set(TEMPLATE_FIELDS))
        if unknown:
            raise FieldError("template", self.template, f"a text with fields among {{{'} {'.join(TEMPLATE_FIELDS)}}} "
                             f"only, not {{{unknown[0]}}}")
