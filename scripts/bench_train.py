"""Benchmark the training and choosing paths, each against its alternative, in one run.

Run as: python scripts/bench_train.py [--config configs/default.yaml] [--examples 16] [--out outputs/bench/train.json]

(a) DPO: the shared-prompt fast path vs TRL's DPOTrainer on the same preference examples (examples/s).
(b) Choosing: one forward scoring all K letters vs K forwards (one per candidate) vs generating the answer.
(c) A training step reading artwork vectors from the cache vs running the vision tower inside the step.
(d) A training step (forward, backward, AdamW) in fp32 vs under bf16 autocast (``sft.bf16``), same batch.
All three use letter answers (prompt.answer=letter), the form TRL's DPOTrainer and generate() share.
Needs the config's cache (bash scripts/build_cache.sh). Medians of repeats; noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from mmart.config import PipelineConfig, load_config  # noqa: E402
from mmart.model.batching import pad_artwork_ids, pad_sequences  # noqa: E402
from mmart.model.chooser import set_artwork_cache  # noqa: E402
from mmart.model.packing import collate_rows  # noqa: E402
from mmart.model.scoring import read_log_probs, score_batch  # noqa: E402
from mmart.train.common import load_inputs  # noqa: E402
from mmart.train.data import cache_rows, decision_rows, subsample  # noqa: E402
from mmart.train.init import build_model  # noqa: E402
from mmart.train.sft import choice_loss, encoder_for  # noqa: E402


def rows_for(inputs, model, tok, examples, pack_titles: int = 1):
    return decision_rows(encoder_for(inputs, model, tok), examples, cache_rows(inputs.cache), pack_titles)


def ran_on(model) -> str:
    """The device a benchmark's model computed on (not whether a GPU exists: build_model leaves it on the CPU)."""
    return next(model.parameters()).device.type


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_dpo(cfg, inputs, n: int, tmp: Path) -> dict:
    from trl import DPOConfig

    from mmart.train.data import DecisionCollator
    from mmart.train.dpo_fast import FastDPOConfig, MultimodalDPOTrainer, MultipleChoiceDPOTrainer, expand_to_pairs

    out = {}
    examples = subsample(inputs.builder.preference_examples("train"), n, 0)
    for method in ("fast", "trl"):
        model, tok = build_model(cfg, inputs.cache, None)
        rows = rows_for(inputs, model, tok, examples)
        common = dict(output_dir=str(tmp / method), per_device_train_batch_size=4, max_steps=len(rows) // 4,
                      learning_rate=1e-5, report_to="none", use_cpu=not torch.cuda.is_available(),
                      save_strategy="no", logging_steps=1000, remove_unused_columns=False, disable_tqdm=True)
        if method == "fast":
            trainer = MultipleChoiceDPOTrainer(model=model, args=FastDPOConfig(**common), train_dataset=rows,
                                               data_collator=DecisionCollator(tok.pad_token_id))
            pairs = int(sum(len(r[0]) for r in rows["rejected"]))
        else:
            pair_rows = Dataset.from_list(list(expand_to_pairs(rows.to_list())))
            # TRL's DPOConfig defaults to bf16 and gradient checkpointing: off, as on the fast path.
            trainer = MultimodalDPOTrainer(model, args=DPOConfig(**common, max_length=None, bf16=False,
                                                                 gradient_checkpointing=False),
                                           train_dataset=pair_rows, processing_class=tok)
            trainer.args.max_steps = len(pair_rows) // 4  # the same examples: all their pairs
        start = time.perf_counter()
        trainer.train()
        secs = time.perf_counter() - start
        out[method] = {"examples": len(rows), "seconds": secs, "examples_per_s": len(rows) / secs,
                       "device": ran_on(trainer.model)}
        if method == "fast":
            out[method]["pairs"] = pairs
    out["speedup"] = out["fast"]["examples_per_s"] / out["trl"]["examples_per_s"]
    return out


@torch.inference_mode()
def bench_choosing(cfg, inputs, n: int, repeats: int) -> dict:
    model, tok = build_model(cfg, inputs.cache, None)
    model.eval()
    rows = rows_for(inputs, model, tok, inputs.builder.pair_examples("test")[:n]).to_list()
    ids, mask = pad_sequences([r["input_ids"] for r in rows], tok.pad_token_id, side="left")
    arts = pad_artwork_ids([r["artwork_ids"] for r in rows])
    letters = torch.tensor(rows[0]["answer_ids"][0])
    k = len(letters)

    def one_forward():
        read_log_probs(model, ids, mask, arts, letters)

    def k_forwards():  # one prompt per candidate, each asking "this one?", as a per-candidate scorer would
        for _ in range(k):
            read_log_probs(model, ids, mask, arts, letters[:1])

    def generate():
        model.generate(input_ids=ids, attention_mask=mask, artwork_ids=arts, max_new_tokens=2, do_sample=False,
                       pad_token_id=tok.pad_token_id)

    out = {}
    for name, fn in (("one_forward", one_forward), ("k_forwards", k_forwards), ("generate", generate)):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
        out[name] = {"seconds": statistics.median(times), "pairs_per_s": n / statistics.median(times)}
    out["k"] = k
    out["device"] = ran_on(model)
    out["speedup_vs_k_forwards"] = out["k_forwards"]["seconds"] / out["one_forward"]["seconds"]
    out["speedup_vs_generate"] = out["generate"]["seconds"] / out["one_forward"]["seconds"]
    return out


def bench_step(cfg, inputs, n: int, repeats: int) -> dict:
    """Cache gather vs the vision tower inside the step (images decoded and preprocessed once, outside both)."""
    from mmart.vision.images import catalog_items, open_rgb
    from mmart.vision.tower import encode_images, load_tower

    model, tok = build_model(cfg, inputs.cache, None)
    model.train()
    examples = subsample(inputs.builder.choice_examples("train"), n, 0)
    batch = collate_rows(rows_for(inputs, model, tok, examples).to_list(), tok.pad_token_id)
    arts = batch["artwork_ids"]
    tower = load_tower(cfg.tower)
    items = {it.artwork_id: it for it in catalog_items(inputs.contract)}
    used = sorted({int(a) for a in arts.flatten().tolist() if a >= 0})
    pixels = torch.stack([tower.preprocess(open_rgb(items[inputs.cache.artwork_ids[i]].path)) for i in used])
    remap = torch.full((len(inputs.cache),), -1, dtype=torch.long)
    remap[torch.tensor(used)] = torch.arange(len(used))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step(with_tower: bool):
        if with_tower:  # encode this batch's artworks now, as a pipeline without a cache would
            with torch.no_grad():
                vecs = encode_images(tower.model, pixels, cfg.cache.tokens_per_artwork)
            set_artwork_cache(model, vecs)
            batch_arts = torch.where(arts >= 0, remap[arts.clamp(min=0)], arts)
        else:
            set_artwork_cache(model, inputs.cache.embeddings)
            batch_arts = arts
        loss = choice_loss(score_batch(model, dict(batch, artwork_ids=batch_arts)), batch)[0]
        loss.backward(); opt.step(); opt.zero_grad()

    out = {}
    for name, flag in (("cache", False), ("tower_in_step", True)):
        step(flag)
        times = []
        for _ in range(repeats):
            start = time.perf_counter(); step(flag); times.append(time.perf_counter() - start)
        out[name] = {"seconds": statistics.median(times), "examples_per_s": n / statistics.median(times),
                     "artworks_encoded_per_step": len(used) if flag else 0}
    out["device"] = ran_on(model)
    out["peak_rss_mb_process"] = peak_rss_mb()
    out["note"] = ("peak memory is the whole process's (both variants ran in it); on a GPU compare "
                   "torch.cuda.max_memory_allocated per variant")
    return out


def bench_precision(cfg, inputs, n: int, repeats: int) -> dict:
    """fp32 vs bf16 autocast for one SFT-shaped step on the same batch (fp32 master weights either way)."""
    model, tok = build_model(cfg, inputs.cache, None)
    model.train()
    batch = collate_rows(rows_for(inputs, model, tok, subsample(inputs.builder.choice_examples("train"), n, 0))
                         .to_list(), tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    device_type = next(model.parameters()).device.type

    def step(bf16: bool):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            loss = choice_loss(score_batch(model, batch), batch)[0]
        loss.backward(); opt.step(); opt.zero_grad()

    out = {"examples": n, "tokens_per_example": float(batch["attention_mask"].sum()) / n}
    for name, flag in (("fp32", False), ("bf16", True)):
        step(flag)
        times = []
        for _ in range(repeats):
            start = time.perf_counter(); step(flag); times.append(time.perf_counter() - start)
        out[name] = {"seconds": statistics.median(times), "examples_per_s": n / statistics.median(times)}
    out["speedup"] = out["bf16"]["examples_per_s"] / out["fp32"]["examples_per_s"]
    out["device"] = ran_on(model)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=["dpo", "choosing", "step", "precision"],
                    help="which comparisons to run: dpo, choosing, step, precision")
    ap.add_argument("--out", default="outputs/bench/train.json")
    args = ap.parse_args(argv)
    cfg = load_config(PipelineConfig, args.config, args.set)
    cfg = replace(cfg, model=replace(cfg.model, projector_init="random"))  # speed only: skip stage 0
    # (a) compares against TRL and (b) against K forwards / generate: both are about letter answers.
    cfg = replace(cfg, prompt=replace(cfg.prompt, answer="letter"))
    inputs = load_inputs(cfg)
    tmp = Path(args.out).parent / "tmp"
    results = {"config": args.config, "examples": args.examples}
    if "dpo" in args.only:
        results["dpo"] = bench_dpo(cfg, inputs, args.examples, tmp)
    if "choosing" in args.only:
        results["choosing"] = bench_choosing(cfg, inputs, args.examples, args.repeats)
    if "step" in args.only:
        results["step"] = bench_step(cfg, inputs, min(args.examples, 8), args.repeats)
    if "precision" in args.only:
        results["precision"] = bench_precision(cfg, inputs, min(args.examples, 8), args.repeats)
    # Where the measured models ran (each section records it), not whether the machine has a GPU.
    ran = {part.get("device") or part.get("fast", {}).get("device")
           for part in results.values() if isinstance(part, dict)}
    results["device"] = ", ".join(sorted(d for d in ran if d)) or "none"
    print(f"device: {results['device']}")
    print(f"{'what':<44}{'A':>14}{'B':>14}{'ratio':>10}")
    if "dpo" in results:
        d = results["dpo"]
        print(f"{'DPO examples/s: fast (A) vs TRL (B)':<44}{d['fast']['examples_per_s']:>14.3f}"
              f"{d['trl']['examples_per_s']:>14.3f}{d['speedup']:>10.2f}")
    if "choosing" in results:
        c = results["choosing"]
        print(f"{'choosing pairs/s: 1 fwd (A) vs K fwds (B)':<44}{c['one_forward']['pairs_per_s']:>14.2f}"
              f"{c['k_forwards']['pairs_per_s']:>14.2f}{c['speedup_vs_k_forwards']:>10.2f}")
        print(f"{'choosing pairs/s: 1 fwd (A) vs generate (B)':<44}{c['one_forward']['pairs_per_s']:>14.2f}"
              f"{c['generate']['pairs_per_s']:>14.2f}{c['speedup_vs_generate']:>10.2f}")
    if "step" in results:
        s = results["step"]
        print(f"{'train step ex/s: cache (A) vs tower (B)':<44}{s['cache']['examples_per_s']:>14.3f}"
              f"{s['tower_in_step']['examples_per_s']:>14.3f}"
              f"{s['cache']['examples_per_s'] / s['tower_in_step']['examples_per_s']:>10.2f}")
        print(f"peak RSS of the process: {s['peak_rss_mb_process']:.0f} MB")
    if "precision" in results:
        q = results["precision"]
        print(f"{'train step ex/s: bf16 autocast (A) vs fp32 (B)':<44}{q['bf16']['examples_per_s']:>14.3f}"
              f"{q['fp32']['examples_per_s']:>14.3f}{q['speedup']:>10.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
