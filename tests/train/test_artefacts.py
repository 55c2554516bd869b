"""Model folders that open anywhere: copied elsewhere they score the same, DPO's stands alone, plain PEFT loads
the LLM part, nothing names the training machine's paths, and the card says what the model is and how it did."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _runs import with_out  # noqa: E402 - tests/train/_runs.py


@pytest.fixture(scope="module")
def run(cfg, tmp_path_factory):
    """SFT, DPO (keeping a copy of its adapter before stacking), predict both, eval: once for the module."""
    from mmart.eval.report import evaluate
    from mmart.model import checkpoint
    from mmart.predict import predict
    from mmart.train.dpo import run_dpo
    from mmart.train.sft import run_sft

    root = tmp_path_factory.mktemp("artefacts")
    c = with_out(cfg, root / "run")
    unstacked = root / "dpo-unstacked"
    stack = checkpoint.stack_adapter

    def keep_a_copy(first, folder):
        shutil.copytree(folder, unstacked)  # the DPO adapter as trained, on the merged SFT model
        stack(first, folder)

    mp = pytest.MonkeyPatch()
    mp.setattr(checkpoint, "stack_adapter", keep_a_copy)
    try:
        sft, dpo = run_sft(c), run_dpo(c)
    finally:
        mp.undo()
    preds = {name: root / "run" / "preds" / f"{name}.parquet" for name in ("sft", "dpo")}
    for name, folder in (("sft", sft), ("dpo", dpo)):
        predict(folder, c.data_dir, "test", preds[name], max_pairs=c.eval.max_pairs, seed=c.eval.seed,
                slice_=c.eval.pairs, progress=False)
    report = evaluate(c.data_dir, preds, root / "run" / "eval", n_boot=50)
    return SimpleNamespace(cfg=c, root=root, sft=sft, dpo=dpo, unstacked=unstacked, preds=preds, report=report)


def _probs(model_dir: Path, c) -> np.ndarray:
    """Every candidate's probability over the test pairs, fp32 (no bf16 autocast: comparable to 1e-6)."""
    from mmart.predict import predict

    frame = predict(model_dir, c.data_dir, "test", None, cfg=replace(c, eval=replace(c.eval, bf16=False)),
                    max_pairs=12, progress=False)
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in frame.probs])


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_copied_model_folders_score_identically_from_another_directory(run, tmp_path, monkeypatch):
    before = {name: _probs(getattr(run, name), run.cfg) for name in ("sft", "dpo")}
    copies = {name: Path(shutil.copytree(getattr(run, name), tmp_path / "elsewhere" / name)) for name in before}
    away = run.root / "moved-away"
    (run.root / "run").rename(away)  # nothing of the run folder (sft/merged, init/) is left to lean on
    try:
        monkeypatch.chdir(tmp_path / "elsewhere")
        for name, folder in copies.items():
            np.testing.assert_allclose(_probs(folder, run.cfg), before[name], rtol=0, atol=1e-6, err_msg=name)
    finally:
        away.rename(run.root / "run")


def test_stacked_dpo_folder_scores_as_the_merged_sft_model_with_the_dpo_adapter(run, tmp_path):
    from mmart.model.checkpoint import CHOOSER_FILE, read_spec

    # The old way: the DPO adapter as trained, on the merged SFT model it was trained on.
    old = Path(shutil.copytree(run.unstacked, tmp_path / "old"))
    spec = json.loads((old / CHOOSER_FILE).read_text())
    spec["base_model"] = str(run.sft.parent / "merged")
    (old / CHOOSER_FILE).write_text(json.dumps(spec))
    shutil.copy(run.dpo / "pipeline.yaml", old)

    assert read_spec(run.dpo).base_model == read_spec(run.sft).base_model == "tiny:llama"
    ranks = [json.loads((f / "adapter_config.json").read_text())["r"] for f in (run.sft, run.unstacked, run.dpo)]
    assert ranks[2] == ranks[0] + ranks[1]
    np.testing.assert_allclose(_probs(run.dpo, run.cfg), _probs(old, run.cfg), rtol=0, atol=1e-4)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_plain_peft_loads_the_llm_part_without_warnings(run, stage, caplog):
    """What the model card shows: the base, the slot token added with zero rows, then PeftModel.from_pretrained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmart.model.checkpoint import load_chooser, read_spec, resolve_base_model

    folder = getattr(run, stage)
    spec = read_spec(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    base = AutoModelForCausalLM.from_pretrained(resolve_base_model(spec.base_model))
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    slot = tokenizer.convert_tokens_to_ids(spec.slot_token)
    with torch.no_grad():
        base.get_input_embeddings().weight[slot] = 0
        base.get_output_embeddings().weight[slot] = 0
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = PeftModel.from_pretrained(base, str(folder)).eval()
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if any(k in m.lower() for k in ("missing", "unexpected", "not found", "target"))], said

    chooser, _, _ = load_chooser(folder)
    ids = torch.tensor([tokenizer("a quiet film about the sea", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(llm(input_ids=ids).logits, chooser(input_ids=ids).logits)
        with llm.disable_adapter():  # the adapter is really applied
            assert not torch.allclose(llm(input_ids=ids).logits, chooser(input_ids=ids).logits)


def test_model_folders_name_no_path_of_the_training_machine(run):
    for folder in (run.sft, run.dpo):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "tiny:llama"
        spec = json.loads((folder / "mmart_chooser.json").read_text())
        for text in [*_strings(config), *_strings(spec)]:
            assert not text.startswith(("/", "~", "./", "../")) and str(run.root) not in text, (folder, text)
        assert not any("projector" in t for t in config["target_modules"])  # LLM layers only: plain PEFT loads it


def test_model_cards_name_base_data_and_the_reports_headline(run):
    from mmart.eval.bootstrap import format_estimate
    from mmart.model.card import NOT_EVALUATED

    for name in ("sft", "dpo"):
        card = (getattr(run, name) / "README.md").read_text()
        assert "[More Information Needed]" not in card and "fine-tuned version of" not in card
        assert "tiny:llama" in card
        data = json.loads((getattr(run, name) / "made_from.json").read_text())["inputs"]["data"]
        assert data in card
        d = run.report["differences"][f"{name} - production"]
        assert NOT_EVALUATED not in card
        assert f"Lift vs production: {format_estimate(d['lift'], pct=True)}" in card
        assert ("not significant" in card) == (d["verdict"] == "no evidence")
        assert run.report["dataset_fingerprint"] in card
    assert "stands alone" in (run.dpo / "README.md").read_text()


def test_a_rewritten_card_keeps_its_results_and_a_moved_prediction_stays_fresh(run):
    from mmart.artefacts import made_from, stale
    from mmart.model.card import current_results, write_model_card

    results = current_results(run.sft)
    assert results and any("Lift vs production" in line for line in results)
    write_model_card(run.sft)
    assert current_results(run.sft) == results
    # The predictions' record names the model folder (for the card) without making the predictions stale.
    assert json.loads(run.preds["dpo"].with_name("dpo.made_from.json").read_text())["model_dir"] == str(run.dpo)
    assert stale(run.preds["dpo"], made_from(run.cfg, "predict", run.dpo)) == []


def test_eval_leaves_the_card_of_a_model_changed_since_it_was_scored(run, tmp_path):
    from mmart.eval.report import evaluate

    copy = Path(shutil.copytree(run.dpo, tmp_path / "dpo"))
    preds = tmp_path / "dpo.parquet"
    shutil.copy(run.preds["dpo"], preds)
    record = json.loads(run.preds["dpo"].with_name("dpo.made_from.json").read_text())
    (tmp_path / "dpo.made_from.json").write_text(json.dumps({**record, "model_dir": str(copy)}))
    (copy / "README.md").unlink()
    with open(copy / "adapter_model.safetensors", "ab") as f:
        f.write(b" ")  # other weights now: the predictions no longer describe this folder
    evaluate(run.cfg.data_dir, {"dpo": preds}, tmp_path / "eval", n_boot=10)
    assert not (copy / "README.md").exists()  # not rewritten with numbers of other weights


def test_predict_prints_one_summary_line_naming_what_it_wrote(run, tmp_path, capfd):
    from mmart.cli import main

    out = tmp_path / "p.parquet"
    assert main(["predict", "--model", str(run.sft), "--data", str(run.cfg.data_dir), "--out", str(out),
                 "--max-pairs", "4"]) == 0
    lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith("[mmart predict]")]
    assert len(lines) == 1, lines
    assert "scored 4 test pairs (" in lines[0] and " rows " in lines[0] and lines[0].endswith(f"-> {out}")


def test_predict_on_an_exported_folder_asks_for_the_training_config(run, tmp_path, capfd):
    """An `mmart export` folder carries no pipeline.yaml: predict must not guess the prompt and cache settings."""
    from mmart.cli import main

    exported = tmp_path / "exported"
    assert main(["export", "--model", str(run.sft), "--out", str(exported)]) == 0
    assert not (exported / "pipeline.yaml").exists()
    capfd.readouterr()
    out = tmp_path / "p.parquet"
    assert main(["predict", "--model", str(exported), "--data", str(run.cfg.data_dir), "--out", str(out),
                 "--max-pairs", "4"]) == 1
    err = capfd.readouterr().err
    assert err.splitlines() == [f"mmart predict: error: {exported} has no pipeline.yaml (the prompt and cache settings "
                                "the model was trained with; `mmart export` folders do not carry one): pass --config "
                                "<the training config>"], err
    assert "Traceback" not in err and not out.exists()
    assert main(["predict", "--model", str(exported), "--data", str(run.cfg.data_dir), "--out", str(out),
                 "--max-pairs", "4", "--config", str(run.sft / "pipeline.yaml")]) == 0  # the fix it names works
    assert out.is_file()


def test_a_record_older_than_a_new_field_still_matches_while_the_field_keeps_its_old_behaviour():
    """Upgrading mmart retrains nothing a newly added field leaves unchanged (the record's format says which fields
    it predates), and only that; a record of the current format that lacks a field differs for real."""
    from mmart.artefacts import RECORD_FORMAT, differences

    old = {"stage": "dpo", "config": {"prompt": {"max_history": 6}, "dpo": {"lr": 1e-4}}}  # format 1: no "format"
    now = {"stage": "dpo", "config": {"prompt": {"max_history": 6, "history_genres": 0},
                                      "dpo": {"lr": 1e-4, "negatives": "all"}}}
    assert differences(old, now) == []
    now["config"]["dpo"]["negatives"] = "misordered"
    assert differences(old, now) == ["config.dpo.negatives: null -> misordered"]
    now["config"]["dpo"]["negatives"] = "all"
    now["config"]["prompt"]["unheard_of"] = 0  # a field not declared as added later still counts
    assert differences(old, now) == ["config.prompt.unheard_of: null -> 0"]
    del now["config"]["prompt"]["unheard_of"]
    current = {**old, "format": RECORD_FORMAT}  # written today without the field: not an old record
    assert differences(current, now) == ["config.dpo.negatives: null -> all", "config.prompt.history_genres: null -> 0"]


def test_every_record_is_written_with_the_current_format(tmp_path):
    from mmart.artefacts import RECORD_FORMAT, differences, read_record, write_record

    wanted = {"stage": "eval", "config": {"eval": {"max_pairs": 3}}}
    write_record(tmp_path / "eval", wanted)
    record = read_record(tmp_path / "eval")
    assert record["format"] == RECORD_FORMAT and differences(record, wanted) == []


def test_scoring_under_several_candidate_orders_averages_each_candidates_probability_over_them(run):
    """eval.candidate_orders=2 = the mean of the two one-order predictions (shuffle_seed and shuffle_seed + 1),
    candidate by candidate, whatever order each scored them in."""
    from mmart.predict import predict

    c = replace(run.cfg, eval=replace(run.cfg.eval, bf16=False))

    def scored(cfg, out=None):
        frame = predict(run.sft, cfg.data_dir, "test", out, cfg=cfg, max_pairs=6, seed=cfg.eval.seed, progress=False)
        return {(r.user_id, r.title_id): dict(zip(r.candidates, r.probs)) for r in frame.itertuples()}, frame

    first, frame = scored(c)
    second, _ = scored(replace(c, prompt=replace(c.prompt, shuffle_seed=c.prompt.shuffle_seed + 1)))
    both, both_frame = scored(replace(c, eval=replace(c.eval, candidate_orders=2)))
    assert any(list(first[k]) != list(second[k]) for k in first)  # the second order really is another order
    assert list(both_frame.candidates.map(list)) == list(frame.candidates.map(list))  # reported in the first order
    for key, probs in both.items():
        for a, p in probs.items():
            assert p == pytest.approx((first[key][a] + second[key][a]) / 2, abs=1e-5)
    assert any(abs(first[k][a] - second[k][a]) > 1e-4 for k in first for a in first[k])  # the average is not a copy


def test_several_candidate_orders_are_written_into_the_predictions_record(run, tmp_path):
    from mmart.artefacts import read_record
    from mmart.predict import predict

    c = replace(run.cfg, eval=replace(run.cfg.eval, bf16=False, candidate_orders=3))
    out = tmp_path / "p.parquet"
    predict(run.sft, c.data_dir, "test", out, cfg=c, max_pairs=2, seed=c.eval.seed, progress=False)
    assert read_record(out)["config"]["candidate_orders"] == 3
