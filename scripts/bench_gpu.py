"""One prepared benchmark for a lent GPU: the real configuration's shapes, measured in one run.

Run as: python scripts/bench_gpu.py [--preset 8b|tiny] [--budget-s 540] [--out outputs/bench/gpu.json]
        (CPU, seconds: python scripts/bench_gpu.py --preset tiny)

What it measures (each: warm-up steps, then the median of timed steps, CUDA-synchronised):
  sft        an SFT step (forward, backward, AdamW) of a random-weight Llama with Llama-3.1-8B's shapes,
             built directly on the device in bf16 (no download), LoRA r=16 on all linear layers, gradient
             checkpointing, artworks read from a random device-resident cache, ~650-token prompts with
             K=4 candidates: tokens/s, MFU and peak memory.
  dpo        the fast multiple-choice DPO step (one policy and one reference forward per prompt) vs the
             per-pair forwards TRL's DPOTrainer runs (chosen and rejected sequences, policy and
             reference, for every pair), same prompts and pairs: pairs/s.
  choosing   one forward per (member, title) scoring all K letters: pairs/s.
  cache      the artwork cache of a ViT-L/14 tower (random init): images/s through `mmart cache build`
             on a generated folder of PNGs (decoding and preprocessing included) vs encoding
             pre-made tensors already on the device.

MFU: model FLOPs per token = forward 2N + backward 2N (LoRA: activation gradients only; the frozen
weights need none) + attention (forward 4 x layers x attention width x (L+1)/2 under a causal mask,
backward twice that), N = the LLM's non-embedding parameters; over the GPU's dense bf16 peak
(table by device name, or --peak-tflops). Gradient checkpointing's recomputed forward is not model
FLOPs; `hfu` counts it. Writes JSON and prints a table. --budget-s bounds the whole run: a section
that would start past it is skipped (recorded as such), and timed loops stop early at the deadline.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see scripts/train.sh)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

# Dense bf16 peak FLOP/s by device name (first match wins; vendor datasheets, without sparsity).
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (HBM3)
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


@dataclass(frozen=True)
class Preset:
    """Shapes and step counts of one run."""

    llm: dict[str, Any]  # LlamaConfig fields (the slot token's row is added on top of vocab_size)
    tower: str  # open_clip architecture of the cache section
    prompt_tokens: int
    history_artworks: int  # artworks in the history lines of a prompt
    k: int  # candidates
    tokens_per_artwork: int  # cache vectors per artwork
    projector_tokens: int  # prompt slots per cache vector
    num_artworks: int  # rows of the random cache
    lora_r: int
    sft_batch: int
    dpo_batch: int  # prompts (fast) = pairs per micro-batch (TRL-equivalent)
    choose_batch: int
    images: int  # PNGs in the generated folder
    image_size: tuple[int, int]  # (width, height) of each PNG: a 2:3 poster
    cache_batch: int
    warmup: int
    steps: int


LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                   rope_theta=500000.0, tie_word_embeddings=False)
PRESETS = {
    "8b": Preset(llm=LLAMA_31_8B, tower="ViT-L-14", prompt_tokens=650, history_artworks=20, k=4,
                 tokens_per_artwork=4, projector_tokens=1, num_artworks=8000, lora_r=16, sft_batch=16, dpo_batch=8,
                 choose_batch=64, images=4096, image_size=(342, 512), cache_batch=256, warmup=2, steps=5),
    "tiny": Preset(llm=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            tie_word_embeddings=False),
                   tower="mmart-tiny-vit", prompt_tokens=96, history_artworks=4, k=4, tokens_per_artwork=1,
                   projector_tokens=2, num_artworks=64, lora_r=4, sft_batch=2, dpo_batch=2, choose_batch=4,
                   images=12, image_size=(48, 64), cache_batch=4, warmup=1, steps=2),
}
SECTIONS = ("cache", "sft", "dpo", "choosing")


# ==== The project's functions: every mmart call of this script is in this section ======================
# (the refactor of scoring / dpo_fast / examples changes these few lines, nothing else)


def make_chooser(llm, cache: torch.Tensor, slot_id: int, projector_tokens: int, lora_r: int):
    """The chooser as ``build_chooser`` + ``add_lora`` make it, around an LLM built here (random weights)."""
    from mmart.model.checkpoint import add_lora, lora_config
    from mmart.model.chooser import attach_artworks, set_artwork_cache
    from mmart.model.projector import build_projector

    projector = build_projector(cache.shape[-1], llm.get_input_embeddings(), "mlp2x_gelu", projector_tokens)
    attach_artworks(llm, projector, slot_id)
    model = add_lora(llm, lora_config(r=lora_r, alpha=2 * lora_r, dropout=0.0))
    set_artwork_cache(model, cache)
    return model


def letter_logps(model, ids: torch.Tensor, mask: torch.Tensor, arts: torch.Tensor, letters: torch.Tensor,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, K]`` log-probabilities of the letters: one forward (mmart's scorer)."""
    from mmart.model.scoring import read_log_probs

    return read_log_probs(model, ids, mask, arts, letters, positions)


def pad_rows(rows: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from mmart.model.batching import pad_artwork_ids, pad_sequences

    ids, mask = pad_sequences([r["prompt_ids"] for r in rows], pad_id)
    return ids, mask, pad_artwork_ids([r["artwork_ids"] for r in rows])


def fast_dpo_step_loss(model, rows: list[dict], pad_id: int, beta: float, device: torch.device) -> torch.Tensor:
    """The fast DPO loss of mmart's trainer on multiple-choice rows (as one-decision rows: collator + loss)."""
    from mmart.model.testing import one_decision_row
    from mmart.train.data import DecisionCollator
    from mmart.train.dpo_fast import fast_dpo_loss

    decision_rows = [one_decision_row(r["prompt_ids"], r["artwork_ids"], r["answer_ids"], r["chosen"], r["rejected"],
                                      index=i) for i, r in enumerate(rows)]
    batch = {k: v.to(device) for k, v in DecisionCollator(pad_token_id=pad_id)(decision_rows).items()}
    return fast_dpo_loss(model, batch, beta=beta).loss


def reference(model):
    """The DPO reference: the same PEFT model with its adapter off (what TRL's DPOTrainer uses too)."""
    from mmart.train.dpo_fast import reference_context

    return reference_context(model)


def cache_tower(model_name: str, device: torch.device):
    from mmart.vision.config import VisionConfig
    from mmart.vision.tower import load_tower

    vision = VisionConfig(model=model_name, pretrained=None, checkpoint=None, init_seed=0)
    return vision, load_tower(vision, device)


def build_cache_folder(data_dir: Path, cache_dir: Path, vision, tower, tokens_per_artwork: int, batch: int,
                       only_ids: list[str] | None = None) -> dict[str, float]:
    """``mmart cache build`` on ``data_dir``: decoding, preprocessing and encoding, as the CLI runs them."""
    from mmart.vision.cache import auto_workers, build_cache
    from mmart.vision.config import CacheConfig

    cache = CacheConfig(tokens_per_artwork=tokens_per_artwork, batch_size=batch, dtype="float16",
                        shard_size=1 << 20)
    report = build_cache(data_dir, cache_dir, vision, cache, overwrite=True, progress=False, only_ids=only_ids,
                         tower=tower)
    return {"encoded": report.encoded, "encode_s": report.encode_seconds, "seconds": report.seconds,
            "workers": auto_workers(cache)}


def encode_tensors(tower, pixels: torch.Tensor, tokens_per_artwork: int) -> torch.Tensor:
    """Encode pre-made pixels on the device, as the cache builder does (channels_last, autocast on CUDA)."""
    from mmart.vision.tower import encode_images

    if pixels.device.type == "cuda":
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        autocast: contextlib.AbstractContextManager = torch.autocast("cuda", dtype=dtype)
    else:
        autocast = contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        return encode_images(tower.model, pixels, tokens_per_artwork)


def non_embedding_params(model) -> int:
    """N: the LLM's own parameters outside the embeddings and the LM head (no LoRA, no projector)."""
    from mmart.model.chooser import PROJECTOR_ATTR

    return sum(p.numel() for n, p in model.named_parameters()
               if "lora_" not in n and PROJECTOR_ATTR not in n and "embed_tokens" not in n and "lm_head" not in n)


def cache_dim(p: Preset) -> int:
    from mmart.model.arch_table import known_tower
    from mmart.vision.tower import MODEL_CONFIG_DIR

    known = known_tower(p.tower)
    if known:
        return int(known["embed_dim"])
    return int(json.loads((MODEL_CONFIG_DIR / f"{p.tower}.json").read_text())["embed_dim"])


# ==== Timing, device, FLOPs ============================================================================


class Budget:
    """Wall-clock deadline of the whole run."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, steps: int, budget: Budget) -> dict[str, Any]:
    """``warmup`` untimed calls, then up to ``steps`` timed ones (fewer when the budget runs out): median."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if budget.left() < 0:
            break
    return {"median_s": statistics.median(times), "times_s": times}


def device_info(device: torch.device, peak_tflops: float | None) -> dict[str, Any]:
    """Name the device that ran the measurements, and its dense bf16 peak (override, table, or unknown)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        name, memory = cpu_name(), None
    peak, source = None, "unknown: pass --peak-tflops for MFU"
    if peak_tflops:
        peak, source = peak_tflops * 1e12, "--peak-tflops"
    elif device.type == "cuda" and (found := peak_bf16_flops(name)):
        peak, source = found
    return {"type": device.type, "name": name, "total_memory_bytes": memory, "peak_bf16_flops": peak,
            "peak_source": source}


def peak_bf16_flops(name: str) -> tuple[float, str] | None:
    """(dense bf16 FLOP/s, the table key) for a GPU name such as 'NVIDIA H100 80GB HBM3', or None."""
    for key, flops in PEAK_BF16:
        if key in name:
            return flops, f"table: {key}"
    return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                "peak_memory_kind": "torch.cuda.max_memory_allocated since the section began"}
    import resource

    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "process max RSS so far (CPU: cumulative over the run)"}


def step_flops(n_params: int, llm: dict[str, Any], tokens: int, seq_len: int, backward: bool,
               recompute: bool = False) -> float:
    """Model FLOPs of ``tokens`` tokens in sequences of ``seq_len``: 2N forward (+2N backward), plus attention.

    Attention forward per token: QK^T and AV over (L+1)/2 positions on average (causal), 2 FLOPs per
    multiply-add: 4 x layers x attention width x (L+1)/2. Backward (activation gradients): twice the
    forward. ``recompute``: add gradient checkpointing's second forward (hardware FLOPs).
    """
    width = llm["num_attention_heads"] * llm.get("head_dim", llm["hidden_size"] // llm["num_attention_heads"])
    attn = 4 * llm["num_hidden_layers"] * width * (seq_len + 1) / 2
    forward = 2 * n_params + attn
    per_token = forward * ((2 if backward else 1) + (1 if recompute else 0)) + (attn if backward else 0)
    return per_token * tokens


# ==== Synthetic inputs =================================================================================


def synthetic_rows(n: int, p: Preset, slot_id: int, letters: list[int], gen: torch.Generator) -> list[dict]:
    """Multiple-choice rows shaped like mmart's letter prompts: history lines with their artwork's slots,
    a title, K lettered candidates each followed by its slots and its letter, ending at the answer."""
    slots = p.tokens_per_artwork * p.projector_tokens
    text_vocab = min(letters) - 1  # text tokens below the letters and the slot token

    def text(length: int) -> list[int]:
        return torch.randint(1, text_vocab, (length,), generator=gen).tolist()

    rows = []
    for _ in range(n):
        body: list[int] = []
        for _ in range(p.history_artworks):
            body += text(6) + [slot_id] * slots
        body += text(20)  # title line
        for j in range(p.k):
            body += [letters[j]] + [slot_id] * slots + [letters[j]] + text(1)
        body += text(8)  # the answer instruction and the template's assistant header
        fill = p.prompt_tokens - len(body)
        if fill < 8:
            raise ValueError(f"prompt_tokens {p.prompt_tokens} is too short for {p.history_artworks + p.k} "
                             f"artworks of {slots} slots")
        arts = torch.randint(0, p.num_artworks, (p.history_artworks + p.k,), generator=gen).tolist()
        chosen = int(torch.randint(0, p.k, (1,), generator=gen))
        rows.append({"prompt_ids": text(fill) + body, "artwork_ids": arts, "answer_ids": list(letters),
                     "chosen": chosen, "rejected": [j for j in range(p.k) if j != chosen]})
    return rows


def write_png_folder(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    """A minimal dataset folder (the four tables, ``check=False`` level) with ``n`` poster-like PNGs.

    Smooth random colour fields plus fine noise: compresses and decodes like an illustration, not like
    flat colour (too cheap) or white noise (too dear).
    """
    import numpy as np
    import pandas as pd
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, 2**31, size=n)

    def one(i: int) -> None:
        r = np.random.default_rng(int(seeds[i]))
        base = Image.fromarray(r.integers(0, 256, (6, 4, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
        pixels = np.asarray(base, dtype=np.int16) + r.integers(-6, 7, (size[1], size[0], 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(images / f"a{i:05d}.png")

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(one, range(n)))
    ids = [f"a{i:05d}" for i in range(n)]
    pd.DataFrame({"title_id": ["t0"], "name": ["t"], "genres": [["drama"]], "synopsis": ["s"]}).to_parquet(
        root / "titles.parquet")
    pd.DataFrame({"artwork_id": ids, "title_id": ["t0"] * n, "path": [f"images/{a}.png" for a in ids]}).to_parquet(
        root / "artworks.parquet")
    pd.DataFrame({"user_id": ["u0"], "history": [[{"title_id": "t0", "timestamp": 0}]]}).to_parquet(
        root / "users.parquet")
    pd.DataFrame({"impression_id": ["i0"], "user_id": ["u0"], "title_id": ["t0"], "shown_artwork_id": [ids[0]],
                  "propensity": [1.0], "played": [True], "timestamp": [1], "split": ["train"]}).to_parquet(
        root / "impressions.parquet")
    return ids


# ==== Sections =========================================================================================


@dataclass
class LLMSetup:
    model: Any
    slot_id: int
    pad_id: int
    letters: list[int]
    n_params: int
    trainable: int
    total: int
    build_s: float


def build_llm(p: Preset, device: torch.device, dtype: torch.dtype, checkpointing: bool) -> LLMSetup:
    """A random-weight Llama of the preset's shapes, initialised on the device in ``dtype``, as a chooser."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    start = time.perf_counter()
    vocab = p.llm["vocab_size"]
    slot_id = vocab  # the row add_slot_token appends after the tokenizer's last token
    config = LlamaConfig(**{**p.llm, "vocab_size": vocab + 1})
    torch.manual_seed(0)
    with torch.device(device):
        llm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        cache = torch.nn.functional.normalize(
            torch.randn(p.num_artworks, p.tokens_per_artwork, cache_dim(p), device=device), dim=-1).half()
    if checkpointing:
        llm.activation_checkpointing_enable()
    model = make_chooser(llm, cache, slot_id, p.projector_tokens, p.lora_r)
    sync(device)
    letters = list(range(vocab - p.k, vocab))  # K single tokens just below the slot
    return LLMSetup(model, slot_id, pad_id=0, letters=letters, n_params=non_embedding_params(model),
                    trainable=sum(x.numel() for x in model.parameters() if x.requires_grad),
                    total=sum(x.numel() for x in model.parameters()), build_s=time.perf_counter() - start)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast as the trainers run it (``bf16: true``), LoRA's fp32 weights included."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def bench_sft(s: LLMSetup, p: Preset, device: torch.device, dtype: torch.dtype, peak: float | None,
              budget: Budget, checkpointing: bool) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    rows = synthetic_rows(p.sft_batch, p, s.slot_id, s.letters, gen)
    ids, mask, arts = (t.to(device) for t in pad_rows(rows, s.pad_id))
    letters = torch.tensor(s.letters, device=device)
    chosen = torch.tensor([r["chosen"] for r in rows], device=device)
    model = s.model.train()
    opt = torch.optim.AdamW([x for x in model.parameters() if x.requires_grad], lr=1e-5)

    def step() -> None:
        with autocast(device, dtype):
            logp = letter_logps(model, ids, mask, arts, letters)  # [B, K]
        loss = -logp.gather(1, chosen[:, None]).mean()  # the answer letter's NLL, as TRL's letter SFT loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak(device)
    t = timed(step, device, p.warmup, p.steps, budget)
    tokens = int(mask.sum())
    flops = step_flops(s.n_params, p.llm, tokens, p.prompt_tokens, backward=True)
    hw_flops = step_flops(s.n_params, p.llm, tokens, p.prompt_tokens, backward=True, recompute=checkpointing)
    out = {"batch": p.sft_batch, "prompt_tokens": p.prompt_tokens, "k": p.k, "tokens_per_step": tokens,
           "step_s": t["median_s"], "tokens_per_s": tokens / t["median_s"], "model_flops_per_step": flops,
           "achieved_tflops": flops / t["median_s"] / 1e12,
           "mfu": flops / t["median_s"] / peak if peak else None,
           "hfu": hw_flops / t["median_s"] / peak if peak else None, "times_s": t["times_s"]}
    del opt
    return {**out, **peak_memory(device)}


def bench_dpo(s: LLMSetup, p: Preset, device: torch.device, dtype: torch.dtype, budget: Budget,
              beta: float = 0.1) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(2)
    rows = synthetic_rows(p.dpo_batch, p, s.slot_id, s.letters, gen)
    pairs = sum(len(r["rejected"]) for r in rows)
    model = s.model.train()
    opt = torch.optim.AdamW([x for x in model.parameters() if x.requires_grad], lr=1e-6)

    def fast() -> None:
        with autocast(device, dtype):
            loss = fast_dpo_step_loss(model, rows, s.pad_id, beta, device)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # TRL's DPOTrainer with per_device_train_batch_size = dpo_batch pairs: each micro-batch concatenates the
    # chosen and the rejected sequences (prompt + completion letter), runs the policy on them with gradients
    # and the reference without, and reads each completion's log-probability. K-1 micro-batches cover the
    # same pairs; one optimizer step, as with gradient accumulation.
    micro = []
    for j in range(p.k - 1):
        seqs, comp = [], []
        for half in ("chosen", "rejected"):
            for r in rows:
                letter = r["answer_ids"][r["chosen"] if half == "chosen" else r["rejected"][j]]
                seqs.append({"prompt_ids": r["prompt_ids"] + [letter], "artwork_ids": r["artwork_ids"]})
                comp.append(letter)
        ids, mask, art = (t.to(device) for t in pad_rows(seqs, s.pad_id))
        at = (mask.sum(-1, keepdim=True) - 2).to(device)  # the prompt's last token predicts the completion
        micro.append((ids, mask, art, torch.tensor(comp, device=device)[:, None], at))

    def trl_like() -> None:
        for ids, mask, art, comp, at in micro:
            with autocast(device, dtype):
                policy = letter_logps(model, ids, mask, art, comp, at)[:, 0]
                with torch.no_grad(), reference(model):
                    ref = letter_logps(model, ids, mask, art, comp, at)[:, 0]
            n = ids.shape[0] // 2
            logits = (policy[:n] - ref[:n]) - (policy[n:] - ref[n:])
            loss = -torch.nn.functional.logsigmoid(beta * logits).mean() / (p.k - 1)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out: dict[str, Any] = {"prompts": p.dpo_batch, "pairs_per_step": pairs}
    for name, fn in (("fast", fast), ("trl_equivalent", trl_like)):
        if budget.left() < 0:
            out[name] = {"skipped": "budget"}
            continue
        reset_peak(device)
        t = timed(fn, device, p.warmup, p.steps, budget)
        out[name] = {"step_s": t["median_s"], "pairs_per_s": pairs / t["median_s"], "times_s": t["times_s"],
                     "forward_sequences_per_step": p.dpo_batch * 2 if name == "fast" else 4 * pairs,
                     **peak_memory(device)}
    if "pairs_per_s" in out.get("trl_equivalent", {}) and "pairs_per_s" in out["fast"]:
        out["speedup"] = out["fast"]["pairs_per_s"] / out["trl_equivalent"]["pairs_per_s"]
    del opt
    return out


def bench_choosing(s: LLMSetup, p: Preset, device: torch.device, dtype: torch.dtype, budget: Budget) -> dict:
    gen = torch.Generator().manual_seed(3)
    rows = synthetic_rows(p.choose_batch, p, s.slot_id, s.letters, gen)
    ids, mask, arts = (t.to(device) for t in pad_rows(rows, s.pad_id))
    letters = torch.tensor(s.letters, device=device)
    model = s.model.eval()

    def choose() -> None:
        with torch.inference_mode(), autocast(device, dtype):
            letter_logps(model, ids, mask, arts, letters)

    reset_peak(device)
    t = timed(choose, device, p.warmup, p.steps, budget)
    return {"batch": p.choose_batch, "k": p.k, "step_s": t["median_s"], "pairs_per_s": p.choose_batch / t["median_s"],
            "times_s": t["times_s"], **peak_memory(device)}


def bench_cache(p: Preset, device: torch.device, budget: Budget, workdir: Path) -> dict[str, Any]:
    from PIL import Image

    start = time.perf_counter()
    ids = write_png_folder(workdir / "data", p.images, p.image_size)
    write_s = time.perf_counter() - start
    vision, tower = cache_tower(p.tower, device)
    out: dict[str, Any] = {"tower": p.tower, "images": p.images, "image_size": list(p.image_size),
                           "tokens_per_artwork": p.tokens_per_artwork, "batch": p.cache_batch,
                           "png_write_s": write_s, "tower_load_s": time.perf_counter() - start - write_s}
    reset_peak(device)
    # A build's time includes starting its DataLoader workers. A one-batch build, run once to warm up
    # (kernel selection) and once timed, measures that fixed cost; whole builds minus it give the
    # steady rate a large catalog sees.
    folder, cache_dir = workdir / "data", workdir / "cache"
    few = ids[: p.cache_batch]
    build_cache_folder(folder, cache_dir, vision, tower, p.tokens_per_artwork, p.cache_batch, only_ids=few)
    small = build_cache_folder(folder, cache_dir, vision, tower, p.tokens_per_artwork, p.cache_batch, only_ids=few)
    runs = []
    for _ in range(max(1, p.steps - 1)):
        runs.append(build_cache_folder(folder, cache_dir, vision, tower, p.tokens_per_artwork, p.cache_batch))
        if budget.left() < 0:
            break
    encode_s = statistics.median(r["encode_s"] for r in runs)
    steady = (p.images - len(few)) / (encode_s - small["encode_s"]) if encode_s > small["encode_s"] else None
    out["decode_included"] = {"images_per_s": p.images / encode_s, "steady_images_per_s": steady,
                              "encode_s": [r["encode_s"] for r in runs], "one_batch_encode_s": small["encode_s"],
                              "build_s": [r["seconds"] for r in runs], "workers": runs[0]["workers"],
                              "note": "mmart cache build: DataLoader decode + preprocess, transfer, encode, shard "
                                      "write, from the first batch request to the last shard (worker start-up "
                                      "included); steady = (images - one batch) / (its time - a one-batch build's)"}
    with Image.open(workdir / "data" / "images" / f"{ids[0]}.png") as im:
        one = tower.preprocess(im.convert("RGB"))
    pixels = one.unsqueeze(0).repeat(p.cache_batch, 1, 1, 1) + 0.01 * torch.randn(p.cache_batch, *one.shape)
    pixels = pixels.to(device)
    t = timed(lambda: encode_tensors(tower, pixels, p.tokens_per_artwork), device, p.warmup, p.steps, budget)
    out["tensors_only"] = {"images_per_s": p.cache_batch / t["median_s"], "batch_s": t["median_s"],
                           "times_s": t["times_s"]}
    out["decode_vs_tensors"] = out["decode_included"]["images_per_s"] / out["tensors_only"]["images_per_s"]
    out.update(peak_memory(device))
    del tower
    return out


# ==== Main =============================================================================================


def run(args: argparse.Namespace) -> dict[str, Any]:
    budget = Budget(args.budget_s)
    p = PRESETS[args.preset]
    if args.steps:
        p = replace(p, steps=args.steps)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    info = device_info(device, args.peak_tflops)
    import transformers

    results: dict[str, Any] = {"preset": args.preset, "shapes": asdict(p), "device": info, "dtype": args.dtype,
                               "gradient_checkpointing": not args.no_checkpointing, "budget_s": args.budget_s,
                               "torch": torch.__version__, "transformers": transformers.__version__,
                               "skipped": {}, "errors": {}}
    only = [s for s in SECTIONS if s in args.only]

    def section(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if budget.left() < 0:
            results["skipped"][name] = "budget"
            return
        print(f"[bench_gpu] {name} ({budget.left():.0f} s of budget left)", flush=True)
        start = time.perf_counter()
        try:
            results[name] = fn()
            results[name]["section_s"] = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - one failed section (e.g. out of memory) must not lose the others
            results["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if "cache" in only:
        with tempfile.TemporaryDirectory(prefix="bench_gpu-") as tmp:
            section("cache", lambda: bench_cache(p, device, budget, Path(tmp)))
    llm_sections = [s for s in only if s != "cache"]
    if llm_sections and budget.left() < 0:
        results["skipped"].update({name: "budget" for name in llm_sections})
    elif llm_sections:
        checkpointing = not args.no_checkpointing
        setup = build_llm(p, device, dtype, checkpointing)
        results["llm"] = {"non_embedding_params": setup.n_params, "trainable_params": setup.trainable,
                          "total_params": setup.total, "build_s": setup.build_s}
        peak = info["peak_bf16_flops"]
        if "sft" in llm_sections:
            section("sft", lambda: bench_sft(setup, p, device, dtype, peak, budget, checkpointing))
        if "dpo" in llm_sections:
            section("dpo", lambda: bench_dpo(setup, p, device, dtype, budget))
        if "choosing" in llm_sections:
            section("choosing", lambda: bench_choosing(setup, p, device, dtype, budget))
    results["wall_s"] = time.monotonic() - budget.start
    return results


def table(r: dict[str, Any]) -> str:
    d = r["device"]
    peak = f"{d['peak_bf16_flops'] / 1e12:.0f} TFLOP/s" if d["peak_bf16_flops"] else "unknown"
    lines = [f"device: {d['type']} ({d['name']}), preset {r['preset']}, {r['dtype']}, bf16 peak {peak} "
             f"({d['peak_source']})",
             f"{'what':<52}{'A':>14}{'B':>14}{'A/B':>8}"]

    def row(what: str, a: float | None, b: float | None = None, fmt: str = ".1f", ratio: bool = True) -> None:
        cells = [f"{v:>14{fmt}}" if v is not None else f"{'-':>14}" for v in (a, b)]
        last = f"{a / b:>8.2f}" if ratio and a is not None and b else f"{'':>8}"
        lines.append(f"{what:<52}{cells[0]}{cells[1]}{last}")

    if "sft" in r:
        s = r["sft"]
        row(f"SFT tokens/s (batch {s['batch']} x {s['prompt_tokens']} tokens)", s["tokens_per_s"])
        row("SFT model TFLOP/s achieved", s["achieved_tflops"])
        row("SFT MFU (A) / with recompute, HFU (B)", s["mfu"], s["hfu"], ".3f", ratio=False)
        row("SFT peak memory GiB", s["peak_memory_bytes"] / 2**30, None, ".2f")
    if "dpo" in r and "pairs_per_s" in r["dpo"].get("fast", {}):
        row("DPO pairs/s: fast (A) vs TRL-equivalent pairs (B)", r["dpo"]["fast"]["pairs_per_s"],
            r["dpo"].get("trl_equivalent", {}).get("pairs_per_s"), ".2f")
    if "choosing" in r:
        row(f"choosing pairs/s (one forward, K={r['choosing']['k']})", r["choosing"]["pairs_per_s"], None, ".2f")
    if "cache" in r:
        c = r["cache"]
        row(f"{c['tower']} images/s: decode incl. (A) vs tensors (B)", c["decode_included"]["images_per_s"],
            c["tensors_only"]["images_per_s"])
        row("  same, steady (without worker start-up) (A)", c["decode_included"]["steady_images_per_s"],
            c["tensors_only"]["images_per_s"])
    for name, why in {**r["skipped"], **r["errors"]}.items():
        lines.append(f"{name}: {why}")
    lines.append(f"wall {r['wall_s']:.0f} s of a {r['budget_s']:.0f} s budget")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="8b",
                    help="8b: Llama-3.1-8B shapes and ViT-L/14 (a GPU); tiny: seconds on a CPU (tests)")
    ap.add_argument("--tiny", dest="preset", action="store_const", const="tiny", help="same as --preset tiny")
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="weights and autocast dtype")
    ap.add_argument("--only", nargs="*", default=list(SECTIONS), choices=SECTIONS, help="sections to run")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per measurement (default: the preset's)")
    ap.add_argument("--no-checkpointing", action="store_true", help="train without gradient checkpointing")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense bf16 peak in TFLOP/s (default: a table by GPU name)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="wall-clock budget of the whole run (default 540: a 10-minute device call with margin)")
    ap.add_argument("--out", default="outputs/bench/gpu.json")
    args = ap.parse_args(argv)
    results = run(args)
    print(table(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
