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


def _trainer(*names: str, aliases: tuple[str, ...] = (), owner: str = "TrainingArguments") -> dict[str, Any]:
    """Field metadata naming what the trainer's config calls a stage field: ``names`` are passed the field's value
    (``StageConfig.trainer_args``), ``aliases`` are other names of the same setting (refused in ``extra``)."""
    return {"trainer": names, "trainer_aliases": aliases, "trainer_owner": owner}


@dataclass
class StageConfig:
    """What SFT and DPO share: the budget, the packing and the training loop, each loop field passed to the
    trainer under the name its metadata gives (``trainer_args``)."""

    max_examples: int = field(default=0, metadata={
        "help": "Train on at most this many decisions (0 = all), drawn member by member so packed rows stay full "
                "(DPO: each decision's chosen candidate against every rejected one it is paired with)."})
    max_examples_fp32: int = field(default=0, metadata={
        "help": "max_examples where this stage trains in fp32 on a CPU (bf16 off: auto on a CPU without "
                "avx512_bf16 or AMX, or bf16: false), which is slower per step; 0 = max_examples. Set it lower than "
                "max_examples to keep the job's time on such a CPU, at the cost of fewer decisions."
                " (evidence: docs/experiments.md)"})
    pack_titles: int = field(default=8, metadata={"help": PACK_HELP + " DPO: fast path only."})
    epochs: float = field(default=1.0, metadata=_trainer("num_train_epochs"))
    batch_size: int = field(default=8, metadata={
        "help": "Rows per device per step (a row: one member's prefix and up to pack_titles decisions).",
        **_trainer("per_device_train_batch_size")})
    grad_accum: int = field(default=1, metadata=_trainer("gradient_accumulation_steps"))
    lr: float = field(default=2e-4, metadata={"help": "LoRA learning rate.", **_trainer("learning_rate")})
    projector_lr: float = field(default=1e-3, metadata={
        "help": "The projector's own rate (it is new, so faster than LoRA). 0 = frozen as the stage before left it "
                "(stage 0 for SFT, SFT for DPO): the default config's choice, since training it moves word-aligned "
                "slots off their words."})
    # Passed as TrainingArguments.warmup_steps, which transformers 5 reads as a ratio below 1 (warmup_ratio: 4's name).
    warmup_ratio: float = field(default=0.05, metadata=_trainer("warmup_steps", aliases=("warmup_ratio",)))
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every N steps (resume point).",
                                                  **_trainer("save_steps")})
    logging_steps: float = field(default=0.05, metadata={
        "help": "Log the training metrics every this many steps (< 1: this share of the run's steps, so a short run "
                "still draws a curve); the first step is always logged.", **_trainer("logging_steps")})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Trade compute for memory (GPU, big models).",
        **_trainer("activation_checkpointing", aliases=("gradient_checkpointing",))})  # transformers 5's name, alias
    bf16: Bf16 = field(default="auto", metadata={"help": BF16_HELP, **_trainer("bf16")})
    report_to: str = field(default="none", metadata={"help": REPORT_TO_HELP, **_trainer("report_to")})
    eval_examples: int = field(default=0, metadata={
        "help": "Evaluate on this many val decisions (drawn member by member) during training: the stage's loss "
                "(DPO: on logged val preferences), choice accuracy and, on the demo world, the true value of the val "
                "pairs (eval_true_value). 0 = no evaluation."})
    eval_steps: float = field(default=0.34, metadata={"help": EVAL_STEPS_HELP, **_trainer("eval_steps")})
    seed: int = field(default=0, metadata=_trainer("seed", "data_seed"))
    extra: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Any other field of the stage's trainer config (SFT: trl.SFTConfig; DPO: TrainingArguments / "
                "trl.DPOConfig)."})

    def __post_init__(self) -> None:
        _check_stage(self)

    def trainer_args(self) -> dict[str, Any]:
        """The TrainingArguments fields this config sets, by the trainer's names (``learning_rate=lr``, ...).

        Only TrainingArguments' own fields; a trainer-specific one (DPOConfig's ``beta``) the stage passes itself,
        in the form its trainer takes."""
        return {name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("trainer_owner") == "TrainingArguments" for name in f.metadata["trainer"]}

    @classmethod
    def trainer_names(cls) -> dict[str, str]:
        """Trainer field name (and alias) -> the stage field it comes from (``learning_rate`` -> ``lr``)."""
        return {name: f.name for f in dataclasses.fields(cls)
                for name in (*f.metadata.get("trainer", ()), *f.metadata.get("trainer_aliases", ()))}


def _stage_field(name: str, default: Any) -> Any:
    """``StageConfig``'s field ``name`` (its help, its trainer name) with another stage's default."""
    return field(default=default, metadata=StageConfig.__dataclass_fields__[name].metadata)


@dataclass
class SFTStageConfig(StageConfig):
    examples: Literal["played", "pairs"] = field(default="played", metadata={
        "help": "Which logged decisions teach: played = one per played impression (the answer is the played "
                "artwork); pairs = every logged member-title pair, played or not (the teacher's distribution is "
                "defined on all of them; the played label adds to the loss where there is one)."})
    unlogged_titles: int = field(default=0, metadata={
        "help": "Per sampled member prefix, add this many catalog titles the member was never shown, labelled by "
                "the teacher alone (needs sft.teacher); packed behind the prefix, each costs only its title block. "
                "Counted on top of max_examples. (evidence: docs/experiments.md)"})
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
    weight_decay: float = field(default=0.0, metadata=_trainer("weight_decay"))
    reasoning: Literal["none", "before_answer", "auxiliary"] = field(default="none", metadata={
        "help": "Prediction with reasoning, on the rationales of `mmart rationales`. none = the choice loss only. "
                "before_answer (the paper's) = the model writes the rationale in its answer turn, then 'Answer:' and "
                "the letter: SFT trains the rationale's tokens (weighted by reasoning_weight) and the choice read "
                "after it; predict, DPO and the home-page API generate the model's own rationale first (greedy, at "
                "most reasoning_max_tokens), so choosing costs a generation. Needs prompt.answer: letter (the "
                "per_candidate readout reads each score right after its artwork: nothing can come before it). "
                "auxiliary (distilling step-by-step) = each trained decision also gets a rationale block behind the "
                "same member prefix in its packed row (its title block, 'Why:', the rationale), trained by next-token "
                "cross-entropy weighted by reasoning_weight; scoring never sees rationale blocks, so choosing costs "
                "what it costs with none (predict --explain writes one on request)."})
    reasoning_weight: float = field(default=0.5, metadata={
        "help": "loss = choice loss + w * rationale loss (per decision, the mean next-token cross-entropy over its "
                "rationale's tokens, averaged over the decisions with a rationale). 0 trains on the choice alone."})
    reasoning_max_tokens: int = field(default=128, metadata={
        "help": "The most tokens the trained model writes as its own rationale (before_answer: before every answer; "
                "auxiliary: with predict --explain and the home-page API's explain). Generation also stops at the "
                "end of the line. Keep it above the teacher's longest rationale (SFT warns when some are longer): "
                "a rationale cut short is answered without its conclusion."})

    def __post_init__(self) -> None:
        super().__post_init__()
        # Weights are min(1/propensity, clip) with propensities in (0, 1]: a clip below 1 makes every
        # weight equal, a uniform draw in disguise (a negative one was silently accepted as such).
        if self.propensity_clip is not None and not self.propensity_clip >= 1:
            raise FieldError("propensity_clip", self.propensity_clip, ">= 1 (or null for a uniform draw)")
        within(self, "teacher_weight", 0, 1)
        positive(self, "teacher_temperature")
        at_least(self, 0, "weight_decay", "unlogged_titles", "reasoning_weight")
        at_least(self, 1, "reasoning_max_tokens")
        if self.unlogged_titles and self.teacher == "none":
            raise FieldError("unlogged_titles", self.unlogged_titles, "0 without a teacher (nothing labels an unlogged "
                             "title): set sft.teacher: taste, or unlogged_titles: 0")


@dataclass
class DPOStageConfig(StageConfig):
    lr: float = _stage_field("lr", 5e-5)
    projector_lr: float = _stage_field("projector_lr", 2e-4)
    method: Literal["fast", "trl"] = field(default="fast", metadata={
        "help": "fast = one shared forward scores every candidate (letter or per-candidate score); trl = TRL's "
                "DPOTrainer (all loss variants)."})
    pairs: Literal["logged", "teacher"] = field(default="logged", metadata={
        "help": "Where preference pairs come from. logged = the played artwork over the shown-and-not-played ones "
                "(else over the others), one noisy play each; teacher = on every logged decision of the drawn "
                "members, the teacher's top candidate over each candidate it ranks at least teacher_margin lower "
                "(logit of P(play)): denoised pairs on decisions SFT did not see."})
    teacher: Literal["reward_model", "taste"] = field(default="taste", metadata={
        "help": "The teacher that ranks candidates for pairs: teacher (mmart.eval.teacher)."})
    teacher_margin: float = field(default=0.5, metadata={
        "help": "pairs: teacher: a candidate is rejected when its logit P(play) is at least this far below the top's "
                "(0: any candidate strictly below it). (evidence: docs/experiments.md)"})
    negatives: Literal["all", "hardest", "misordered"] = field(default="all", metadata={
        "help": "fast path: which of a decision's rejected candidates its chosen one is paired against, judged by the "
                "reference (the SFT model). all = every one; hardest = only the one the reference scores highest; "
                "misordered = only those the reference scores at or above the chosen one (a decision the reference "
                "already orders teaches nothing), so DPO spends its steps where the argmax is wrong."
                " (evidence: docs/experiments.md)"})
    beta: float = field(default=0.1, metadata=_trainer("beta", owner="DPOConfig"))
    loss_type: str = field(default="sigmoid", metadata={"help": "fast: sigmoid or robust; trl: any TRL loss_type.",
                                                        **_trainer("loss_type", owner="DPOConfig")})
    label_smoothing: float = field(default=0.0, metadata=_trainer("label_smoothing", owner="DPOConfig"))

    def __post_init__(self) -> None:
        super().__post_init__()
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
                "Use it to make a score independent of one order's luck. (evidence: docs/experiments.md)"})
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


def _check_stage(cfg: StageConfig) -> None:
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


# --- Trainer names: what TrainingArguments / TRL call the stage fields (from the fields' metadata). ---

# TrainingArguments (or TRL config) field -> the SFT/DPO stage field mmart passes to it. Shown by
# `mmart config --fields sft`, suggested when a config uses the trainer's name (sft.learning_rate),
# and the basis of ``trainer_settings`` (what ``extra`` may not set again).
TRAINER_NAMES: dict[str, str] = {**SFTStageConfig.trainer_names(), **DPOStageConfig.trainer_names()}
# Trainer names that belong to TRL's DPOConfig rather than TrainingArguments (for display).
DPO_TRAINER_NAMES = frozenset(name for f in dataclasses.fields(DPOStageConfig)
                              if f.metadata.get("trainer_owner") == "DPOConfig" for name in f.metadata["trainer"])


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
