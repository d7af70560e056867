"""Loading a model directory for inference: weights, config and tokenizer, optionally int8.

A model directory (what ``chimera train``, ``sft`` and ``promote`` write) holds
``model.safetensors``, ``config.json`` and ``tokenizer/``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from chimera.checkpoint import CheckpointError, load_model
from chimera.model import Chimera
from chimera.tokenizer import TokenizerError, load_tokenizer

TOKENIZER_DIR = "tokenizer"
QUANTIZE_BITS = (8,)


def quantize_int8(model: Chimera) -> Chimera:
    """Dynamic int8 quantization of the blocks' linear layers (weights int8, activations
    quantized on the fly): smaller and faster matmuls on CPU. Inference only, in place. The
    embedding and output head stay in float (the head is often tied to the embedding)."""
    with warnings.catch_warnings():
        # torch.ao's eager quantization is deprecated in favour of torchao, which would be one
        # more dependency; the eager API still does exactly this on CPU.
        warnings.simplefilter("ignore")
        model.blocks = torch.ao.quantization.quantize_dynamic(
            model.blocks.eval(), {torch.nn.Linear}, dtype=torch.qint8)
    return model.eval()


def load_pretrained(directory: str | Path, quantize: int | None = None,
                    device: str = "cpu") -> tuple[Chimera, object]:
    """The model and its tokenizer from a model directory, ready for generation."""
    directory = Path(directory)
    if quantize is not None and quantize not in QUANTIZE_BITS:
        raise ValueError(f"--quantize {quantize}: only {QUANTIZE_BITS} bits are supported")
    if quantize is not None and device != "cpu":
        raise ValueError("--quantize is for CPU inference")
    model = load_model(directory, device=device).eval()
    tokenizer_dir = directory / TOKENIZER_DIR
    if not tokenizer_dir.is_dir():
        raise CheckpointError(f"{directory}: no {TOKENIZER_DIR}/ directory; is it a model "
                              f"directory written by chimera train, sft or promote?")
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) != model.config.vocab_size:  # every maker of a model directory sizes
        # the vocabulary to its tokenizer: another size means another tokenizer, and its ids
        # would decode into gibberish (or index past the embedding)
        raise TokenizerError(f"{tokenizer_dir}: {len(tokenizer)} tokens, but the model's "
                             f"vocabulary has {model.config.vocab_size}: not the tokenizer this "
                             f"model was trained with")
    if quantize:
        model = quantize_int8(model)
    return model, tokenizer
