"""The transformers config of Chimera (cheap to import: no ``PreTrainedModel``); registered with
the Auto classes by ``chimera.hf_registry``."""

from __future__ import annotations

from transformers import PretrainedConfig

from chimera.checkpoint import CHIMERA_FIELDS, HF_MODEL_TYPE
from chimera.config import ChimeraConfig


class ChimeraHFConfig(PretrainedConfig):
    """The genes of ``ChimeraConfig`` as a transformers config (``to_chimera`` converts back)."""

    model_type = HF_MODEL_TYPE
    # The names tools look for (lm-eval's HFLM sizes its windows by max_position_embeddings,
    # and would assume 2048 without it).
    attribute_map = {"max_position_embeddings": "max_seq_len", "hidden_size": "d_model",
                     "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}

    def __init__(self, **kwargs) -> None:
        defaults = ChimeraConfig()
        genes = {name: kwargs.pop(name, getattr(defaults, name)) for name in CHIMERA_FIELDS}
        # Tying is Chimera's own (tie_embeddings: no output matrix at all), so transformers'
        # weight tying has nothing to do.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
        for name, value in genes.items():
            setattr(self, name, value)
        self.to_chimera()  # a bad gene fails here, naming it, not in the first forward

    @classmethod
    def from_chimera(cls, config: ChimeraConfig, **kwargs) -> ChimeraHFConfig:
        return cls(**config.to_dict(), **kwargs)

    def to_chimera(self) -> ChimeraConfig:
        return ChimeraConfig.from_dict({name: getattr(self, name) for name in CHIMERA_FIELDS})
