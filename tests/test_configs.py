"""Every YAML in configs/ loads into its dataclass, says how to launch it, and bad keys are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmart.config import CONFIG_ROOT, ConfigError, PipelineConfig, apply_overrides, config_class_for, load_config
from mmart.data.world import WorldConfig

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
    with pytest.raises(ConfigError, match="unknown key 'num_title'"):
        apply_overrides(PipelineConfig(), ["world.num_title=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(PipelineConfig(), ["world.num_titles"])


def test_section_may_be_a_path_to_another_yaml(tmp_path):
    (tmp_path / "p.yaml").write_text("world: world/tiny.yaml\ndata_dir: data/tiny\n")
    cfg = load_config(PipelineConfig, tmp_path / "p.yaml")
    assert cfg.world.num_titles == yaml.safe_load((CONFIG_ROOT / "world" / "tiny.yaml").read_text())["num_titles"]


def test_inherit_deep_merges_over_the_parent(tmp_path):
    (tmp_path / "parent.yaml").write_text("output_dir: outputs/p\nprompt:\n  max_history: 3\n  names: false\n"
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
