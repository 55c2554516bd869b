"""Configs of the vision stage: which tower encodes artworks, how it is adapted, how the cache is built.

``VisionConfig`` names the tower the same way open_clip does (architecture name plus
pretrained tag, or a local checkpoint), so the real configuration (ViT-L-14 with a
LAION tag) and the embedded default (a tiny architecture the project registers, adapted
on the demo world) differ only in YAML. ``CacheConfig`` holds the knobs of
``mmart cache build`` that change speed or the stored tensor, never which tower runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from mmart.config_checks import FieldError, at_least, length, not_empty, one_of, positive, seeds

DEFAULT_MODEL = "mmart-tiny-vit"
DEFAULT_CHECKPOINT = "{output_dir}/vision/mmart-tiny-vit-adapted.safetensors"  # resolved by PipelineConfig.tower


@dataclass
class AdaptConfig:
    """Short contrastive training of the tower on the catalog's (artwork, tags + caption) pairs."""

    steps: int = field(default=500, metadata={"help": "Optimizer steps; time grows linearly (about 0.1 s each on 2 CPU cores)."})
    batch_size: int = field(default=64, metadata={"help": "Pairs per step; a batch holds each distinct text at most once, "
                                                           "since ClipLoss treats every other pair in a batch as a negative."})
    lr: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate (after a linear warmup, cosine decay)."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear warmup steps."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay on matrices (not on norms, biases, embeddings)."})
    seed: int = field(default=0, metadata={"help": "Seeds initialisation, batch order and augmentation: same seed, same weights."})
    text: Literal["caption+tags", "caption", "tags"] = field(
        default="caption+tags", metadata={"help": "What the text tower reads for each artwork."})

    def __post_init__(self) -> None:
        at_least(self, 1, "steps")
        at_least(self, 2, "batch_size")  # ClipLoss contrasts each pair with the others in its batch
        positive(self, "lr")
        at_least(self, 0, "warmup_steps", "weight_decay")
        seeds(self, "seed")


@dataclass
class VisionConfig:
    """Which open_clip tower encodes the artworks, and with what preprocessing."""

    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "open_clip architecture name (open_clip.list_models()); mmart-* names are registered from "
                "mmart/vision/model_configs/."})
    pretrained: Optional[str] = field(default=None, metadata={
        "help": "open_clip pretrained tag, e.g. laion2b_s32b_b82k (downloads unless already cached); "
                "exclusive with checkpoint."})
    checkpoint: Optional[str] = field(default=DEFAULT_CHECKPOINT, metadata={
        "help": "Local open_clip state dict (.safetensors) for the architecture; written by `mmart vision adapt`. "
                "{output_dir} stands for the pipeline's output_dir. null = pretrained tag or seeded random init."})
    init_seed: int = field(default=0, metadata={
        "help": "Seed of the random init when neither pretrained nor checkpoint is given (tests), so two "
                "loads give the same tower."})
    image_resize_mode: Optional[str] = field(default=None, metadata={
        "help": "open_clip resize mode override: shortest, longest or squash; null = the tag's/model's default."})
    image_interpolation: Optional[str] = field(default=None, metadata={
        "help": "open_clip interpolation override: bicubic or bilinear; null = default."})
    image_mean: Optional[list[float]] = field(default=None, metadata={"help": "Normalisation mean override (3 floats)."})
    image_std: Optional[list[float]] = field(default=None, metadata={"help": "Normalisation std override (3 floats)."})
    adapt: AdaptConfig = field(default_factory=AdaptConfig, metadata={"help": "`mmart vision adapt` settings."})

    def __post_init__(self) -> None:
        not_empty(self, "model")
        seeds(self, "init_seed")
        one_of(self, "image_resize_mode", ("shortest", "longest", "squash"))
        one_of(self, "image_interpolation", ("bicubic", "bilinear"))
        length(self, "image_mean", 3, "one per RGB channel")
        length(self, "image_std", 3, "one per RGB channel")
        if self.image_std is not None and min(self.image_std) <= 0:
            raise FieldError("image_std", self.image_std, "3 numbers > 0 (normalisation divides by them)")
        if self.pretrained and self.checkpoint:
            raise ValueError("set either pretrained (an open_clip tag) or checkpoint (a local file), not both; "
                             "set the other to null")


@dataclass
class CacheConfig:
    """How ``mmart cache build`` runs and what it stores (``[num_artworks, tokens_per_artwork, dim]``)."""

    dir: str = field(default="", metadata={"help": "Cache folder; empty = <output_dir>/cache."})
    tokens_per_artwork: int = field(default=1, metadata={
        "help": "1 = the pooled CLIP embedding; k*k = a k x k average-pooled grid of the last layer's patch "
                "tokens (e.g. 4 = 2x2). More tokens = more prompt positions per candidate."})
    normalize: bool = field(default=True, metadata={"help": "L2-normalise every stored vector, as CLIP does for its embedding."})
    batch_size: int = field(default=64, metadata={"help": "Images per forward; higher is faster until memory runs out."})
    num_workers: int = field(default=-1, metadata={
        "help": "DataLoader workers decoding and preprocessing images; 0 = in the main process; -1 = auto: "
                "one per core but one, at most 8 (1 on a 2-core machine)."})
    shard_size: int = field(default=1024, metadata={
        "help": "Artworks per safetensors shard: the unit of resume (a killed build loses at most one shard per process)."})
    dtype: Literal["float32", "float16", "bfloat16"] = field(default="float32", metadata={
        "help": "Stored dtype; float16 halves disk and device memory (use it for large catalogs on a GPU)."})
    device: str = field(default="auto", metadata={"help": "auto = the accelerate process's device (cuda if present, else cpu)."})
    gpu_normalize: bool = field(default=True, metadata={
        "help": "On a GPU, workers send uint8 pixels and open_clip's scaling + Normalize run on the device "
                "(4x fewer bytes through worker queues and host-to-device copies)."})
    cpu_threads: int = field(default=0, metadata={
        "help": "torch threads for encoding on a CPU; 0 = the cores left after the DataLoader workers (at least 1). "
                "Workers and threads competing for the same cores slow small forwards down many times over."})
    skip_bad: bool = field(default=False, metadata={
        "help": "Record unreadable images in the manifest and go on (later use of those ids fails clearly) "
                "instead of stopping the build with the list."})

    def __post_init__(self) -> None:
        t = self.tokens_per_artwork
        if t < 1 or round(t ** 0.5) ** 2 != t:
            raise ValueError(f"tokens_per_artwork must be 1 or a square (4 = 2x2, 9 = 3x3, ...), got {t}")
        at_least(self, 1, "batch_size", "shard_size")
        at_least(self, -1, "num_workers")
        at_least(self, 0, "cpu_threads")
