"""``mmart plan``: will this config fit these GPUs? Parameters and memory per rank, before renting them.

The chooser is built exactly as ``mmart sft`` builds it (LLM, artwork projector, PEFT LoRA;
``mmart.model.checkpoint``), but on the meta device from the LLM's ``config.json`` alone, so
nothing is downloaded or allocated and an 8B plan takes seconds. Parameters are counted on
that model; memory per rank follows the formula in ``FORMULA`` (printed by ``mmart plan
--help``), with the sharding each accelerate config applies.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmart.config_checks import at_least, cli_number, positive
from mmart.prompt_length import LONGEST, MEMBERS, PromptLengths, measure_prompt_lengths

GIB = 1 << 30
DEFAULT_GPU_GIB = 80.0
DEFAULT_OVERHEAD_GIB = 2.0

FORMULA = f"""\
What is counted (per rank, bytes; n = ranks; "/n" only where the accelerate config shards the term):

  parameters   counted on the chooser built on the meta device as `mmart sft` builds it: the LLM
               (config.json: a local folder, the Hugging Face cache, or mmart's table of known models)
               with the slot token's row, the projector twice under PEFT (the frozen base copy the
               DPO reference uses and the trained copy; trained only when the stage's projector_lr
               is not 0), and LoRA on lora_target. The LLM is in model.dtype; LoRA and the
               projector in fp32 (PEFT keeps adapters in fp32).
  weights      = bytes of every parameter, /n under FSDP and ZeRO-3 (0 when offloaded), whole under
               single GPU, DDP and ZeRO-2.
  gathered     = FSDP: the root unit (embeddings, LM head, final norm, projector) + 2 decoder layers
               (the one computing and the one prefetched); ZeRO-3: the largest module + 2 decoder
               layers; 0 otherwise.
  gradients    = 4 x trainable parameters (fp32), /n under FSDP, ZeRO-2 and ZeRO-3; x2 under DDP
               (its all-reduce buckets hold a second copy).
  AdamW        = 8 x trainable parameters (two fp32 moments), /n under FSDP, ZeRO-2 and ZeRO-3
               (0 when DeepSpeed offloads the optimizer).
  activations  = b x s x e x (per-layer part + 4h), with
                 F = 9h + 2h_kv + 4i  elements per token per decoder layer kept for backward:
                     the inputs of every LoRA-wrapped linear (q/k/v, o, gate/up: 3h; down: i),
                     q, k, v and the attention output for sdpa (2h + 2h_kv), the gate, up and SiLU
                     outputs (3i), and the two RMSNorms' fp32 copies of their input (4h);
                 checkpointing off:  (layers + 1) x F   (every layer's, + the layer in backward)
                 checkpointing on:   layers x h + 2F    (each layer's input, + one layer recomputed
                                                         and its backward)
                 4h: the embeddings, the slot-filled inputs_embeds and the final norm's fp32 input.
                 b = per-rank batch (sequences), s = prompt tokens, e = activation bytes (2 under
                 bf16/fp16 weights or mixed precision, else 4), h = hidden, h_kv = key/value width,
                 i = MLP width. DPO method fast: b prompts; method trl: 2 sequences per pair.
  LM head      = b x r x V x (e + 8) x 2: logits at the r read positions (1 for letter answers, K for
               per_candidate) in fp32 for log-softmax, forward and backward (once for predict).
  cache        = artworks x tokens_per_artwork x cache width x cache dtype bytes (every rank).
  stage 0      = SFT only, before training: artworks x T x (D + 2H + 4EH) x 4 (fp32 full-batch fit
               of the projector); the SFT total counts max(stage 0, training terms).
  overhead     = --overhead-gib (CUDA context, cuBLAS/NCCL workspaces, allocator fragmentation).

  SFT     = weights + gathered + gradients + AdamW + max(activations + LM head, stage 0) + cache + overhead
  DPO     = the same with dpo.batch_size. The reference forward adds no weights (the same PEFT model
            with its adapter switched off) and its no-grad working set (one layer) stays under the
            backward working set already counted.
  predict = every parameter unsharded (`mmart predict` is one process holding the whole model)
            + b x s x e x (4h + 3i) + LM head (forward) + cache + overhead, b = eval.batch_size.
            scripts/train.sh runs the three predicts side by side: 3x on one GPU.

The prompt length s comes from --seq-len, else it is measured with the renderer itself: every
decision of {MEMBERS} members drawn at random and of the {LONGEST} with the longest histories (from data_dir when
it holds a dataset, else from a small world generated from the config's world section) is rendered
with the config's prompt section, as training and scoring render it (member prefix + title
block(s), unpacked), and counted with the model's own tokenizer when it is on this machine (else
with one that is, named in the output: nothing is downloaded). s is the longest of them, not the
mean: a batch is padded to its longest prompt, so the batch holding the longest sizes the peak.
Estimates only: measure on a lent GPU with scripts/bench_gpu.py."""


# --- the launch: which terms the accelerate config shards --------------------------------------


@dataclass(frozen=True)
class Launch:
    """What an accelerate config does to memory: how it shards, over how many ranks, at what precision."""

    config: str
    kind: str  # single, ddp, fsdp, zero2, zero3
    ranks: int
    mixed_precision: str  # no, bf16, fp16
    offload_params: bool = False
    offload_optimizer: bool = False

    @property
    def shards_weights(self) -> bool:
        return self.kind in ("fsdp", "zero3")

    @property
    def shards_states(self) -> bool:
        """Gradients and optimizer states."""
        return self.kind in ("fsdp", "zero2", "zero3")

    @property
    def label(self) -> str:
        return {"single": "one GPU", "ddp": "DDP", "fsdp": "FSDP", "zero2": "DeepSpeed ZeRO-2",
                "zero3": "DeepSpeed ZeRO-3"}[self.kind]


def _deepspeed_fields(path: Path, ds: dict) -> dict:
    """An accelerate config's DeepSpeed fields; from its ``deepspeed_config_file`` when it names one (relative to
    the working directory, as accelerate reads it, else beside the accelerate config)."""
    from mmart.errors import UserError

    file = ds.get("deepspeed_config_file")
    if not file:
        return ds
    found = Path(file) if Path(file).is_file() else path.parent / Path(file).name
    try:
        zero = json.loads(found.read_text()).get("zero_optimization") or {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read its deepspeed_config_file {file} ({e})") from e
    return {"zero_stage": zero.get("stage", 2),
            "offload_param_device": (zero.get("offload_param") or {}).get("device", "none"),
            "offload_optimizer_device": (zero.get("offload_optimizer") or {}).get("device", "none")}


def read_launch(path: str | Path, gpus: int | None = None) -> Launch:
    """The accelerate config at ``path`` (read by accelerate's own loader), run on ``gpus`` ranks."""
    from accelerate.commands.config.config_args import ClusterConfig

    from mmart.errors import UserError

    if not Path(path).is_file():
        raise UserError(f"accelerate config {path} not found; pass one of configs/accelerate/*.yaml")
    try:
        cfg = ClusterConfig.from_yaml_file(str(path))
    except Exception as e:  # accelerate raises ValueError/TypeError/KeyError for bad files
        raise UserError(f"{path}: not an accelerate config ({e})") from e
    dist = str(getattr(cfg.distributed_type, "value", cfg.distributed_type))
    mixed = str(getattr(cfg.mixed_precision, "value", cfg.mixed_precision) or "no")
    ranks = int(gpus if gpus is not None else cfg.num_processes or 1)
    if ranks < 1:
        raise UserError(f"--gpus must be at least 1, got {ranks}")
    if dist == "NO":
        if ranks != 1:
            raise UserError(f"{path} runs one process (distributed_type NO); plan it with --gpus 1, or use "
                            "configs/accelerate/multi_gpu_ddp.yaml (or fsdp, deepspeed_zero2/3) for "
                            f"{ranks} GPUs")
        return Launch(str(path), "single", 1, mixed)
    if dist == "MULTI_GPU":
        return Launch(str(path), "ddp", ranks, mixed)
    if dist == "FSDP":
        fsdp = cfg.fsdp_config or {}
        return Launch(str(path), "fsdp", ranks, mixed, offload_params=bool(fsdp.get("fsdp_offload_params", False)))
    if dist == "DEEPSPEED":
        ds = _deepspeed_fields(Path(path), cfg.deepspeed_config or {})
        stage = int(ds.get("zero_stage", 2))
        if stage not in (2, 3):
            raise UserError(f"{path}: mmart plans DeepSpeed ZeRO stage 2 or 3, got zero_stage {stage}")
        return Launch(str(path), f"zero{stage}", ranks, mixed,
                      offload_params=stage == 3 and str(ds.get("offload_param_device", "none")) != "none",
                      offload_optimizer=str(ds.get("offload_optimizer_device", "none")) != "none")
    raise UserError(f"{path}: distributed_type {dist} is not planned (single GPU, MULTI_GPU, FSDP, DEEPSPEED are)")


# --- the model: config.json -> the chooser on the meta device ----------------------------------


@dataclass(frozen=True)
class LLMSource:
    """An LLM's architecture and where it came from; ``tokenizer_len`` places the slot token's row."""

    config: Any  # transformers.PretrainedConfig
    tokenizer_len: int | None  # None: the slot token is already in the vocabulary
    source: str


def _tokenizer_len(tokenizer) -> int | None:
    from mmart.model.llm import SLOT_TOKEN

    return None if SLOT_TOKEN in tokenizer.get_vocab() else len(tokenizer)


def llm_source(base_model: str, trust_remote_code: bool = False, home: Path | None = None) -> LLMSource:
    """The config of ``base_model`` without weights: tiny stand-in, local folder, HF cache, known table, hub."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from mmart.errors import UserError
    from mmart.model.arch_table import known_llm
    from mmart.model.llm import DEFAULT_LLM_NAME, mmart_home

    if base_model.startswith("tiny:"):  # as resolve_base_model builds it, without writing the folder
        from mmart.model.testing import tiny_llm, tiny_tokenizer

        with torch.device("meta"):
            config = tiny_llm(base_model.split(":", 1)[1], vocab_size=len(tiny_tokenizer(None))).config
        return LLMSource(config, len(tiny_tokenizer(None)), f"{base_model} (mmart's tiny random model)")
    folder = Path(base_model).expanduser()
    if base_model == "default":
        folder = mmart_home(home) / "models" / DEFAULT_LLM_NAME
    if (folder / "config.json").is_file():
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        try:
            tok_len = _tokenizer_len(AutoTokenizer.from_pretrained(str(folder)))
        except Exception:  # noqa: BLE001 - no tokenizer files: the slot token adds a row, as for a fresh tokenizer
            tok_len = int(config.get_text_config().vocab_size)
        return LLMSource(config, tok_len, f"{folder}/config.json")
    if base_model != "default":
        try:  # a warm Hugging Face cache: exact, offline
            config = AutoConfig.from_pretrained(base_model, local_files_only=True, trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(base_model, local_files_only=True)
            return LLMSource(config, _tokenizer_len(tokenizer), f"{base_model} (Hugging Face cache)")
        except Exception:  # noqa: BLE001 - not cached: try the table, then the hub
            pass
    known = known_llm(base_model)
    if known is not None:
        hub_id, fields = known
        tok_len = fields.pop("tokenizer_len")
        return LLMSource(AutoConfig.for_model(fields.pop("model_type"), **fields), tok_len,
                         f"{hub_id} (mmart's table of known architectures)")
    try:
        config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - offline, gated or misspelt: one clear line
        raise UserError(f"model.base_model {base_model!r}: no config.json found (not a folder, not in the Hugging Face "
                        f"cache, not a known model, hub unreachable: {type(e).__name__}); pass a local folder that "
                        "holds its config.json") from e
    return LLMSource(config, int(config.get_text_config().vocab_size), f"{base_model} (Hugging Face hub)")


def cache_width(model: str) -> int:
    """Width D of the cached artwork vectors of an open_clip tower: its ``embed_dim``."""
    from mmart.errors import UserError
    from mmart.model.arch_table import known_tower
    from mmart.vision.tower import MODEL_CONFIG_DIR

    known = known_tower(model)
    if known is not None:
        return int(known["embed_dim"])
    local = MODEL_CONFIG_DIR / f"{model}.json"  # mmart's registered towers (mmart-tiny-vit)
    if local.is_file():
        return int(json.loads(local.read_text())["embed_dim"])
    import open_clip

    config = open_clip.get_model_config(model)
    if not config:
        raise UserError(f"vision.model {model!r} is not an open_clip architecture (open_clip.list_models())")
    return int(config["embed_dim"])


def build_meta_chooser(cfg, source: LLMSource, cache_dim: int):
    """The chooser of ``mmart sft`` on the meta device: LLM + slot row + projector + LoRA (PEFT).

    Mirrors ``build_chooser`` + ``add_lora``; the projector's output gain (``embedding_rms``)
    needs real weights and is set to 1, which changes no size.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from mmart.model.checkpoint import add_lora, lora_config
    from mmart.model.chooser import attach_artworks
    from mmart.model.projector import ArtworkProjector, ProjectorConfig

    m = cfg.model
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(source.config, dtype=getattr(torch, m.dtype),
                                               trust_remote_code=m.trust_remote_code)
        rows = llm.get_input_embeddings().weight.shape[0]
        slot_id = rows - 1 if source.tokenizer_len is None else source.tokenizer_len
        if slot_id >= rows:  # as add_slot_token: grow only
            llm.resize_token_embeddings(slot_id + 1, mean_resizing=False)
        hidden = llm.get_input_embeddings().weight.shape[1]
        projector = ArtworkProjector(ProjectorConfig(cache_dim, hidden, m.projector, 1.0, m.projector_tokens))
    attach_artworks(llm, projector, slot_id, base_model=m.base_model)
    with warnings.catch_warnings():  # PEFT reads a deprecated transformers property: noise in a plan's output
        warnings.simplefilter("ignore", FutureWarning)
        return add_lora(llm, lora_config(m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target))


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts and byte sizes of the meta chooser (sizes in the dtype each tensor is built in)."""

    total: int
    llm: int  # the LLM's own parameters (frozen)
    lora: int
    projector: int  # one copy (PEFT holds two: the base copy and the trained one)
    llm_bytes: int
    lora_bytes: int
    projector_bytes: int  # one copy
    layer_bytes: int  # the largest decoder layer, LoRA included
    root_bytes: int  # everything outside the decoder layers (FSDP's root unit)
    largest_module_bytes: int
    non_embedding: int  # LLM parameters outside the embeddings and the LM head (the N of 2N FLOPs per token)
    hidden: int
    intermediate: int
    kv_width: int
    layers: int
    vocab_rows: int
    dtype: str

    def trainable(self, projector_trained: bool) -> int:
        return self.lora + (self.projector if projector_trained else 0)

    def weight_bytes(self) -> int:
        return self.llm_bytes + self.lora_bytes + 2 * self.projector_bytes


def count_model(model) -> ModelCounts:
    """Counts by parameter name: ``lora_``, the projector's two copies, the rest (the LLM)."""
    from mmart.model.chooser import PROJECTOR_ATTR, causal_lm_of

    llm_n = lora_n = proj_n = llm_b = lora_b = proj_b = non_emb = 0
    per_layer: dict[str, int] = {}
    root_b = 0
    config = causal_lm_of(model).config.get_text_config()
    embed = causal_lm_of(model).get_input_embeddings().weight
    head = causal_lm_of(model).get_output_embeddings()
    head_ids = {id(embed), id(getattr(head, "weight", None))}
    for name, p in model.named_parameters():
        n, b = p.numel(), p.numel() * p.element_size()
        if "lora_" in name:
            lora_n, lora_b = lora_n + n, lora_b + b
        elif PROJECTOR_ATTR in name:
            if "original_module" not in name:  # count the trained copy once; weight_bytes doubles it
                proj_n, proj_b = proj_n + n, proj_b + b
        else:
            llm_n, llm_b = llm_n + n, llm_b + b
            if id(p) not in head_ids:
                non_emb += n
        layer = re.search(r"\.layers\.(\d+)\.", name)
        if layer:
            per_layer[layer.group(1)] = per_layer.get(layer.group(1), 0) + b
        else:
            root_b += b
    largest = max(sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
                  for mod in model.modules())
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    hidden = int(config.hidden_size)
    return ModelCounts(
        total=llm_n + lora_n + 2 * proj_n, llm=llm_n, lora=lora_n, projector=proj_n,
        llm_bytes=llm_b, lora_bytes=lora_b, projector_bytes=proj_b,
        layer_bytes=max(per_layer.values(), default=0), root_bytes=root_b, largest_module_bytes=largest,
        non_embedding=non_emb, hidden=hidden,
        intermediate=int(getattr(config, "intermediate_size", None) or 4 * hidden),
        kv_width=kv_heads * head_dim, layers=int(config.num_hidden_layers), vocab_rows=int(embed.shape[0]),
        dtype=str(embed.dtype).replace("torch.", ""),
    )


# --- the workload: prompt length, batch, cache -------------------------------------------------


def num_artworks(cfg) -> int:
    """Rows of the artwork cache: the dataset's artworks table if it exists, else the world config's."""
    table = Path(cfg.data_dir) / "artworks.parquet"
    if table.is_file():
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(table).metadata.num_rows)
    return int(cfg.world.num_titles * cfg.world.artworks_per_title)


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def activation_bytes(model_dtype: str, mixed_precision: str, stage_bf16: bool | None) -> int:
    """e: 2 when the weights are 16-bit or the run is under mixed precision (``bf16: null`` = on for a GPU)."""
    if _DTYPE_BYTES[model_dtype] == 2 or mixed_precision in ("bf16", "fp16") or stage_bf16 is None or stage_bf16:
        return 2
    return 4


# --- the plan -----------------------------------------------------------------------------------


@dataclass
class StageMemory:
    """Bytes per rank of one stage, term by term (FORMULA); ``other_activations``: the other checkpointing."""

    stage: str
    batch: int
    sequences: int
    trainable: int
    checkpointing: bool
    terms: dict[str, int] = field(default_factory=dict)
    other_activations: int = 0

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def total_other_checkpointing(self) -> int:
        return self.total - self.terms.get("activations", 0) + self.other_activations


@dataclass
class Plan:
    config: str
    launch: Launch
    gpu_gib: float
    model_source: str
    counts: ModelCounts
    seq_len: int
    seq_len_source: str  # "--seq-len", or how it was measured (PromptLengths.describe)
    artworks: int
    cache_width: int
    stages: list[StageMemory]
    prompt: PromptLengths | None = None  # the measured lengths (None under --seq-len)

    def over(self) -> list[StageMemory]:
        return [s for s in self.stages if s.total > self.gpu_gib * GIB]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for s, d in zip(self.stages, out["stages"]):
            d["total"] = s.total
            d["total_other_checkpointing"] = s.total_other_checkpointing
            d["fits"] = s.total <= self.gpu_gib * GIB
        return out


def layer_factor(c: ModelCounts) -> int:
    """F: activation elements per token per decoder layer kept for backward (FORMULA)."""
    return 9 * c.hidden + 2 * c.kv_width + 4 * c.intermediate


def training_activations(c: ModelCounts, tokens: int, e: int, checkpointing: bool) -> int:
    f = layer_factor(c)
    per_token = (c.layers * c.hidden + 2 * f) if checkpointing else (c.layers + 1) * f
    return tokens * e * (per_token + 4 * c.hidden)


def head_bytes(c: ModelCounts, sequences: int, reads: int, e: int, backward: bool) -> int:
    return sequences * reads * c.vocab_rows * (e + 8) * (2 if backward else 1)


def train_stage(name: str, c: ModelCounts, launch: Launch, *, batch: int, sequences: int, seq_len: int,
                checkpointing: bool, projector_trained: bool, e: int, reads: int, cache_bytes: int,
                overhead: int, stage0: int = 0) -> StageMemory:
    n = launch.ranks
    trainable = c.trainable(projector_trained)
    weights = 0 if launch.offload_params else c.weight_bytes()
    if launch.shards_weights:
        weights = math.ceil(weights / n)
    gathered = 0
    if launch.kind == "fsdp":
        gathered = c.root_bytes + 2 * c.layer_bytes
    elif launch.kind == "zero3":
        gathered = c.largest_module_bytes + 2 * c.layer_bytes
    grads = 4 * trainable * (2 if launch.kind == "ddp" else 1)
    optim = 0 if launch.offload_optimizer else 8 * trainable
    if launch.kind == "fsdp" and launch.offload_params:  # FSDP's CPU offload moves grads and the step too
        grads = optim = 0
    if launch.shards_states:
        grads, optim = math.ceil(grads / n), math.ceil(optim / n)
    tokens = sequences * seq_len
    act = training_activations(c, tokens, e, checkpointing)
    head = head_bytes(c, sequences, reads, e, backward=True)
    stage = StageMemory(name, batch, sequences, trainable, checkpointing, {
        "weights": weights, "gathered": gathered, "gradients": grads, "adamw": optim, "activations": act,
        "lm_head": head, "stage0": max(0, stage0 - act - head), "cache": cache_bytes, "overhead": overhead})
    other = training_activations(c, tokens, e, not checkpointing)
    stage.other_activations = other + max(0, stage0 - other - head) - stage.terms["stage0"]
    return stage


def predict_stage(c: ModelCounts, batch: int, seq_len: int, e: int, reads: int, cache_bytes: int,
                  overhead: int) -> StageMemory:
    act = batch * seq_len * e * (4 * c.hidden + 3 * c.intermediate)
    head = head_bytes(c, batch, reads, e, backward=False)
    stage = StageMemory("predict", batch, batch, 0, False, {
        "weights": c.weight_bytes(), "gathered": 0, "gradients": 0, "adamw": 0, "activations": act,
        "lm_head": head, "stage0": 0, "cache": cache_bytes, "overhead": overhead})
    stage.other_activations = act
    return stage


@dataclass(frozen=True)
class ModelInfo:
    """The counted meta chooser of a config, and what it was built from."""

    counts: ModelCounts
    source: str
    cache_width: int


def model_info(cfg, home: Path | None = None) -> ModelInfo:
    """Build the meta chooser of ``cfg`` and count it (seconds, even for 8B)."""
    source = llm_source(cfg.model.base_model, cfg.model.trust_remote_code, home)
    # Caption prompts have no cache; build_model then gives the projector a placeholder width of 8.
    dim = cache_width(cfg.vision.model) if cfg.prompt.artwork_input == "embeddings" else 8
    return ModelInfo(count_model(build_meta_chooser(cfg, source, dim)), source.source, dim)


def make_plan(cfg, launch: Launch, config_name: str = "", gpu_gib: float = DEFAULT_GPU_GIB,
              seq_len: int | None = None, overhead_gib: float = DEFAULT_OVERHEAD_GIB,
              info: ModelInfo | None = None, home: Path | None = None,
              prompt: PromptLengths | None = None) -> Plan:
    """Size SFT, DPO and predict per rank under ``launch`` (``info``: a counted model to reuse; ``prompt``:
    measured prompt lengths to reuse, else they are measured unless ``seq_len`` is given)."""
    info = info or model_info(cfg, home)
    counts, dim = info.counts, info.cache_width
    embeddings = cfg.prompt.artwork_input == "embeddings"
    if not seq_len:
        prompt = prompt or measure_prompt_lengths(cfg, home)[0]
    s = seq_len or prompt.max
    k = int(getattr(cfg.world, "artworks_per_title", 4))
    reads = 1 if cfg.prompt.answer == "letter" else k
    artworks = num_artworks(cfg) if embeddings else 0
    cache_bytes = artworks * cfg.cache.tokens_per_artwork * dim * _DTYPE_BYTES[cfg.cache.dtype]
    overhead = int(overhead_gib * GIB)
    stage0 = 0
    if embeddings and cfg.model.projector_init != "random":
        rows = artworks * cfg.cache.tokens_per_artwork
        h, e_slots = counts.hidden, cfg.model.projector_tokens
        stage0 = rows * (dim + 2 * h + 4 * e_slots * h) * 4
    mp = launch.mixed_precision
    sft, dpo = cfg.sft, cfg.dpo
    stages = [
        train_stage("SFT", counts, launch, batch=sft.batch_size, sequences=sft.batch_size, seq_len=s,
                    checkpointing=sft.gradient_checkpointing, projector_trained=sft.projector_lr != 0,
                    e=activation_bytes(cfg.model.dtype, mp, sft.bf16), reads=reads, cache_bytes=cache_bytes,
                    overhead=overhead, stage0=stage0),
        train_stage("DPO", counts, launch, batch=dpo.batch_size,
                    sequences=dpo.batch_size * (2 if dpo.method == "trl" else 1),
                    seq_len=s, checkpointing=dpo.gradient_checkpointing,
                    projector_trained=dpo.projector_lr != 0, e=activation_bytes(cfg.model.dtype, mp, dpo.bf16),
                    reads=reads, cache_bytes=cache_bytes, overhead=overhead),
        predict_stage(counts, cfg.eval.batch_size, s, activation_bytes(cfg.model.dtype, mp, cfg.eval.bf16), reads,
                      cache_bytes, overhead),
    ]
    return Plan(config_name, launch, gpu_gib, info.source, counts, s,
                "--seq-len" if seq_len else prompt.describe(), artworks, dim, stages, None if seq_len else prompt)


# --- the command ---------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_plan(plan: Plan) -> str:
    c, launch = plan.counts, plan.launch

    def row(label: str, values: list[str]) -> str:
        return f"{label:<38}" + "".join(f"{v:>12}" for v in values)

    train = [s.stage != "predict" for s in plan.stages]
    lines = [
        f"mmart plan: {plan.config} on {launch.config} ({launch.label}, {launch.ranks} rank(s)), "
        f"{plan.gpu_gib:g} GiB per GPU",
        f"model: {plan.model_source}; {c.dtype}, {c.layers} layers, hidden {c.hidden}, MLP {c.intermediate}, "
        f"key/value {c.kv_width}, {c.vocab_rows} embedding rows",
        f"parameters: total {c.total:,} = LLM {c.llm:,} + LoRA {c.lora:,} + projector 2 x {c.projector:,} "
        f"(base copy + trained copy); non-embedding {c.non_embedding:,}",
        f"prompt: {plan.seq_len} tokens ({plan.seq_len_source})",
        f"cache: {plan.artworks:,} artworks x width {plan.cache_width}",
        "",
        row("GiB per rank", [s.stage for s in plan.stages]),
        row("batch per rank (sequences)", [str(s.sequences) for s in plan.stages]),
        row("trainable parameters", [f"{s.trainable:,}" for s in plan.stages]),
        row("gradient checkpointing", [("on" if s.checkpointing else "off") if t else "-"
                                       for s, t in zip(plan.stages, train)]),
    ]
    names = {"weights": "weights", "gathered": "gathered (FSDP/ZeRO-3 units)", "gradients": "gradients (fp32)",
             "adamw": "AdamW states (fp32)", "activations": "activations", "lm_head": "LM head (read positions)",
             "stage0": "stage 0 beyond training", "cache": "artwork cache", "overhead": "overhead (--overhead-gib)"}
    lines += [row(label, [_gib(s.terms[key]) for s in plan.stages]) for key, label in names.items()]
    lines.append(row("total", [_gib(s.total) for s in plan.stages]))
    lines.append(row("total, gradient checkpointing flipped",
                     [_gib(s.total_other_checkpointing) if t else "-" for s, t in zip(plan.stages, train)]))
    lines.append(row(f"fits in {plan.gpu_gib:g} GiB",
                     ["yes" if s.total <= plan.gpu_gib * GIB else "NO" for s in plan.stages]))
    predict = plan.stages[-1]
    lines.append(f"(scripts/train.sh runs the 3 predicts side by side on one GPU: {_gib(3 * predict.total)} GiB)")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="parameters and memory per GPU of SFT, DPO and predict, without loading the model",
        description=("Build the chooser of a pipeline config on the meta device (no weights loaded or\n"
                     "downloaded), count its parameters, and estimate the memory per rank of SFT, DPO and\n"
                     "predict under an accelerate config on N GPUs. Exits 1, naming the stages, when a\n"
                     "stage does not fit in --gpu-memory.\n\n" + FORMULA),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="configs/default.yaml", help="pipeline config YAML")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides, e.g. sft.batch_size=8")
    p.add_argument("--accelerate", default="configs/accelerate/single_gpu.yaml", metavar="CONFIG",
                   help="accelerate config (configs/accelerate/*.yaml); decides the sharding")
    p.add_argument("--gpus", type=cli_number(int, at_least, 1), default=None, help="ranks (default: the accelerate config's num_processes)")
    p.add_argument("--gpu-memory", type=cli_number(float, positive), default=DEFAULT_GPU_GIB, metavar="GIB",
                   help=f"memory per GPU in GiB (default {DEFAULT_GPU_GIB:g})")
    p.add_argument("--seq-len", type=cli_number(int, at_least, 1), default=None,
                   help="prompt tokens (default: the longest of the decisions rendered with the prompt section)")
    p.add_argument("--overhead-gib", type=cli_number(float, at_least, 0), default=DEFAULT_OVERHEAD_GIB,
                   help=f"per-rank overhead beyond the counted terms (default {DEFAULT_OVERHEAD_GIB:g})")
    p.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mmart.config import PipelineConfig, load_config

    cfg = load_config(PipelineConfig, args.config, args.set)
    launch = read_launch(args.accelerate, args.gpus)
    plan = make_plan(cfg, launch, args.config, args.gpu_memory, args.seq_len, args.overhead_gib)
    print(format_plan(plan))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(plan.to_dict(), indent=1) + "\n")
    over = plan.over()
    if over:
        worst = ", ".join(f"{s.stage} needs {_gib(s.total)} GiB" for s in over)
        print(f"mmart plan: does not fit: {worst} per rank > {plan.gpu_gib:g} GiB (--gpu-memory) under "
              f"{launch.config} on {launch.ranks} GPU(s); use more GPUs with FSDP or ZeRO-3, gradient "
              "checkpointing, or a smaller batch_size", file=sys.stderr)
        return 1
    return 0
