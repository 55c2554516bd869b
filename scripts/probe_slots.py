"""Do a chooser's artwork slots still read as words? Per slot: the nearest LLM token and the cosine to its tag word.

Run as: python scripts/probe_slots.py --model outputs/default/sft/model [--model outputs/default/init/model ...]
        [--cache outputs/default/cache] [--data data/world]

Stage 0 fits slot e of every artwork to the input embedding of the first token of its e-th tag
word (theme, shot, tone, title size). This prints, for each saved chooser and each slot, how
often the projected vector's nearest token (cosine, over the whole vocabulary but the slot token)
is that word's token, the mean cosine to it, and the mean norms. A projector trained on in SFT
drifts away from the words; the default freezes it (``sft.projector_lr: 0``).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mmart.data.contract import load_contract  # noqa: E402
from mmart.model.checkpoint import load_chooser  # noqa: E402
from mmart.model.chooser import (  # noqa: E402
    chooser_projector,
    chooser_slot_token_id,
    set_artwork_cache,
    slots_per_artwork,
)
from mmart.train.align import describe, split_words  # noqa: E402
from mmart.vision.store import ArtworkCache  # noqa: E402


def probe(model_dir: str, cache: ArtworkCache, tags: dict[str, list[str]]) -> list[dict]:
    model, tok, _ = load_chooser(model_dir)
    set_artwork_cache(model, cache.embeddings)
    slots = slots_per_artwork(model)
    emb = model.get_input_embeddings().weight.detach().float()
    unit = emb / emb.norm(dim=-1, keepdim=True)
    unit[chooser_slot_token_id(model)] = 0  # the slot token itself is no word
    with torch.no_grad():
        out = chooser_projector(model)(cache.embeddings.float())  # [N, T * E, H]
    rows = []
    for e in range(slots):
        words = [split_words(describe(tags[a], None, "tags").split(), slots)[e] for a in cache.artwork_ids]
        if any(len(w) != 1 for w in words):
            rows.append({"slot": e, "note": "not one tag word per slot (projector_tokens != number of tag families)"})
            continue
        target = torch.tensor([tok(" " + w[0], add_special_tokens=False)["input_ids"][0] for w in words])
        vec = out[:, e]
        nearest = ((vec / vec.norm(dim=-1, keepdim=True)) @ unit.T).argmax(-1)
        rows.append({
            "slot": e,
            "example": words[0][0],
            "nearest_is_word": float((nearest == target).float().mean()),
            "cosine": float(torch.nn.functional.cosine_similarity(vec, emb[target], dim=-1).mean()),
            "norm": float(vec.norm(dim=-1).mean()),
            "word_norm": float(emb[target].norm(dim=-1).mean()),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="a saved chooser folder (repeatable)")
    ap.add_argument("--cache", default="outputs/default/cache", help="the embedding cache the models read")
    ap.add_argument("--data", default="data/world", help="the dataset folder (artwork tags)")
    args = ap.parse_args()
    cache = ArtworkCache.load(args.cache, "cpu")
    arts = load_contract(args.data, check=False).frame("artworks")
    tags = {a: list(t) for a, t in zip(arts.artwork_id, arts.tags)}
    print("model | slot | e.g. | nearest token is the tag word | cosine to it | norm (word's norm)")
    for model_dir in args.model:
        for r in probe(model_dir, cache, tags):
            if "note" in r:
                print(f"{model_dir} | {r['slot']} | {r['note']}")
            else:
                print(f"{model_dir} | {r['slot']} | {r['example']} | {r['nearest_is_word']:.3f} | {r['cosine']:.3f} | "
                      f"{r['norm']:.2f} ({r['word_norm']:.2f})")


if __name__ == "__main__":
    main()
