"""A home page scored through the cached member prefix equals each title's own full prompt."""

from __future__ import annotations

import pytest
import torch

from mmart.data.contract import load_contract
from mmart.examples import Example, ExampleBuilder, PromptConfig, PromptEncoder
from mmart.model.packing import collate_rows, pack_decisions
from mmart.model.scoring import score_batch
from mmart.model.testing import tiny_chooser
from mmart.serve import HomePageChooser, Watched


class _Cache:
    """The part of ArtworkCache the chooser API uses."""

    def __init__(self, ids):
        self.index = {a: i for i, a in enumerate(ids)}

    def rows(self, ids):
        return torch.tensor([self.index[a] for a in ids])


@pytest.mark.parametrize("arch,answer,context", [("llama", "per_candidate", "title"), ("qwen2", "letter", "title"),
                                                  ("llama", "per_candidate", "own")])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # sdpa on a CPU: the shared-prefix path; eager: a copy per row
def test_home_page_equals_one_prompt_per_title_and_reuses_the_prefix(tiny_world, arch, answer, context, attention
                                                                     ) -> None:
    from mmart.model.chooser import causal_lm_of

    contract = load_contract(tiny_world)
    arts = list(contract.frame("artworks").artwork_id)
    model, tok = tiny_chooser(arch, tokens_per_artwork=1, projector_tokens=2, num_artworks=len(arts))
    causal_lm_of(model).set_attn_implementation(attention)
    builder = ExampleBuilder(contract, PromptConfig(answer=answer, max_history=4, history_summary=True, names=False,
                                                    synopsis=False, candidate_context=context))
    encoder = PromptEncoder(builder, tok, slots_per_artwork=2)
    cache = _Cache(arts)
    chooser = HomePageChooser(model, tok, builder, encoder, cache)
    assert chooser.shared_prefix is (attention == "sdpa")
    user = next(u for u, h in builder.history.items() if len(h) >= 3)
    history = [Watched(e["title_id"], e.get("rating"), e.get("artwork_id"), e["timestamp"]) for e in builder.history[user]]
    decided_at = max(w.timestamp for w in history) + 1
    titles = {t: builder.artworks_of[t][::-1] for t in list(builder.titles)[:12]}

    page = chooser.choose(history, titles, decided_at)
    again = chooser.choose(history, dict(list(titles.items())[:3]), decided_at)
    assert chooser.stats["prefix_forwards"] == 1 and chooser.stats["prefix_hits"] == 1

    decisions = [encoder.decision(Example(t, user, t, "test", decided_at, c)) for t, c in titles.items()]
    rows = pack_decisions(decisions, 1, lambda ids: cache.rows(ids).tolist())
    with torch.no_grad():
        alone = torch.softmax(score_batch(model, collate_rows(rows, tok.pad_token_id))[:, 0], -1)
    for i, (t, cands) in enumerate(titles.items()):
        expected = alone[i, : len(cands)].tolist()
        assert list(page[t]) == cands
        assert page[t][cands[0]] == pytest.approx(expected[0], abs=1e-4)
        assert list(page[t].values()) == pytest.approx(expected, abs=1e-4)
        if t in again:
            assert list(again[t].values()) == pytest.approx(expected, abs=1e-4)

    fewer = chooser.choose(history[:-1] if history[0].timestamp < history[-1].timestamp else history[1:], titles,
                           decided_at)
    assert chooser.stats["prefix_forwards"] == 2  # another history: another prefix
    assert any(abs(fewer[t][c] - page[t][c]) > 1e-4 for t in titles for c in titles[t])
