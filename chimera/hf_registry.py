"""Chimera in transformers' Auto classes, registered when ``chimera`` is imported: the config
class, and a stand-in for the model class.

The stand-in exists because ``chimera.hf`` imports transformers' ``PreTrainedModel``, which
takes about twice as long to import as torch itself: every ``chimera`` command and every Ray
worker would pay that on start-up, though few ever load a model through transformers. The
stand-in imports ``chimera.hf`` on first use (``AutoModelForCausalLM.from_pretrained`` or
``from_config``), which then registers the real class in its place.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from chimera.checkpoint import HF_MODEL_TYPE
from chimera.hf_config import ChimeraHFConfig


class LazyChimeraForCausalLM:
    """``chimera.hf.ChimeraForCausalLM`` in the Auto mapping until it is first asked for."""

    config_class = ChimeraHFConfig

    @staticmethod
    def _real():
        from chimera.hf import ChimeraForCausalLM

        return ChimeraForCausalLM

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls._real().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, *args, **kwargs):
        return cls._real()._from_config(*args, **kwargs)


AutoConfig.register(HF_MODEL_TYPE, ChimeraHFConfig, exist_ok=True)
AutoModelForCausalLM.register(ChimeraHFConfig, LazyChimeraForCausalLM, exist_ok=True)
