"""Every YAML in configs/ loads into its dataclass, says how to launch it, and bad keys are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmart.config import CONFIG_ROOT, ConfigError, PipelineConfig, apply_overrides, config_class_for, load_config
from mmart.data.world import WorldConfig
from mmart.errors import UserError

ALL_YAML = sorted(CONFIG_ROOT.rglob("*.yaml"))


def test_there_are_configs():
    names = {p.relative_to(CONFIG_ROOT).as_posix() for p in ALL_YAML}
    assert {"world/tiny.yaml", "world/default.yaml", "world/paper.yaml"} <= names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(CONFIG_ROOT).as_posix())
def test_config_loads_and_says_how_to_launch(path: Path):
    lines = path.read_text().splitlines()
    opening = []
    for line in lines:
        if not line.startswith("#"):
            break
        opening.append(line)
    assert any("Launch:" in line for line in opening), f"{path} must open with a '# Launch: <command>' comment"
    if path.parent.name == "accelerate":
        from accelerate.commands.config.config_args import load_config_from_file

        assert load_config_from_file(str(path)) is not None
        return
    load_config(config_class_for(path), path)


def test_unknown_key_is_named_with_suggestion(tmp_path):
    bad = tmp_path / "w.yaml"
    bad.write_text("num_titels: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'num_titels'; did you mean 'num_titles'"):
        load_config(WorldConfig, bad)


def test_wrong_type_is_named(tmp_path):
    bad = tmp_path / "w.yaml"
    bad.write_text("num_titles: many\n")
    with pytest.raises(ConfigError, match=r"num_titles: expected an integer, got 'many'"):
        load_config(WorldConfig, bad)


def test_invalid_value_is_refused(tmp_path):
    bad = tmp_path / "w.yaml"
    bad.write_text("artworks_per_title: 12\n")
    with pytest.raises(ConfigError, match="artworks_per_title must be in 2..8"):
        load_config(WorldConfig, bad)


def test_dotted_overrides_reach_nested_sections():
    cfg = apply_overrides(PipelineConfig(), ["world.num_titles=12", "world.themes=[romance, action]",
                                                "world.themes_per_title=[1, 2]", "data_dir=x"])
    assert cfg.world.num_titles == 12 and cfg.world.themes == ["romance", "action"] and cfg.data_dir == "x"
    with pytest.raises(ConfigError, match=r"unknown key 'world.num_title'; did you mean 'world.num_titles'"):
        apply_overrides(PipelineConfig(), ["world.num_title=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(PipelineConfig(), ["world.num_titles"])


def test_section_may_be_a_path_to_another_yaml(tmp_path):
    (tmp_path / "p.yaml").write_text("world: world/tiny.yaml\ndata_dir: data/tiny\noutput_dir: outputs/tiny\n")
    cfg = load_config(PipelineConfig, tmp_path / "p.yaml")
    assert cfg.world.num_titles == yaml.safe_load((CONFIG_ROOT / "world" / "tiny.yaml").read_text())["num_titles"]


def test_inherit_deep_merges_over_the_parent(tmp_path):
    (tmp_path / "parent.yaml").write_text("data_dir: data/p\noutput_dir: outputs/p\nprompt:\n  max_history: 3\n  names: false\n"
                                          "world: world/tiny.yaml\n")
    (tmp_path / "child.yaml").write_text("inherit: parent.yaml\noutput_dir: outputs/c\nprompt:\n  max_history: 5\n"
                                         "world:\n  num_titles: 7\n")
    c = load_config(PipelineConfig, tmp_path / "child.yaml")
    tiny = load_config(PipelineConfig, tmp_path / "parent.yaml").world
    assert c.output_dir == "outputs/c" and c.prompt.max_history == 5 and c.prompt.names is False
    assert c.world.num_titles == 7 and c.world.num_members == tiny.num_members  # the included section, refined


def test_inherit_loop_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(PipelineConfig, tmp_path / "a.yaml")


def test_text_only_variant_is_the_default_with_captions():
    default = load_config(PipelineConfig, CONFIG_ROOT / "default.yaml")
    text = load_config(PipelineConfig, CONFIG_ROOT / "text_only.yaml")
    assert text.prompt.artwork_input == "caption" and default.prompt.artwork_input == "embeddings"
    assert (text.sft, text.dpo, text.model, text.world) == (default.sft, default.dpo, default.model, default.world)


# --- Values outside their range fail at load, naming the key and what it may be (issue 12 item 11). ---

BAD_VALUES = [
    ("sft.epochs=-1", r"sft\.epochs must be > 0, got -1"),  # saved an untrained model with rc 0
    ("sft.propensity_clip=-1", r"sft\.propensity_clip must be >= 1 \(or null for a uniform draw\), got -1"),
    ("sft.batch_size=0", r"sft\.batch_size must be >= 1, got 0"),
    ("sft.grad_accum=0", r"sft\.grad_accum must be >= 1"),
    ("sft.lr=-1", r"sft\.lr must be >= 0, got -1"),
    ("sft.teacher_temperature=0", r"sft\.teacher_temperature must be > 0"),
    ("sft.teacher_weight=1.5", r"sft\.teacher_weight must be in \[0, 1\]"),
    ("sft.warmup_ratio=1.5", r"sft\.warmup_ratio must be in \[0, 1\)"),
    ("sft.seed=-1", r"sft\.seed must be >= 0"),
    ("dpo.batch_size=0", r"dpo\.batch_size must be >= 1, got 0"),
    ("dpo.lr=-1", r"dpo\.lr must be >= 0, got -1"),
    ("dpo.beta=0", r"dpo\.beta must be > 0"),
    ("dpo.label_smoothing=0.5", r"dpo\.label_smoothing must be in \[0, 0\.5\)"),
    ("dpo.save_steps=0", r"dpo\.save_steps must be >= 1"),
    ("model.lora_r=0", r"model\.lora_r must be >= 1, got 0"),
    ("model.projector_tokens=0", r"model\.projector_tokens must be >= 1, got 0"),
    ("model.lora_dropout=1", r"model\.lora_dropout must be in \[0, 1\)"),
    ("world.num_titles=0", r"world\.num_titles must be >= 1, got 0"),
    ("world.num_members=0", r"world\.num_members must be >= 1, got 0"),
    ("world.continue_prob=1.5", r"world\.continue_prob must be in \[0, 1\]"),
    ("world.test_fraction=0", r"world\.test_fraction must be in \(0, 1\)"),
    ("world.production_temperature=0", r"world\.production_temperature must be > 0"),
    ("world.style_weights=[1, 2]", r"world\.style_weights must be a list of 3"),
    ("vision.adapt.batch_size=1", r"vision\.adapt\.batch_size must be >= 2"),
    ("vision.image_resize_mode=crop", r"vision\.image_resize_mode must be one of \['shortest', 'longest', 'squash'\]"),
    ("cache.batch_size=0", r"cache\.batch_size must be >= 1"),
    ("cache.tokens_per_artwork=3", r"cache: tokens_per_artwork must be 1 or a square"),
    ("prompt.max_history=-1", r"prompt\.max_history must be >= 0"),
    ("eval.n_boot=0", r"eval\.n_boot must be >= 1"),
    ("eval.split=tset", r"eval\.split must be one of \['train', 'val', 'test'\]"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_out_of_range_values_are_refused_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(PipelineConfig(), [override])


def test_trls_dpo_path_refuses_negatives_it_cannot_pick():
    with pytest.raises(ConfigError, match=r"dpo\.negatives must be all with dpo\.method: trl"):
        apply_overrides(PipelineConfig(), ["dpo.method=trl", "dpo.negatives=misordered"])


def test_a_bad_value_in_a_file_names_the_file_and_the_key(tmp_path):
    (tmp_path / "p.yaml").write_text("inherit: smoke.yaml\nsft:\n  epochs: -1\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: sft\.epochs must be > 0, got -1\.0$"):
        load_config(PipelineConfig, tmp_path / "p.yaml")


def test_edge_values_that_mean_something_stay_allowed():
    cfg = apply_overrides(PipelineConfig(), ["sft.propensity_clip=null", "prompt.max_history=0", "sft.lr=0",
                                             "sft.projector_lr=1e-3", "sft.max_examples=0", "world.val_fraction=0"])
    assert cfg.sft.propensity_clip is None and cfg.prompt.max_history == 0 and cfg.sft.lr == 0
    with pytest.raises(ConfigError, match=r"sft\.lr must be > 0 when projector_lr is 0 \(else nothing trains\)"):
        apply_overrides(PipelineConfig(), ["sft.lr=0", "sft.projector_lr=0"])


# --- Duplicate keys, missing folders (issue 12 item 13). ---


def test_a_key_given_twice_is_refused_with_file_and_line(tmp_path):
    (tmp_path / "p.yaml").write_text("inherit: smoke.yaml\nsft:\n  lr: 1.0e-3\n  batch_size: 2\n  lr: 1.0e-2\n")
    with pytest.raises(ConfigError, match=r"p\.yaml:5: duplicate key 'lr' \(first on line 3\)"):
        load_config(PipelineConfig, tmp_path / "p.yaml")
    (tmp_path / "e.yaml").write_text("inherit: smoke.yaml\ndpo:\n  extra:\n    max_grad_norm: 1\n    max_grad_norm: 5\n")
    with pytest.raises(ConfigError, match=r"e\.yaml:5: duplicate key 'max_grad_norm' \(first on line 4\)"):
        load_config(PipelineConfig, tmp_path / "e.yaml")
    # The same key in two sections is no duplicate.
    (tmp_path / "ok.yaml").write_text("inherit: smoke.yaml\nsft:\n  lr: 1.0e-3\ndpo:\n  lr: 1.0e-4\n")
    assert load_config(PipelineConfig, tmp_path / "ok.yaml").dpo.lr == 1e-4


def test_a_pipeline_file_must_name_its_data_and_output_folders(tmp_path):
    (tmp_path / "p.yaml").write_text("world: world/tiny.yaml\noutput_dir: outputs/mine\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: data_dir is missing; a pipeline config must name"):
        load_config(PipelineConfig, tmp_path / "p.yaml")
    (tmp_path / "q.yaml").write_text("world: world/tiny.yaml\ndata_dir: data/mine\n")
    with pytest.raises(ConfigError, match=r"q\.yaml: output_dir is missing"):
        load_config(PipelineConfig, tmp_path / "q.yaml")
    # Named by an override, or inherited from a config that names them: fine.
    assert load_config(PipelineConfig, tmp_path / "p.yaml", ["data_dir=data/x"]).data_dir == "data/x"
    (tmp_path / "r.yaml").write_text("inherit: smoke.yaml\noutput_dir: outputs/r\n")
    assert load_config(PipelineConfig, tmp_path / "r.yaml").data_dir == "data/smoke/world"


# --- Unknown keys: the nearest field, and the mmart name of a TrainingArguments name (issue 15 item 5). ---


@pytest.mark.parametrize("override,message", [
    ("sft.learning_rate=1e-4", r"unknown key 'sft\.learning_rate'; 'learning_rate' is the TrainingArguments name, "
                               r"mmart's is 'sft\.lr' \(`mmart config --fields sft` lists every key\)"),
    ("dpo.per_device_train_batch_size=2", r"mmart's is 'dpo\.batch_size'"),
    ("sft.gradient_accumulation_steps=2", r"mmart's is 'sft\.grad_accum'"),
    ("sft.num_train_epochs=2", r"mmart's is 'sft\.epochs'"),
    ("sft.activation_checkpointing=true", r"mmart's is 'sft\.gradient_checkpointing'"),
    ("sft.max_grad_norm=1", r"field mmart does not set goes under sft\.extra\.max_grad_norm"),
    ("model.lora_rank=4", r"unknown key 'model\.lora_rank'; did you mean 'model\.lora_r'\?"),
])
def test_unknown_keys_suggest_the_mmart_name(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(PipelineConfig(), [override])


def test_unknown_key_in_a_file_gets_the_same_suggestion(tmp_path):
    (tmp_path / "p.yaml").write_text("inherit: smoke.yaml\nsft:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: unknown key 'sft\.learning_rate'; .* mmart's is 'sft\.lr'"):
        load_config(PipelineConfig, tmp_path / "p.yaml")


def test_set_reaches_into_extra():
    cfg = apply_overrides(PipelineConfig(), ["sft.extra.report_to=none", "dpo.extra.max_grad_norm=0.5"])
    assert cfg.sft.extra == {"report_to": "none"} and cfg.dpo.extra == {"max_grad_norm": 0.5}
    with pytest.raises(ConfigError, match=r"'sft\.lr' is a value, not a section"):
        apply_overrides(PipelineConfig(), ["sft.lr.x=1"])


# --- Configs found from any working directory (issue 15). ---


@pytest.mark.parametrize("name", ["configs/smoke.yaml", "smoke.yaml"])
def test_a_shipped_config_is_found_from_another_directory(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert load_config(PipelineConfig, name).output_dir == "outputs/smoke"


def test_a_local_config_wins_over_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "smoke.yaml").write_text("data_dir: data/local\noutput_dir: outputs/local\n")
    assert load_config(PipelineConfig, "configs/smoke.yaml").output_dir == "outputs/local"


def test_a_misspelt_config_name_suggests_the_nearest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"config 'configs/defualt\.yaml' not found .*did you mean 'configs/default\.yaml'"):
        load_config(PipelineConfig, "configs/defualt.yaml")
    (tmp_path / "p.yaml").write_text("world: world/tiyn.yaml\ndata_dir: d\noutput_dir: o\n")
    with pytest.raises(ConfigError, match=r"world: section file 'world/tiyn\.yaml' not found .*'world/tiny\.yaml'"):
        load_config(PipelineConfig, "p.yaml")


# --- Every field with its help (issue 15 item 5). ---


def test_fields_lists_every_field_with_type_default_help_and_trainer_name():
    import dataclasses

    from mmart.config_cli import describe_fields
    from mmart.train.config import SFTStageConfig

    text = describe_fields("sft")
    for f in dataclasses.fields(SFTStageConfig):
        assert f"  sft.{f.name}: " in text
    lr_line = next(line for line in text.splitlines() if line.startswith("  sft.lr:"))
    assert lr_line == "  sft.lr: float = 0.0002  [TrainingArguments: learning_rate]"
    assert "LoRA learning rate." in text
    assert "sft.propensity_clip: float or null = 10.0" in text
    everything = describe_fields("")
    for section in ("[world]", "[vision]", "[vision.adapt]", "[cache]", "[prompt]", "[model]", "[sft]", "[dpo]", "[eval]"):
        assert section in everything
    assert "  data_dir: str" in everything and "  world.num_titles: int = 400" in everything
    with pytest.raises(UserError, match=r"no section 'sfx' .*did you mean 'sft'"):
        describe_fields("sfx")


def test_fields_with_a_config_shows_its_values():
    from mmart.config_cli import describe_fields

    text = describe_fields("model", load_config(PipelineConfig, CONFIG_ROOT / "smoke.yaml"))
    assert "  model.lora_r: int = 16  (this config: 4)" in text
