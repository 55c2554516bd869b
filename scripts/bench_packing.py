"""Benchmark packed decisions (one member prefix, several title blocks) against one prompt per title.

Run as: python scripts/bench_packing.py [--config configs/default.yaml] [--titles 1 5 20 40] [--out outputs/bench/packing.json]

Both ways score or train on the same decisions in one process, with the same model and precision:
(a) SFT steps (forward, backward, AdamW; the listwise loss) on members of the default world, each with
    N title decisions (N = 1, 5, 20, 40: the member's real history, N catalog titles it has not watched),
    on the world's own train decisions grouped by member (sft.examples=pairs: ~3.3 per member), and on
    what the default SFT stage trains on: those plus sft.unlogged_titles teacher-only titles per prefix;
(b) choosing a home page of N titles: the packed rows (``score_batch``: one pass under the block mask, or
    from 12 titles per row two passes, the prefix into a key/value cache first), and the cached-prefix
    API (``mmart.serve``: on a CPU its blocks read the cached prefix once, ``mmart.model.shared_prefix``),
    vs one prompt per title (batched). Scoring as ``mmart predict`` scores: weights ready for scoring
    (``mmart.model.inference``), grouped key/value heads read in place.
Decisions per second, medians of repeats. Needs the config's world and cache (bash scripts/train.sh runs
them; or mmart world / mmart cache build). Noisy on a shared machine: compare ratios, name the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mmart.config import PipelineConfig, load_config  # noqa: E402
from mmart.examples import Example  # noqa: E402
from mmart.model.chooser import causal_lm_of  # noqa: E402
from mmart.model.inference import ready_for_scoring, scoring_context  # noqa: E402
from mmart.model.packing import collate_rows, pack_decisions  # noqa: E402
from mmart.model.scoring import score_batch  # noqa: E402
from mmart.serve import HomePageChooser, Watched  # noqa: E402
from mmart.train.common import load_inputs, use_bf16  # noqa: E402
from mmart.train.data import cache_rows, subsample  # noqa: E402
from mmart.train.init import build_model  # noqa: E402
from mmart.train.sft import choice_loss, encoder_for  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
        flags = sorted({f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in out})
        return f"{model or platform.processor()} ({', '.join(flags) or 'no avx512_bf16/amx'})"
    except OSError:
        return platform.processor()


def median_time(fn, repeats: int, warmup=None) -> float:
    (warmup or fn)()  # warm-up (allocations, kernels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def home_pages(inputs, members: int, titles: int, seed: int) -> list[Example]:
    """``members`` members with real histories, each facing ``titles`` catalog titles it has not watched."""
    b = inputs.builder
    rng = np.random.default_rng(seed)
    users = [u for u, h in b.history.items() if h]
    all_titles = list(b.titles)
    out = []
    for u in rng.choice(users, members, replace=False):
        seen = {e["title_id"] for e in b.history[u]}
        ts = max(int(e["timestamp"]) for e in b.history[u]) + 1
        pool = [t for t in all_titles if t not in seen]
        for t in rng.choice(pool, titles, replace=False):
            out.append(Example(f"{u}|{t}", str(u), str(t), "bench", ts, list(b.artworks_of[t])))
    return out


def sft_step_rate(model, rows, pad_id: int, micro_rows: int, teacher: bool, bf16: bool, repeats: int) -> float:
    """Decisions per second of one optimiser step over ``rows`` (micro-batches of ``micro_rows`` rows)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    batches = [collate_rows(rows[s: s + micro_rows], pad_id) for s in range(0, len(rows), micro_rows)]
    if teacher:  # a uniform teacher: the loss has the same terms as distillation
        for b in batches:
            k = b["answer_ids"].shape[-1]
            b["target_probs"] = (b["answer_ids"] >= 0).float() / (b["answer_ids"] >= 0).sum(-1, keepdim=True).clamp(min=1)
    n = sum(int(b["decision_mask"].sum()) for b in batches)

    def step():
        for b in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = choice_loss(score_batch(model, b), b, teacher_weight=0.5)[0] * int(b["decision_mask"].sum()) / n
            loss.backward()
        opt.step()
        opt.zero_grad()

    def warmup():  # one micro-batch, not the whole step: the step of 20+ unpacked prompts is the costly part
        b = batches[0]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            choice_loss(score_batch(model, b), b, teacher_weight=0.5)[0].backward()
        opt.zero_grad()

    return n / median_time(step, repeats, warmup)


@torch.inference_mode()
def choose_rate(model, rows, pad_id: int, micro_rows: int, bf16: bool, repeats: int) -> float:
    """Decisions per second of scoring ``rows``, as ``mmart predict`` scores (grouped key/value heads read in place)."""
    batches = [collate_rows(rows[s: s + micro_rows], pad_id) for s in range(0, len(rows), micro_rows)]
    n = sum(int(b["decision_mask"].sum()) for b in batches)

    def run():
        for b in batches:
            with scoring_context("cpu", bf16):
                score_batch(model, b)

    return n / median_time(run, repeats)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--titles", type=int, nargs="*", default=[1, 5, 20, 40])
    ap.add_argument("--decisions", type=int, default=20,
                    help="decisions per SFT step and per choosing run (at least the titles of one member: N)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=["sft", "choose"], help="sft, choose")
    ap.add_argument("--out", default="outputs/bench/packing.json")
    args = ap.parse_args(argv)
    cfg = load_config(PipelineConfig, args.config, args.set)
    cfg = replace(cfg, model=replace(cfg.model, projector_init="random"))  # speed only: skip stage 0
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    inputs = load_inputs(cfg)
    model, tok = build_model(cfg, inputs.cache, None)
    enc = encoder_for(inputs, model, tok)
    rows_of = cache_rows(inputs.cache)
    bf16 = use_bf16(cfg.sft.bf16, "bench")
    pad = tok.pad_token_id
    micro = cfg.sft.batch_size * 2  # rows per forward of the unpacked way: the main job's per-step rows
    results: dict = {"config": args.config, "cpu": cpu_name(), "threads": torch.get_num_threads(), "bf16": bf16,
                     "decisions_per_run": args.decisions, "sft": {}, "choose": {}}

    def both(examples, pack):
        ds = [enc.decision(ex) for ex in examples]
        labels = {"chosen": [0 if ex.answer is None else ex.answer for ex in examples],
                  "weight": [1.0] * len(examples)}  # every decision labelled: the loss's every term runs
        return pack_decisions(ds, 1, rows_of, labels), pack_decisions(ds, pack, rows_of, labels)

    if "sft" in args.only:
        model.train()
        pools = {}
        for n in args.titles:
            pools[f"{n} titles per member"] = (home_pages(inputs, max(1, args.decisions // n), n, seed=n), n)
        pairs = subsample(inputs.builder.pair_examples("train", labels=True), args.decisions, 0,
                          group=inputs.builder.prefix_key)
        pools["default world's train decisions (sft.examples=pairs)"] = (pairs, cfg.sft.pack_titles)
        if cfg.sft.unlogged_titles:  # what the default SFT stage trains on: + teacher-only titles per prefix
            logged = subsample(pairs, max(1, args.decisions * 3 // (3 + cfg.sft.unlogged_titles)), 0,
                               group=inputs.builder.prefix_key)
            pools[f"default SFT decisions (+{cfg.sft.unlogged_titles} unlogged titles per prefix)"] = (
                logged + inputs.builder.unlogged_examples(logged, cfg.sft.unlogged_titles, 0), cfg.sft.pack_titles)
        for name, (examples, pack) in pools.items():
            alone, packed = both(examples, pack)
            a = sft_step_rate(model, alone, pad, micro, True, bf16, args.repeats)
            p = sft_step_rate(model, packed, pad, max(1, micro * len(packed) // len(alone)), True, bf16, args.repeats)
            tokens = (sum(len(r["input_ids"]) for r in alone), sum(len(r["input_ids"]) for r in packed))
            results["sft"][name] = {"decisions": len(examples), "rows": [len(alone), len(packed)], "tokens": tokens,
                                    "one_prompt_per_title": a, "packed": p, "ratio": p / a}
            print(f"sft  {name:<52} {a:8.2f} {p:8.2f} dec/s  x{p / a:.2f}", flush=True)
    if "choose" in args.only:
        ready_for_scoring(model, bf16)  # as predict and the API serve: every way below scores with these weights
        llm = causal_lm_of(model)
        attention = llm.config._attn_implementation
        for n in args.titles:
            llm.set_attn_implementation(attention)  # the other ways: the model's own attention (the API switches it)
            examples = home_pages(inputs, max(1, args.decisions // n), n, seed=100 + n)
            alone, packed = both(examples, n)
            a = choose_rate(model, alone, pad, cfg.eval.batch_size, bf16, args.repeats)
            p = choose_rate(model, packed, pad, max(1, cfg.eval.batch_size * len(packed) // len(alone)), bf16,
                            args.repeats)
            by_member: dict[str, list[Example]] = {}
            for ex in examples:
                by_member.setdefault(ex.user_id, []).append(ex)
            pages = [([Watched(e["title_id"], e.get("rating"), e.get("artwork_id"), int(e["timestamp"]))
                       for e in inputs.builder.history[u]], {ex.title_id: ex.candidates for ex in exs},
                      exs[0].timestamp) for u, exs in by_member.items()]

            chooser = HomePageChooser(model, tok, inputs.builder, enc, inputs.cache, bf16=bf16)

            def serve_cold():
                chooser._prefixes.clear()  # every page computes its member's prefix once
                for history, titles, at in pages:
                    chooser.choose(history, titles, at)

            s = len(examples) / median_time(serve_cold, args.repeats)
            results["choose"][f"{n} titles"] = {"decisions": len(examples), "one_prompt_per_title": a, "packed": p,
                                                "cached_prefix_api": s, "ratio_packed": p / a, "ratio_api": s / a}
            print(f"choose {n:>3} titles per page {'':<31} {a:8.2f} {p:8.2f} {s:8.2f} dec/s  x{p / a:.2f} x{s / a:.2f}",
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out} ({results['cpu']}, {results['threads']} threads, bf16 {bf16})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
