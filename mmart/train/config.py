"""Configs of the model and its post-training stages (SFT, then DPO)."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from mmart.config_checks import FieldError, at_least, not_empty, positive, seeds, within
from mmart.errors import ConfigError


REPORT_TO_HELP = ("Where training metrics go besides trainer_state.json and curves.png, as TrainingArguments.report_to: "
                  "none, tensorboard, trackio, wandb, ... (comma-separated; install the tracker, e.g. "
                  "pip install -e '.[tensorboard]').")
EVAL_STEPS_HELP = "Evaluate every this many steps (< 1: this share of the run's steps); also at the end."
BF16_HELP = ("bf16 mixed precision (autocast; master weights in model.dtype). auto = on where bf16 is native: a GPU "
             "that supports it, or a CPU with AVX-512-bf16 or AMX (faster steps there; a CPU without them emulates "
             "bf16, slower than fp32: keep auto or false there); true / false force it.")
Bf16 = Union[bool, Literal["auto"], None]  # None: read as auto (pipeline.yaml files saved before "auto" existed)
PACK_HELP = ("Decisions per packed row: one member prefix (system text, history, summary) read once, then up to this "
             "many title blocks that share it, each attending to the prefix and itself only. 1 = one prompt per "
             "decision. Needs an attention that takes a custom mask (sdpa or eager, not flash_attention_2).")


@dataclass
class ModelConfig:
    base_model: str = field(default="default", metadata={
        "help": "'default' = SmolLM2-135M-Instruct converted offline from its PyPI wheel; or any HF id / local folder."})
    projector: Literal["linear", "mlp2x_gelu"] = field(default="mlp2x_gelu", metadata={"help": "Artwork projector kind."})
    projector_tokens: int = field(default=1, metadata={
        "help": "Prompt slots each cached artwork vector fills (the projector emits this many vectors per input). "
                "With projector_init tags, slot e starts at the words of the e-th tag (theme, shot, tone, title), "
                "so a small LLM reads an artwork like its tag words; each slot costs one prompt token."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={
        "help": "Weights dtype; bfloat16 on a GPU halves memory (CPU: keep float32)."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager, or flash_attention_2 when installed."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Only for a base model that needs its own code."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank; higher = more capacity and memory."})
    lora_alpha: int = 32
    lora_dropout: float = field(default=0.0, metadata={
        "help": "LoRA dropout. 0 keeps resume bit-exact: with dropout, transformers' resume replays a different "
                "dropout mask (LoRA weights then differ slightly from an uninterrupted run's)."})
    lora_target: str = field(default="all-linear", metadata={"help": "PEFT target_modules."})
    seed: int = field(default=0, metadata={"help": "Seeds the projector init (so a resumed run rebuilds the same base)."})
    projector_init: Literal["random", "tags", "caption"] = field(default="tags", metadata={
        "help": "Stage 0: fit the projector so each artwork lands near the LLM embedding of its tags (or caption); "
                "with projector_tokens E > 1 the words are split into E consecutive groups, one per slot."})
    projector_init_steps: int = field(default=300, metadata={"help": "Full-batch Adam steps of that fit (seconds)."})

    def __post_init__(self) -> None:
        not_empty(self, "base_model", "lora_target")
        at_least(self, 1, "projector_tokens", "lora_r", "lora_alpha")
        within(self, "lora_dropout", 0, 1, hi_open=True)
        at_least(self, 0, "projector_init_steps")
        seeds(self, "seed")


@dataclass
class SFTStageConfig:
    examples: Literal["played", "pairs"] = field(default="played", metadata={
        "help": "Which logged decisions teach: played = one per played impression (the answer is the played "
                "artwork); pairs = every logged member-title pair, played or not (the teacher's distribution is "
                "defined on all of them; the played label adds to the loss where there is one)."})
    max_examples: int = field(default=0, metadata={
        "help": "Train on at most this many decisions (0 = all), drawn member by member so packed rows stay full."})
    max_examples_fp32: int = field(default=0, metadata={
        "help": "max_examples where this stage trains in fp32 on a CPU (bf16 off: auto on a CPU without "
                "avx512_bf16 or AMX, or bf16: false), which is slower per step; 0 = max_examples. Set it lower than "
                "max_examples to keep the job's time on such a CPU, at the cost of fewer decisions."})
    pack_titles: int = field(default=8, metadata={"help": PACK_HELP})
    unlogged_titles: int = field(default=0, metadata={
        "help": "Per sampled member prefix, add this many catalog titles the member was never shown, labelled by "
                "the teacher alone (needs sft.teacher); packed behind the prefix, each costs only its title block. "
                "Counted on top of max_examples."})
    epochs: float = 1.0
    batch_size: int = field(default=8, metadata={"help": "Rows per device per step (a row: one member's prefix and "
                                                           "up to pack_titles decisions)."})
    grad_accum: int = 1
    lr: float = field(default=2e-4, metadata={"help": "LoRA learning rate."})
    projector_lr: float = field(default=1e-3, metadata={
        "help": "The projector's own rate (it is new, so faster than LoRA). 0 = frozen as stage 0 left it: the "
                "default config's choice, since training it moves word-aligned slots off their words."})
    propensity_clip: Optional[float] = field(default=10.0, metadata={
        "help": "Weight each played label's loss by min(1/propensity, clip), scaled to mean 1 (importance weighting "
                "against the serving policy's bias: what members play, not what it liked to show); null = unweighted."})
    teacher: Literal["none", "reward_model", "taste"] = field(default="none", metadata={
        "help": "A model of P(play) fit on the train logs (mmart.eval.teacher) whose choice distribution over each "
                "decision's candidates SFT also learns: a denoised version of the played label, defined on every "
                "decision, played or not. taste = each member's taste in looks (tag families) from the history's "
                "own choices and genres; reward_model = four-feature logistic regression. none = played label only."})
    teacher_weight: float = field(default=0.5, metadata={
        "help": "Loss = (1 - w) * CE(played) + w * CE(teacher distribution)."})
    teacher_temperature: float = field(default=1.0, metadata={
        "help": "Teacher distribution = softmax(logit(q) / T). Choosing is ranking: T < 1 sharpens the teacher's "
                "ranking into a stronger signal than its nearly flat play probabilities."})
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every N steps (resume point)."})
    logging_steps: float = field(default=0.05, metadata={
        "help": "Log the training metrics every this many steps (< 1: this share of the run's steps, so a short run "
                "still draws a curve); the first step is always logged."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory (GPU, big models)."})
    bf16: Bf16 = field(default="auto", metadata={"help": BF16_HELP})
    report_to: str = field(default="none", metadata={"help": REPORT_TO_HELP})
    eval_examples: int = field(default=0, metadata={
        "help": "Evaluate on this many val decisions (drawn member by member) during training: loss, choice accuracy "
                "and, on the demo world, the true value of the val pairs (eval_true_value). 0 = no evaluation."})
    eval_steps: float = field(default=0.34, metadata={"help": EVAL_STEPS_HELP})
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "Any other trl.SFTConfig field."})

    def __post_init__(self) -> None:
        _check_stage(self)
        # Weights are min(1/propensity, clip) with propensities in (0, 1]: a clip below 1 makes every
        # weight equal, a uniform draw in disguise (a negative one was silently accepted as such).
        if self.propensity_clip is not None and not self.propensity_clip >= 1:
            raise FieldError("propensity_clip", self.propensity_clip, ">= 1 (or null for a uniform draw)")
        within(self, "teacher_weight", 0, 1)
        positive(self, "teacher_temperature")
        at_least(self, 0, "weight_decay", "unlogged_titles")
        if self.unlogged_titles and self.teacher == "none":
            raise FieldError("unlogged_titles", self.unlogged_titles, "0 without a teacher (nothing labels an unlogged "
                             "title): set sft.teacher: taste, or unlogged_titles: 0")


@dataclass
class DPOStageConfig:
    method: Literal["fast", "trl"] = field(default="fast", metadata={
        "help": "fast = one shared forward scores every candidate (letter or per-candidate score); trl = TRL's DPOTrainer (all loss variants)."})
    pairs: Literal["logged", "teacher"] = field(default="logged", metadata={
        "help": "Where preference pairs come from. logged = the played artwork over the shown-and-not-played ones "
                "(else over the others), one noisy play each; teacher = on every logged decision of the drawn "
                "members, the teacher's top candidate over each candidate it ranks at least teacher_margin lower "
                "(logit of P(play)): denoised pairs on decisions SFT did not see."})
    teacher: Literal["reward_model", "taste"] = field(default="taste", metadata={
        "help": "The teacher that ranks candidates for pairs: teacher (mmart.eval.teacher)."})
    teacher_margin: float = field(default=0.5, metadata={
        "help": "pairs: teacher: a candidate is rejected when its logit P(play) is at least this far below the top's "
                "(0: any candidate strictly below it)."})
    negatives: Literal["all", "hardest", "misordered"] = field(default="all", metadata={
        "help": "fast path: which of a decision's rejected candidates its chosen one is paired against, judged by the "
                "reference (the SFT model). all = every one; hardest = only the one the reference scores highest; "
                "misordered = only those the reference scores at or above the chosen one (a decision the reference "
                "already orders teaches nothing), so DPO spends its steps where the argmax is wrong."})
    beta: float = 0.1
    loss_type: str = field(default="sigmoid", metadata={"help": "fast: sigmoid or robust; trl: any TRL loss_type."})
    label_smoothing: float = 0.0
    max_examples: int = field(default=0, metadata={
        "help": "Train on at most this many decisions (0 = all), drawn member by member; each gives its chosen "
                "candidate and every rejected one it is paired against."})
    max_examples_fp32: int = field(default=0, metadata={
        "help": "max_examples where this stage trains in fp32 on a CPU (bf16 off: auto on a CPU without "
                "avx512_bf16 or AMX, or bf16: false), which is slower per step; 0 = max_examples. Set it lower than "
                "max_examples to keep the job's time on such a CPU, at the cost of fewer decisions."})
    pack_titles: int = field(default=8, metadata={"help": PACK_HELP + " fast path only."})
    epochs: float = 1.0
    batch_size: int = field(default=8, metadata={"help": "Rows per device per step."})
    grad_accum: int = 1
    lr: float = 5e-5
    projector_lr: float = field(default=2e-4, metadata={"help": "0 = projector frozen (as SFT left it)."})
    warmup_ratio: float = 0.05
    save_steps: int = 50
    logging_steps: float = field(default=0.05, metadata={
        "help": "Log the training metrics every this many steps (< 1: this share of the run's steps, so a short run "
                "still draws a curve); the first step is always logged."})
    gradient_checkpointing: bool = False
    bf16: Bf16 = field(default="auto", metadata={"help": BF16_HELP})
    report_to: str = field(default="none", metadata={"help": REPORT_TO_HELP})
    eval_examples: int = field(default=0, metadata={
        "help": "Evaluate on this many val decisions (drawn member by member) during training: the DPO loss of logged val preferences, choice accuracy "
                "and, on the demo world, the true value of the val pairs (eval_true_value). 0 = no evaluation."})
    eval_steps: float = field(default=0.34, metadata={"help": EVAL_STEPS_HELP})
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "Any other TrainingArguments / DPOConfig field."})

    def __post_init__(self) -> None:
        _check_stage(self)
        positive(self, "beta")
        at_least(self, 0, "teacher_margin")
        if self.method == "trl" and self.negatives != "all":
            raise FieldError("negatives", self.negatives, "all with dpo.method: trl (TRL's trainer sees one pair at a "
                             "time, not the reference's scores of every candidate): set dpo.method: fast")
        not_empty(self, "loss_type")
        within(self, "label_smoothing", 0, 0.5, hi_open=True)  # robust DPO divides by 1 - 2 * smoothing


@dataclass
class EvalConfig:
    split: str = "test"
    batch_size: int = field(default=16, metadata={"help": "Rows per forward when scoring."})
    pack_titles: int = field(default=8, metadata={"help": PACK_HELP})
    max_pairs: int = field(default=0, metadata={"help": "Score at most this many test pairs (0 = all); a seeded sample."})
    pairs: Literal["all", "uniform"] = field(default="all", metadata={
        "help": "Which test pairs to sample: all, or only those logged uniformly at random (their hit rate is "
                "unbiased, and a capped sample then holds more uniform impressions; true value and IPS stay "
                "unbiased, since the slice is a random subset of the test pairs)."})
    n_boot: int = field(default=1000, metadata={"help": "Bootstrap resamples for every interval."})
    candidate_orders: int = field(default=1, metadata={
        "help": "Score each pair under this many candidate orders (prompt.shuffle_seed, +1, ...) and average each "
                "candidate's probability: a candidate's score also reads the candidates before it, so one order is "
                "one noisy view (a small model changes some of its choices with the order). The extra orders are "
                "more title blocks behind the same member prefix, so scoring takes longer, less than in proportion. "
                "Use it to make a score independent of one order's luck."})
    bf16: Bf16 = field(default="auto", metadata={
        "help": "Score under bf16 autocast: " + BF16_HELP + " Probabilities move a little under bf16, so compare "
                "models scored the same way."})
    seed: int = 0
    untrained: bool = field(default=False, metadata={
        "help": "scripts/train.sh also scores the untrained chooser (stage 0 only; the report's zero-shot row): "
                "a third predict, beside the trained models' two."})

    def __post_init__(self) -> None:
        from mmart.config_checks import one_of
        from mmart.data.contract import SPLITS

        one_of(self, "split", SPLITS)
        at_least(self, 1, "batch_size", "n_boot", "candidate_orders")
        at_least(self, 0, "max_pairs")
        seeds(self, "seed")


def _check_stage(cfg: "SFTStageConfig | DPOStageConfig") -> None:
    """What SFT and DPO share: sizes, rates and a warmup that transformers reads as a ratio."""
    at_least(cfg, 0, "max_examples", "max_examples_fp32")
    positive(cfg, "epochs")
    at_least(cfg, 1, "batch_size", "grad_accum", "save_steps")
    positive(cfg, "logging_steps")
    at_least(cfg, 0, "lr", "projector_lr")
    if cfg.lr == 0 and cfg.projector_lr == 0:
        raise FieldError("lr", cfg.lr, "> 0 when projector_lr is 0 (else nothing trains)")
    # Passed as TrainingArguments.warmup_steps, which reads a value below 1 as a ratio and 1+ as steps.
    within(cfg, "warmup_ratio", 0, 1, hi_open=True)
    at_least(cfg, 0, "eval_examples")
    positive(cfg, "eval_steps")
    seeds(cfg, "seed")
    bad = [k for k in cfg.extra if not isinstance(k, str)]
    if bad:
        raise FieldError("extra", cfg.extra, f"a mapping of field names (strings), not {bad[0]!r}")


# --- Trainer names: what TrainingArguments / TRL call the stage fields. ---

# TrainingArguments (or TRL config) field -> the SFT/DPO stage field mmart passes to it. Shown by
# `mmart config --fields sft`, suggested when a config uses the trainer's name (sft.learning_rate),
# and the basis of ``trainer_settings`` (what ``extra`` may not set again).
TRAINER_NAMES: dict[str, str] = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "warmup_steps": "warmup_ratio",  # transformers 5 reads warmup_steps < 1 as a ratio
    "warmup_ratio": "warmup_ratio",  # transformers 4's name
    "seed": "seed",
    "data_seed": "seed",
    "save_steps": "save_steps",
    "logging_steps": "logging_steps",
    "weight_decay": "weight_decay",
    "activation_checkpointing": "gradient_checkpointing",  # transformers 5's name
    "gradient_checkpointing": "gradient_checkpointing",  # its deprecated alias
    "bf16": "bf16",
    "report_to": "report_to",
    "eval_steps": "eval_steps",
    "beta": "beta",
    "loss_type": "loss_type",
    "label_smoothing": "label_smoothing",
}
# Trainer names that belong to TRL's DPOConfig rather than TrainingArguments (for display).
DPO_TRAINER_NAMES = frozenset({"beta", "loss_type", "label_smoothing"})


def trainer_name(stage_field: str) -> str | None:
    """The TrainingArguments/DPOConfig name of a stage field (``lr`` -> ``learning_rate``), if it has one."""
    return next((theirs for theirs, ours in TRAINER_NAMES.items() if ours == stage_field), None)


def trainer_settings(section: str, trainer_kwargs: Iterable[str]) -> dict[str, str]:
    """For ``check_extra``: each trainer field mmart passes itself, with what to set instead.

    ``section`` is ``"sft"`` or ``"dpo"``; ``trainer_kwargs`` the keyword names mmart passes to the
    trainer's config class (e.g. ``common_args(...).keys()`` plus the stage's own).
    """
    stage_cls = {"sft": SFTStageConfig, "dpo": DPOStageConfig}[section]
    own = {f.name for f in dataclasses.fields(stage_cls)}
    out = {}
    for k in trainer_kwargs:
        ours = TRAINER_NAMES.get(k)
        out[k] = f"use {section}.{ours} instead" if ours in own else f"remove it from {section}.extra (fixed by mmart)"
    return out


def check_extra(extra: dict, config_cls: type, mmart_sets: dict[str, str], where: str = "extra") -> None:
    """Refuse, with one line, an ``extra`` key the trainer's config class would choke on.

    ``extra`` (sft.extra / dpo.extra) passes fields of ``config_cls`` (SFTConfig, DPOConfig, a
    TrainingArguments subclass) that mmart does not set. ``mmart_sets`` maps each field mmart
    already sets to what to do instead, e.g. ``{"learning_rate": "use sft.lr instead"}``
    (``trainer_settings`` builds it); ``where``
    names the config key in the message (``"sft.extra"``). Raises ConfigError for a key that is
    not a field of ``config_cls`` (with the nearest field) or one mmart sets (naming the mmart key):
    passed through, they were a TypeError inside the trainer ("got multiple values for keyword").
    """
    fields = [f.name for f in dataclasses.fields(config_cls) if f.init]
    for key in extra:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys must be {config_cls.__name__} field names, got {key!r}")
        if key in mmart_sets:
            raise ConfigError(f"{where}.{key}: mmart sets {config_cls.__name__}.{key} itself; {mmart_sets[key]}")
        # An alias of a field mmart sets (gradient_checkpointing for activation_checkpointing) would
        # override it inside the trainer's config.
        alias = next((k for k in mmart_sets if key in TRAINER_NAMES and TRAINER_NAMES.get(k) == TRAINER_NAMES[key]), None)
        if alias:
            raise ConfigError(f"{where}.{key}: mmart sets {config_cls.__name__}.{alias} (the same setting) itself; "
                              f"{mmart_sets[alias]}")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = ""
            if close:
                hint = f"; did you mean {close[0]!r}?"
                if close[0] in mmart_sets:
                    hint += f" (mmart sets that one: {mmart_sets[close[0]]})"
            raise ConfigError(f"{where}.{key}: not a field of {config_cls.__name__}{hint}")
