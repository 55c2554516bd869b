"""A rationales table is kept only while its record matches: another teacher or template writes it again."""

from __future__ import annotations

from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from mmart.artefacts import made_from, read_record
from mmart.config import ConfigError, PipelineConfig, apply_overrides
from mmart.rationale.stage import run_rationales


def test_the_same_inputs_keep_the_table_and_settings_that_shape_nothing_too(rcfg, tmp_path, capsys):
    table = run_rationales(rcfg, "taste", tmp_path / "r")
    stamp = table.stat().st_mtime_ns
    rows = pq.read_table(table).to_pylist()
    assert len(rows) == 24 and all(r["rationale"].endswith(f"So {r['target_letter']}.") for r in rows)
    # SFT's own decisions, in its order, with its candidate order
    from mmart.data.contract import load_contract
    from mmart.examples import ExampleBuilder
    from mmart.train.sft import sft_examples

    examples = sft_examples(rcfg, ExampleBuilder(load_contract(rcfg.data_dir), rcfg.prompt))
    assert [(r["example_id"], r["candidates"]) for r in rows] == [(e.example_id, e.candidates) for e in examples]
    assert {r["target_source"] for r in rows} == {"teacher:taste"}
    # SFT's learning rate and the llm teacher's settings do not change which decisions or what taste says
    other = replace(rcfg, sft=replace(rcfg.sft, lr=0.5), rationale=replace(rcfg.rationale, template="{target}?"))
    capsys.readouterr()
    assert run_rationales(other, "taste", tmp_path / "r") == table
    assert "up to date" in capsys.readouterr().out
    assert table.stat().st_mtime_ns == stamp


def test_another_teacher_or_template_writes_the_table_again(rcfg, tmp_path, capsys, one_thread):
    out = tmp_path / "r"
    run_rationales(rcfg, "taste", out)
    table = run_rationales(rcfg, "llm", out)
    assert "config.teacher: taste -> llm" in capsys.readouterr().out
    assert {r["teacher"] for r in pq.read_table(table).to_pylist()} == {"llm"}
    assert read_record(table)["config"]["llm"]["template"] == rcfg.rationale.template

    written: list[int] = []
    changed = replace(rcfg, rationale=replace(rcfg.rationale, template="Why " + rcfg.rationale.template))
    run_rationales(changed, "llm", out, on_shard=written.append)
    assert "config.llm.template" in capsys.readouterr().out
    assert written == [0, 1, 2, 3, 4]  # no shard of the old template is reused
    assert read_record(table)["config"]["llm"]["template"] == changed.rationale.template

    run_rationales(changed, "llm", out, on_shard=written.append)
    assert written == [0, 1, 2, 3, 4] and "up to date" in capsys.readouterr().out


def test_the_taste_teacher_refuses_to_explain_another_teachers_targets(rcfg, tmp_path):
    from mmart.errors import UserError

    cfg = replace(rcfg, sft=replace(rcfg.sft, teacher="reward_model"))
    with pytest.raises(UserError, match="sft.teacher is reward_model"):
        run_rationales(cfg, "taste", tmp_path / "r")


def test_the_rationale_section_leaves_the_other_stages_records_as_they_were():
    base = PipelineConfig()
    changed = apply_overrides(base, ["rationale.teacher=llm", "rationale.template=Why {target}?",
                                     "rationale.max_new_tokens=7"])
    for stage in ("init", "sft", "dpo"):
        assert made_from(changed, stage) == made_from(base, stage)


def test_a_template_with_an_unknown_field_is_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"rationale.template must be .*not \{member\}"):
        apply_overrides(PipelineConfig(), ["rationale.template=Why {target} for {member}?"])


def test_status_lists_the_table_only_for_an_sft_that_reads_it_and_says_when_it_must_run(rcfg, tmp_path, capsys):
    """`mmart status`: missing, then up to date once written, then must run when the teacher's settings change."""
    import yaml

    from mmart.cli import main
    from mmart.config import to_dict
    from mmart.rationale.record import rationale_table
    from mmart.status import stage_status, stages

    assert "rationales" not in stages(rcfg)  # sft.reasoning: none reads no table
    cfg = apply_overrides(rcfg, ["sft.reasoning=auxiliary"])
    assert stages(cfg) == ["init", "rationales", "sft", "dpo", "predict", "eval"]
    table = str(rationale_table(cfg))
    assert stage_status(cfg, "rationales") == {table: ["missing"]}

    run_rationales(cfg)  # where train.sh writes it, with rationale.teacher (taste)
    assert stage_status(cfg, "rationales") == {table: []}
    fewer = apply_overrides(cfg, ["rationale.evidence=1"])
    assert stage_status(fewer, "rationales") == {table: ["config.taste.evidence: 2 -> 1"]}
    (why,) = stage_status(apply_overrides(cfg, ["rationale.teacher=llm"]), "rationales").values()
    assert "config.teacher: taste -> llm" in why

    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    capsys.readouterr()
    assert main(["status", "--config", str(tmp_path / "pipeline.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines][:3] == ["init", "rationales", "sft"]
    assert lines[1] == f"rationales up to date: {table}"
    config = ["--config", str(tmp_path / "pipeline.yaml"), "--stage", "rationales", "-q"]
    assert main(["status", *config]) == 0
    assert main(["status", *config, "--set", "rationale.evidence=1"]) == 1
