"""Configs of the model and its post-training stages (SFT, then DPO)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union


BF16_HELP = ("bf16 mixed precision (autocast; master weights in model.dtype). auto = on where bf16 is native: a GPU "
             "that supports it, or a CPU with AVX-512-bf16 or AMX (there ~1.35x faster SmolLM2 steps; a CPU without "
             "them runs bf16 ~3x SLOWER than fp32); true / false force it.")
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
                "dropout mask (LoRA weights then differ by ~2e-4 from an uninterrupted run)."})
    lora_target: str = field(default="all-linear", metadata={"help": "PEFT target_modules."})
    seed: int = field(default=0, metadata={"help": "Seeds the projector init (so a resumed run rebuilds the same base)."})
    projector_init: Literal["random", "tags", "caption"] = field(default="tags", metadata={
        "help": "Stage 0: fit the projector so each artwork lands near the LLM embedding of its tags (or caption); "
                "with projector_tokens E > 1 the words are split into E consecutive groups, one per slot."})
    projector_init_steps: int = field(default=300, metadata={"help": "Full-batch Adam steps of that fit (seconds)."})


@dataclass
class SFTStageConfig:
    examples: Literal["played", "pairs"] = field(default="played", metadata={
        "help": "Which logged decisions teach: played = one per played impression (the answer is the played "
                "artwork); pairs = every logged member-title pair, played or not (the teacher's distribution is "
                "defined on all of them; the played label adds to the loss where there is one)."})
    max_examples: int = field(default=0, metadata={
        "help": "Train on at most this many decisions (0 = all), drawn member by member so packed rows stay full."})
    pack_titles: int = field(default=8, metadata={"help": PACK_HELP})
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
    teacher: Literal["none", "reward_model"] = field(default="none", metadata={
        "help": "per_candidate only. reward_model: also fit a logistic regression on the train logs (mmart.eval."
                "reward_model) and train towards its choice distribution q_k / sum(q): a denoised version of the "
                "played label, far more signal per example than one noisy play."})
    teacher_weight: float = field(default=0.5, metadata={
        "help": "Loss = (1 - w) * CE(played) + w * CE(teacher distribution)."})
    teacher_temperature: float = field(default=1.0, metadata={
        "help": "Teacher distribution = softmax(logit(q) / T). Choosing is ranking: T < 1 sharpens the teacher's "
                "ranking into a stronger signal than its nearly flat play probabilities."})
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every N steps (resume point)."})
    logging_steps: int = 5
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory (GPU, big models)."})
    bf16: Bf16 = field(default="auto", metadata={"help": BF16_HELP})
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "Any other trl.SFTConfig field."})


@dataclass
class DPOStageConfig:
    method: Literal["fast", "trl"] = field(default="fast", metadata={
        "help": "fast = one shared forward scores every candidate letter; trl = TRL's DPOTrainer (all loss variants)."})
    beta: float = 0.1
    loss_type: str = field(default="sigmoid", metadata={"help": "fast: sigmoid or robust; trl: any TRL loss_type."})
    label_smoothing: float = 0.0
    max_examples: int = field(default=0, metadata={
        "help": "Train on at most this many preference examples (0 = all), drawn member by member."})
    pack_titles: int = field(default=8, metadata={"help": PACK_HELP + " fast path only."})
    epochs: float = 1.0
    batch_size: int = field(default=8, metadata={"help": "Rows per device per step."})
    grad_accum: int = 1
    lr: float = 5e-5
    projector_lr: float = field(default=2e-4, metadata={"help": "0 = projector frozen (as SFT left it)."})
    warmup_ratio: float = 0.05
    save_steps: int = 50
    logging_steps: int = 5
    gradient_checkpointing: bool = False
    bf16: Bf16 = field(default="auto", metadata={"help": BF16_HELP})
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "Any other TrainingArguments / DPOConfig field."})


@dataclass
class EvalConfig:
    split: str = "test"
    batch_size: int = field(default=16, metadata={"help": "Rows per forward when scoring."})
    pack_titles: int = field(default=8, metadata={"help": PACK_HELP})
    max_pairs: int = field(default=0, metadata={"help": "Score at most this many test pairs (0 = all); a seeded sample."})
    pairs: Literal["all", "uniform"] = field(default="all", metadata={
        "help": "Which test pairs to sample: all, or only those logged uniformly at random (their hit rate is "
                "unbiased, and a capped sample then holds ~3x the uniform impressions; true value and IPS stay "
                "unbiased, since the slice is a random subset of the test pairs)."})
    n_boot: int = field(default=1000, metadata={"help": "Bootstrap resamples for every interval."})
    bf16: Bf16 = field(default="auto", metadata={
        "help": "Score under bf16 autocast: " + BF16_HELP + " Probabilities move by ~1e-2 under bf16, so compare "
                "models scored the same way."})
    seed: int = 0
