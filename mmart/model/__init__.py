"""The multimodal chooser: an LLM, a projector and artwork slots; scoring, LoRA, save and load.

Modules, in the order data flows through them:
    llm         the default LLM offline (SmolLM2 from its PyPI wheel) and any HF causal LM
    projector   cached artwork vectors -> LLM embedding space
    chooser     slots in the prompt filled with projected artworks (works under TRL and PEFT)
    readout     one unit per answer form: its prompt lines, what it reads, its scores
    packing     one member prefix + several title blocks per sequence
    forward     one forward's logits and log-probabilities at chosen positions
    prefix      packed rows in two passes: each prefix once into a key/value cache, then the blocks
    shared_prefix  many blocks over one cached prefix (the home-page API): its keys read once
    scoring     every candidate's score in one forward
    inference   a loaded chooser's weights made ready for scoring (bf16 stored once, or LoRA merged)
    checkpoint  build, LoRA-wrap, save, load, export merged (chooser_files: what a saved folder holds)
    batching    padding helpers;  testing: tiny offline models for tests
"""

import importlib
from typing import Any

# Where each public name lives. Imported on first use (PEP 562), so that light modules
# (readout: prompt text only) do not pull torch, transformers and PEFT in with the package.
_HOME = {
    **dict.fromkeys(("ChooserSpec", "add_lora", "build_chooser", "export_merged", "load_chooser", "lora_config",
                     "save_chooser"), "checkpoint"),
    **dict.fromkeys(("attach_artworks", "chooser_projector", "chooser_slot_token_id", "set_artwork_cache",
                     "slots_per_artwork"), "chooser"),
    **dict.fromkeys(("SLOT_TOKEN", "add_slot_token", "ensure_default_llm", "load_llm"), "llm"),
    **dict.fromkeys(("ArtworkProjector", "ProjectorConfig", "build_projector"), "projector"),
    **dict.fromkeys(("LETTERS", "READOUTS", "LetterReadout", "PerCandidateReadout", "Readout", "make_readout"),
                    "readout"),
    **dict.fromkeys(("answer_positions", "read_log_probs", "score_batch"), "scoring"),
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'mmart.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mmart.model.{_HOME[name]}"), name)


__all__ = [
    "LETTERS",
    "READOUTS",
    "LetterReadout",
    "PerCandidateReadout",
    "Readout",
    "make_readout",
    "SLOT_TOKEN",
    "ArtworkProjector",
    "ChooserSpec",
    "ProjectorConfig",
    "add_lora",
    "add_slot_token",
    "answer_positions",
    "attach_artworks",
    "build_chooser",
    "build_projector",
    "chooser_projector",
    "chooser_slot_token_id",
    "ensure_default_llm",
    "export_merged",
    "load_chooser",
    "load_llm",
    "lora_config",
    "save_chooser",
    "read_log_probs",
    "score_batch",
    "slots_per_artwork",
    "set_artwork_cache",
]
