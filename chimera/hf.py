"""Chimera as a Hugging Face transformers model: a config class and a causal-LM class that wrap
``chimera.model.Chimera`` (the layers are not implemented twice), registered with the Auto
classes when ``chimera`` is imported (``chimera.hf_registry``).

A model directory written by ``chimera train``, ``sft`` or ``promote`` loads with
``AutoModelForCausalLM.from_pretrained(DIR)`` (no ``trust_remote_code``, no network):
``config.json`` carries ``model_type: chimera`` and the weights keep their native names, and
``save_pretrained`` writes a directory that ``chimera generate`` / ``serve`` read back.

Padding: right padding needs nothing (the model is causal). Left-padded rows are shifted to the
left before the forward and their logits shifted back, so a left-padded batch scores exactly as
its rows would alone; the recurrent state never reads a pad. ``generate`` carries the native
cache (the RG-LRU state and the attention window's KV ring: O(1) per token), for one prompt or
prompts of equal length; greedy and sampling, not beam search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from chimera.checkpoint import HF_WEIGHT_PREFIX
from chimera.hf_config import ChimeraHFConfig
from chimera.layers import RotaryEmbedding
from chimera.model import Chimera, ChimeraCache


@dataclass
class ChimeraModelOutput(BaseModelOutput):
    chimera_cache: ChimeraCache | None = None


@dataclass
class ChimeraCausalLMOutput(CausalLMOutput):
    chimera_cache: ChimeraCache | None = None


def _left_pad_shifts(attention_mask: Tensor) -> Tensor:
    """Per row, the number of leading pads; raise for a mask that is not one run of ones."""
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    leading = (~mask).cumprod(dim=1).sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    expected = (positions >= leading[:, None]) & (positions < (leading + lengths)[:, None])
    if not torch.equal(expected, mask):
        raise ValueError("attention_mask: each row must be one run of ones (left or right "
                         "padding); Chimera's recurrence cannot skip tokens inside a sequence")
    return leading


def _roll_rows(x: Tensor, shifts: Tensor, sign: int) -> Tensor:
    """Roll each row of ``x`` (B, T, ...) left (sign=1) or right (sign=-1) by its shift."""
    index = (torch.arange(x.shape[1], device=x.device)[None, :] + sign * shifts[:, None])
    index = index % x.shape[1]
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


class ChimeraModel(Chimera):
    """The backbone transformers code expects (``model.model``): Chimera's own modules and
    weight names, called as transformers calls a base model, returning hidden states."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                chimera_cache: ChimeraCache | None = None, **kwargs) -> ChimeraModelOutput:
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds is not supported: pass input_ids")
        shifts = None
        if attention_mask is not None and not bool(attention_mask.all()):
            shifts = _left_pad_shifts(attention_mask)
            if chimera_cache is not None and bool(shifts.any()):
                raise ValueError("generate: left-padded prompts of different lengths are not "
                                 "supported; generate one prompt at a time")
            shifts = shifts if bool(shifts.any()) else None
        tokens = input_ids if shifts is None else _roll_rows(input_ids, shifts, 1)
        hidden, cache = self.hidden_states(tokens, chimera_cache)
        if shifts is not None:
            hidden = _roll_rows(hidden, shifts, -1)
        return ChimeraModelOutput(last_hidden_state=hidden, chimera_cache=cache)


class OutputHead(torch.nn.Module):
    """The output projection as transformers code looks for it (``.weight``, ``.bias``): with
    tied embeddings a view of the embedding, so the weight is stored once."""

    def __init__(self, model: Chimera) -> None:
        super().__init__()
        self._model = [model]  # a list: not registered, so no second copy in the state dict
        self.bias = None

    @property
    def weight(self) -> Tensor:
        return self._model[0].output_weight

    def forward(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.weight)


class ChimeraForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ChimeraHFConfig
    base_model_prefix = HF_WEIGHT_PREFIX.rstrip(".")
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _is_stateful = True  # no assisted generation: the recurrent state cannot be rewound
    _no_split_modules = ["ResidualBlock"]

    def __init__(self, config: ChimeraHFConfig) -> None:
        super().__init__(config)
        self.model = ChimeraModel(config.to_chimera())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is Chimera's own (see prepare_inputs_for_generation)

    def _init_weights(self, module) -> None:
        # Parameters: Chimera.__init__ initialised them, and a checkpoint overwrites them. The
        # RoPE tables are derived, never saved, so they are computed here after loading.
        if isinstance(module, RotaryEmbedding):
            module.reset_buffers()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> OutputHead:
        return OutputHead(self.model)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, chimera_cache: ChimeraCache | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0,
                return_dict: bool | None = None, **kwargs) -> ChimeraCausalLMOutput | tuple:
        """Logits for ``input_ids`` (B, T); ``labels`` (B, T) give the mean next-token loss
        over those not -100 (shifted inside, as transformers models do)."""
        out = self.model(input_ids, attention_mask, chimera_cache, **kwargs)
        hidden = out.last_hidden_state
        logits = F.linear(hidden[:, -logits_to_keep:] if logits_to_keep else hidden,
                          self.model.output_weight)
        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels with logits_to_keep: the loss needs every logit")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        output = ChimeraCausalLMOutput(loss=loss, logits=logits, chimera_cache=out.chimera_cache)
        return output if return_dict is not False else output.to_tuple()

    # ------------------------------------------------------------------ generation
    def prepare_inputs_for_generation(self, input_ids: Tensor, chimera_cache=None,
                                      attention_mask: Tensor | None = None, use_cache=True,
                                      **kwargs) -> dict:
        if not use_cache:  # full recompute: every step reruns the whole sequence
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        if chimera_cache is None:  # the prompt: one prefill fills a fresh cache
            chimera_cache = self.model.init_cache(input_ids.shape[0])
            return {"input_ids": input_ids, "attention_mask": attention_mask,
                    "chimera_cache": chimera_cache, "logits_to_keep": 1}
        return {"input_ids": input_ids[:, chimera_cache.position:],
                "chimera_cache": chimera_cache, "logits_to_keep": 1}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: dict, *args, **kwargs
                                            ) -> dict:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs,
                                                                   *args, **kwargs)
        model_kwargs["chimera_cache"] = outputs.chimera_cache
        return model_kwargs

    def generate(self, *args, **kwargs):
        config = kwargs.get("generation_config") or self.generation_config
        beams = kwargs.get("num_beams", config.num_beams)
        if beams and beams > 1:
            raise ValueError(f"num_beams={beams}: beam search is not supported by Chimera's "
                             f"recurrent cache; use greedy decoding or sampling")
        return super().generate(*args, **kwargs)


def from_native(model: Chimera) -> ChimeraForCausalLM:
    """The transformers model holding a copy of ``model``'s weights."""
    wrapper = ChimeraForCausalLM(ChimeraHFConfig.from_chimera(model.config))
    wrapper.model.load_state_dict(model.state_dict())
    return wrapper.to(next(model.parameters()).device).train(model.training)


def to_native(model: ChimeraForCausalLM) -> Chimera:
    """The native model holding a copy of the transformers model's weights."""
    native = Chimera(model.config.to_chimera())
    native.load_state_dict(model.model.state_dict())
    return native.to(next(model.parameters()).device).train(model.training)


# The real class replaces the stand-in chimera.hf_registry registered.
AutoModelForCausalLM.register(ChimeraHFConfig, ChimeraForCausalLM, exist_ok=True)
