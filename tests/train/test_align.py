"""Stage 0: each projector output starts at the embedding of one describing word of its artwork."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmart.data.contract import load_contract
from mmart.model.projector import ArtworkProjector, ProjectorConfig
from mmart.model.testing import tiny_tokenizer
from mmart.train.align import align_projector, split_words, word_targets


def test_split_words_keeps_order_and_spreads_the_remainder() -> None:
    assert split_words(["horror", "close-up", "dark", "small"], 4) == [["horror"], ["close-up"], ["dark"], ["small"]]
    assert split_words(list("abcde"), 2) == [["a", "b", "c"], ["d", "e"]]
    assert split_words(["a"], 2) == [["a"], []]
    assert split_words(list("abc"), 1) == [list("abc")]
    with pytest.raises(ValueError):
        split_words(["a"], 0)


@pytest.fixture(scope="module")
def setup(tiny_world):
    contract = load_contract(tiny_world)
    arts = contract.frame("artworks")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    embedding = nn.Embedding(len(tokenizer), 32)
    return contract, arts, tokenizer, embedding


def _word(tokenizer, embedding, word):
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return embedding.weight[ids[0]]  # a word's first token


def test_word_targets_give_one_tag_family_per_slot(setup) -> None:
    contract, arts, tokenizer, embedding = setup
    ids = list(arts.artwork_id[:6])
    targets = word_targets(contract, ids, tokenizer, embedding, "tags", slots=4)
    assert targets.shape == (6, 4, 32)
    for i, tags in enumerate(arts.tags[:6]):
        words = [t.split(":", 1)[1] for t in tags]
        for e, word in enumerate(words):
            torch.testing.assert_close(targets[i, e], _word(tokenizer, embedding, word).detach())
    one = word_targets(contract, ids, tokenizer, embedding, "tags", slots=1)
    torch.testing.assert_close(one[:, 0], targets.mean(1))  # one slot: the mean of the four words


def test_aligned_slots_read_back_as_their_artworks_tag_words(setup) -> None:
    """Cached vectors that encode the tags (plus noise) -> 4 slots, each nearest its own tag word."""
    contract, arts, tokenizer, embedding = setup
    families = [sorted({t for tags in arts.tags for t in tags if t.startswith(f + ":")})
                for f in ("theme", "shot", "tone", "title")]
    vocab = [t for f in families for t in f]
    generator = torch.Generator().manual_seed(0)
    code = torch.randn(len(vocab), 24, generator=generator)
    onehot = torch.tensor([[float(t in tags) for t in vocab] for tags in arts.tags])
    vectors = (onehot @ code + 0.1 * torch.randn(len(arts), 24, generator=generator))[:, None, :]
    targets = word_targets(contract, list(arts.artwork_id), tokenizer, embedding, "tags", slots=4)
    torch.manual_seed(0)
    projector = ArtworkProjector(ProjectorConfig(in_dim=24, out_dim=32, tokens=4))
    stats = align_projector(projector, vectors, targets, steps=300)
    assert stats["loss_last"] < 0.1 * stats["loss_first"]
    with torch.no_grad():
        slots = projector(vectors)  # [N, 4, H]
    for e, family in enumerate(families):
        # The tiny tokenizer gives some words the same first token: compare the token read, not the word.
        words = torch.stack([_word(tokenizer, embedding, t.split(":", 1)[1]) for t in family]).detach()
        read = words[torch.cdist(slots[:, e], words).argmin(-1)]
        truth = words[[family.index(next(t for t in tags if t in family)) for tags in arts.tags]]
        assert (read == truth).all(-1).float().mean() > 0.95, family
    with pytest.raises(ValueError, match="slots = the projector's tokens"):
        align_projector(projector, vectors, targets[:, :2], steps=1)
