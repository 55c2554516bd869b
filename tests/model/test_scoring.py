"""Choosing = one forward: equal to K forwards over prompt + letter, under either padding."""

from __future__ import annotations

import pytest
import torch

from mmart.model.batching import pad_artwork_ids, pad_sequences
from mmart.model.scoring import answer_positions, read_log_probs
from mmart.model.testing import letter_ids
from mmart.model.testing import tiny_chooser, tiny_prompt_ids

T = 2


def _examples(tokenizer):
    prompts = [
        tiny_prompt_ids(tokenizer, 4, T),
        tiny_prompt_ids(tokenizer, 3, T, history="Heat, crime."),
        tiny_prompt_ids(tokenizer, 4, T, history="Recently played: The Crown (drama, history), Alien (horror)."),
    ]
    artworks = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10]]
    return prompts, artworks


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_one_forward_equals_one_forward_per_candidate_letter(arch: str) -> None:
    model, tokenizer = tiny_chooser(arch, tokens_per_artwork=T)
    prompts, artworks = _examples(tokenizer)
    letters = letter_ids(tokenizer, 4)
    input_ids, attention_mask = pad_sequences(prompts, tokenizer.pad_token_id, side="right")
    with torch.no_grad():
        scores = read_log_probs(model, input_ids, attention_mask, pad_artwork_ids(artworks), letters)
        for b, (prompt, rows) in enumerate(zip(prompts, artworks)):
            for k, letter in enumerate(letters.tolist()):
                ids = torch.tensor([prompt + [letter]])
                logits = model(input_ids=ids, artwork_ids=torch.tensor([rows])).logits
                expected = logits[0, -2].log_softmax(-1)[letter]
                torch.testing.assert_close(scores[b, k], expected, rtol=0, atol=1e-5)


def test_left_and_right_padding_score_the_same() -> None:
    model, tokenizer = tiny_chooser("llama", tokens_per_artwork=T)
    prompts, artworks = _examples(tokenizer)
    letters = letter_ids(tokenizer, 4)
    artwork_ids = pad_artwork_ids(artworks)
    with torch.no_grad():
        right = read_log_probs(model, *pad_sequences(prompts, tokenizer.pad_token_id, "right"), artwork_ids, letters)
        left = read_log_probs(model, *pad_sequences(prompts, tokenizer.pad_token_id, "left"), artwork_ids, letters)
    torch.testing.assert_close(left, right, rtol=0, atol=1e-5)


def test_rows_with_fewer_candidates_get_minus_infinity() -> None:
    model, tokenizer = tiny_chooser("llama", tokens_per_artwork=T)
    prompts, artworks = _examples(tokenizer)
    letters = letter_ids(tokenizer, 4)
    per_row = letters.repeat(3, 1)
    per_row[1, 3] = -1  # the second prompt has 3 candidates
    with torch.no_grad():
        batch = pad_sequences(prompts, tokenizer.pad_token_id)
        scores = read_log_probs(model, *batch, pad_artwork_ids(artworks), per_row)
        shared = read_log_probs(model, *batch, pad_artwork_ids(artworks), letters)
    assert scores[1, 3] == float("-inf")
    torch.testing.assert_close(scores[:, :3], shared[:, :3])


def test_answer_positions_and_letter_tokens() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1]])
    assert answer_positions(mask).tolist() == [2, 3, 3]
    tokenizer = tiny_chooser("llama")[1]
    assert len(letter_ids(tokenizer, 8).unique()) == 8
    from mmart.errors import UserError
    from mmart.model.readout import single_token_id

    with pytest.raises(UserError, match="into 2 tokens|into 3 tokens|into 4 tokens|into 5 tokens"):
        single_token_id(tokenizer, "Alien horror", "an answer")


def _per_candidate_positions(tokenizer, prompts):
    """Score each candidate right after its own slots: the last slot of each candidate (as in the real prompts)."""
    slot = tokenizer.convert_tokens_to_ids("<artwork>")
    out = []
    for p in prompts:
        slots = [i for i, t in enumerate(p) if t == slot]
        out.append(slots[T - 1:: T])
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_per_candidate_readout_equals_full_logits_at_each_position(arch: str) -> None:
    model, tokenizer = tiny_chooser(arch, tokens_per_artwork=T)
    prompts, artworks = _examples(tokenizer)
    positions = _per_candidate_positions(tokenizer, prompts)
    yes = 7
    tokens = torch.tensor([[yes] * 4, [yes] * 3 + [-1], [yes] * 4])
    pos = torch.tensor([p + [0] * (4 - len(p)) for p in positions])
    with torch.no_grad():
        scores = read_log_probs(model, *pad_sequences(prompts, tokenizer.pad_token_id), pad_artwork_ids(artworks),
                               tokens, pos)
        for b, (prompt, rows) in enumerate(zip(prompts, artworks)):
            logits = model(input_ids=torch.tensor([prompt]), artwork_ids=torch.tensor([rows])).logits[0]
            for k, p in enumerate(positions[b]):
                torch.testing.assert_close(scores[b, k], logits[p].log_softmax(-1)[yes], rtol=0, atol=1e-5)
    assert scores[1, 3] == float("-inf")


def test_per_candidate_scores_see_their_own_artwork_and_not_later_ones() -> None:
    """Causal: changing candidate B's artwork moves B's (and later) scores, never A's."""
    model, tokenizer = tiny_chooser("llama", tokens_per_artwork=T)
    prompts, artworks = _examples(tokenizer)
    prompt, rows = prompts[0], artworks[0]
    pos = torch.tensor([_per_candidate_positions(tokenizer, [prompt])[0]])
    tokens = torch.full((1, 4), 7)
    ids, mask = pad_sequences([prompt], tokenizer.pad_token_id)
    with torch.no_grad():
        base = read_log_probs(model, ids, mask, torch.tensor([rows]), tokens, pos)
        changed = read_log_probs(model, ids, mask, torch.tensor([[rows[0], 9, rows[2], rows[3]]]), tokens, pos)
    assert abs(float(base[0, 0] - changed[0, 0])) < 1e-6
    assert abs(float(base[0, 1] - changed[0, 1])) > 1e-4


def test_per_candidate_position_past_the_row_is_refused() -> None:
    model, tokenizer = tiny_chooser("llama", tokens_per_artwork=T)
    prompts, artworks = _examples(tokenizer)
    ids, mask = pad_sequences(prompts, tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="past its row"):
        read_log_probs(model, ids, mask, pad_artwork_ids(artworks), torch.full((3, 1), 7),
                      torch.full((3, 1), ids.shape[1] - 1))


def test_bf16_scoring_stays_close_to_fp32_and_returns_fp32_probabilities() -> None:
    from mmart.predict import score_rows

    model, tokenizer = tiny_chooser("llama", tokens_per_artwork=T)
    prompts, artworks = _examples(tokenizer)
    letters = letter_ids(tokenizer, 4).tolist()
    rows = [{"input_ids": p, "segment_ids": [1] * len(p), "position_ids": list(range(len(p))), "artwork_ids": a,
             "answer_ids": [letters[: len(a)]], "score_positions": [[len(p) - 1] * len(a)], "decision_index": [i]}
            for i, (p, a) in enumerate(zip(prompts, artworks))]
    full = score_rows(model, rows, tokenizer.pad_token_id, progress=False)
    half = score_rows(model, rows, tokenizer.pad_token_id, progress=False, bf16=True)
    full, half = [full[i] for i in range(len(rows))], [half[i] for i in range(len(rows))]
    for f, h in zip(full, half):
        assert h.dtype == f.dtype and abs(h.sum() - 1) < 1e-5
        assert abs(h - f).max() < 0.05
