"""Can the LLM read artwork slots? Letter answer vs a per-candidate readout, on a grounding task, in one run.

Run as: python scripts/probe_answer_format.py [--config configs/default.yaml] [--train 400]

Task: four artworks with four different themes; "which one shows <theme>?". Two readouts of
the same chooser, each trained from the same start for the same steps:

* letter: the answer is the candidate's letter (docs/architecture.md): log-probs of A-D at the
  answer position. The model must map the right slot back to its letter.
* per_candidate: after each candidate's slot a marker token; its score is the logit of " yes"
  right after that candidate, and the K scores are trained with a softmax across candidates.
  Still one forward per prompt, but each artwork is judged where it stands.

Prints accuracy on 96 held-out prompts before and after training. Needs the config's cache.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from dataclasses import replace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mmart.config import PipelineConfig, load_config  # noqa: E402
from mmart.examples import SYSTEM_PROMPT  # noqa: E402
from mmart.model.batching import pad_artwork_ids, pad_sequences  # noqa: E402
from mmart.model.chooser import slots_per_artwork  # noqa: E402
from mmart.model.llm import SLOT_TOKEN  # noqa: E402
from mmart.model.readout import LetterReadout, PerCandidateReadout  # noqa: E402
from mmart.model.scoring import read_log_probs  # noqa: E402
from mmart.train.common import load_inputs  # noqa: E402
from mmart.train.init import build_model  # noqa: E402


def make_prompts(inputs, tok, fmt: str, n: int, seed: int, slots: int = 1):
    arts = inputs.contract.frame("artworks")
    theme = {a: next(t.split(":", 1)[1] for t in tags if t.startswith("theme:")) for a, tags in zip(arts.artwork_id, arts.tags)}
    by_title = arts.groupby("title_id").artwork_id.agg(list)
    titles = list(by_title.index)
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        cands, seen = [], set()
        while len(cands) < 4:
            a = rng.choice(by_title[rng.choice(titles)])
            if theme[a] not in seen:
                cands.append(a); seen.add(theme[a])
        ans = rng.randrange(4)
        art = SLOT_TOKEN * slots
        if fmt == "letter":
            user = ("Artworks:\n" + "\n".join(f"{L}: {art} {L}" for L in "ABCD")
                    + f"\nWhich artwork shows {theme[cands[ans]]}? Answer with one letter (A-D).")
        else:
            marker = PerCandidateReadout.MARKER
            user = f"Does each artwork show {theme[cands[ans]]}?\n" + "\n".join(f"{L}: {art} {marker}" for L in "ABCD")
        text = tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}],
                                       tokenize=False, add_generation_prompt=(fmt == "letter"))
        rows.append((tok(text, add_special_tokens=False)["input_ids"], inputs.cache.rows(cands).tolist(), ans))
    return rows


def run(cfg, inputs, fmt: str, n_train: int, lr: float, projector_lr: float) -> dict:
    model, tok = build_model(cfg, inputs.cache, inputs.contract)
    letters = torch.tensor(LetterReadout().read_token_ids(tok, 4))
    yes = PerCandidateReadout().read_token_ids(tok, 1)[0]
    mark = tok(" " + PerCandidateReadout.MARKER, add_special_tokens=False)["input_ids"][-1]
    slots = slots_per_artwork(model)
    train, test = make_prompts(inputs, tok, fmt, n_train, 0, slots), make_prompts(inputs, tok, fmt, 96, 1, slots)

    def scores(rows):
        ids, mask = pad_sequences([r[0] for r in rows], tok.pad_token_id)
        arts = pad_artwork_ids([r[1] for r in rows])
        if fmt == "letter":
            return read_log_probs(model, ids, mask, arts, letters)
        logits = model(input_ids=ids, attention_mask=mask, artwork_ids=arts).logits
        pos = (ids == mark).nonzero()  # the token after each marker is read, as PerCandidateReadout does
        return logits[pos[:, 0], pos[:, 1], yes].view(len(rows), 4)

    def accuracy():
        model.eval()
        with torch.no_grad():
            hits = sum((scores(test[i:i + 16]).argmax(-1) == torch.tensor([r[2] for r in test[i:i + 16]])).sum().item()
                       for i in range(0, len(test), 16))
        model.train()
        return hits / len(test)

    before = accuracy()
    groups = {"proj": [], "rest": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups["proj" if "artwork_projector" in name else "rest"].append(p)
    opt = torch.optim.AdamW([{"params": groups["rest"], "lr": lr}, {"params": groups["proj"], "lr": projector_lr}])
    start = time.perf_counter()
    for i in range(0, len(train), 8):
        batch = train[i:i + 8]
        loss = torch.nn.functional.cross_entropy(scores(batch), torch.tensor([r[2] for r in batch]))
        loss.backward(); opt.step(); opt.zero_grad()
    return {"format": fmt, "prompt_tokens": len(train[0][0]), "acc_before": before, "acc_after": accuracy(),
            "train_seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--train", type=int, default=400, help="training prompts (batch 8)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--projector-lr", type=float, default=2e-3)
    args = ap.parse_args()
    cfg = load_config(PipelineConfig, args.config, args.set)
    cfg = replace(cfg, model=replace(cfg.model, projector_init_steps=100))
    inputs = load_inputs(cfg)
    print(f"{'readout':<16}{'tokens':>8}{'acc before':>12}{'acc after':>12}{'train s':>10}")
    for fmt in ("letter", "per_candidate"):
        r = run(cfg, inputs, fmt, args.train, args.lr, args.projector_lr)
        print(f"{fmt:<16}{r['prompt_tokens']:>8}{r['acc_before']:>12.3f}{r['acc_after']:>12.3f}{r['train_seconds']:>10.0f}",
              flush=True)


if __name__ == "__main__":
    main()
