"""Architecture numbers of the few models mmart is used with, for planning without the network.

``mmart plan`` sizes a run from a model's ``config.json`` alone (no weights). A local folder
or a warm Hugging Face cache provides it; on a machine that reaches neither, these copies of
the published configs stand in, so the plan for the real configuration (Llama 3.1 8B with a
ViT-L/14 cache) works offline. Only architecture fields are kept: what changes a parameter
count or an activation size.
"""

from __future__ import annotations

from typing import Any

# config.json fields of each LLM (as published on the Hugging Face hub), plus ``tokenizer_len``:
# the tokenizer's length, which decides whether the artwork slot token adds an embedding row.
KNOWN_LLMS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B-Instruct": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "tokenizer_len": 128256,  # 128,000 BPE tokens + 256 reserved special tokens: the slot adds row 128256
    },
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tokenizer_len": 49152,
    },
}

# Other spellings of the same models: the hub id's last part, an older hub name, and mmart's "default".
_LLM_ALIASES: dict[str, str] = {
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "default": "HuggingFaceTB/SmolLM2-135M-Instruct",
}

# open_clip towers: ``embed_dim`` is the width of every cached vector (pooled or grid cell).
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "ViT-L-14": {"embed_dim": 768, "image_size": 224, "patch_size": 14, "width": 1024, "layers": 24},
}


def known_llm(name: str) -> tuple[str, dict[str, Any]] | None:
    """``(hub id, config fields + tokenizer_len)`` of a known LLM named by hub id, its last part or alias."""
    key = name.strip().rstrip("/")
    if key in KNOWN_LLMS:
        return key, dict(KNOWN_LLMS[key])
    alias = _LLM_ALIASES.get(key.lower()) or _LLM_ALIASES.get(key.rsplit("/", 1)[-1].lower())
    return (alias, dict(KNOWN_LLMS[alias])) if alias else None


def known_tower(name: str) -> dict[str, Any] | None:
    """Architecture numbers of a known open_clip tower (``embed_dim`` = cache width), or None."""
    return dict(KNOWN_TOWERS[name]) if name in KNOWN_TOWERS else None
