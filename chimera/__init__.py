"""Chimera: a Griffin-style hybrid of RG-LRU recurrence and sliding-window attention.

The model layer of the project: genes (``ChimeraConfig``), layers, the model with its caches,
generation and checkpoints. It imports nothing else of ours (see DESIGN.md).
"""

from chimera.checkpoint import CheckpointError, load_config, load_model, save_model
from chimera.config import PRESETS, BlockType, ChimeraConfig, get_preset
from chimera.generation import SamplingConfig, generate, stream
from chimera.model import Chimera, ChimeraCache, ParamCounts, param_counts_of

# Registers ChimeraHFConfig and (a stand-in for) ChimeraForCausalLM with transformers' Auto
# classes, so AutoModelForCausalLM.from_pretrained(DIR) reads a model directory once chimera is
# imported; chimera.hf itself (PreTrainedModel: a slow import) loads on first use.
from chimera import hf_registry  # noqa: E402  isort: skip

__all__ = [
    "PRESETS", "BlockType", "CheckpointError", "Chimera", "ChimeraCache", "ChimeraConfig",
    "ParamCounts", "SamplingConfig", "generate", "get_preset", "load_config", "load_model",
    "hf_registry", "param_counts_of", "save_model", "stream",
]
