"""Autoregressive generation: sampling settings, logit processing and a streaming generator.

Works on token ids only (tokenisation is the caller's business). One prefill forward fills the
cache, then every new token costs one cached step: O(1) state for recurrent blocks and a
window-sized KV ring for attention blocks, so generation can run past ``max_seq_len``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from chimera.model import Chimera

# Temperatures in (0, MIN_TEMPERATURE) are refused: logits are divided by the temperature in
# float32, and 1e-300 turns every logit into +-inf (softmax then gives NaN and sampling fails).
# At 1e-2 a logit of even 1e30 stays finite, and sampling that cold is already greedy in all
# but name, so 0 (exact greedy) is the way to ask for it.
MIN_TEMPERATURE = 1e-2
# The repetition penalty divides or multiplies logits in the same way, so it is bounded alike.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 1e2
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; the signed range is portable


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings, checked on construction: a bad value raises ValueError naming the
    field (the CLI turns that into a one-line error, the web server into a 400)."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy; otherwise at least MIN_TEMPERATURE
    top_k: int | None = None
    top_p: float | None = None  # in (0, 1]; however small, the most likely token stays
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the context
    stop_tokens: tuple[int, ...] = ()
    seed: int | None = None  # in [0, MAX_SEED]

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: must be an integer >= 0")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r}: must be a finite number >= 0")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature={self.temperature!r}: must be 0 (greedy) or at least "
                             f"{MIN_TEMPERATURE} (colder overflows the logits)")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 1 or None")
        if self.top_p is not None and (not _is_real(self.top_p) or not math.isfinite(self.top_p)
                                       or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r}: must be a number in (0, 1] or None")
        if not _is_real(self.repetition_penalty) or not math.isfinite(self.repetition_penalty) \
                or not 0 < self.repetition_penalty:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r}: must be a finite "
                             f"number > 0")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r}: must be in "
                             f"[{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}] (beyond, "
                             f"it overflows the logits)")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            shown = "a huge integer" if _is_int(self.seed) and self.seed.bit_length() > 128 \
                else f"{self.seed!r:.40}"  # repr of a 5000-digit int would itself fail
            raise ValueError(f"seed={shown}: must be an integer in [0, 2**63 - 1] or None")


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style: divide positive and multiply negative logits of seen tokens by ``penalty``.

    logits: (B, V); seen: (B, V) bool.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: Tensor, k: int | None) -> Tensor:
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, p: float | None) -> Tensor:
    """Keep the smallest set of tokens whose probability mass reaches ``p`` (nucleus)."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass before it already reaches p. The top token always stays, also
    # when p is so small that it rounds to 0 in float32 (which would otherwise drop every token).
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: Tensor, seen: Tensor, sampling: SamplingConfig,
               generator: torch.Generator | None) -> Tensor:
    """Pick the next token for each row of logits (B, V) -> (B,)."""
    logits = apply_repetition_penalty(logits.float(), seen, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_top_p(filter_top_k(logits / sampling.temperature, sampling.top_k),
                          sampling.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def stream(model: Chimera, prompt: Sequence[int], sampling: SamplingConfig = SamplingConfig()
           ) -> Iterator[int]:
    """Yield new token ids one at a time. Stops at a stop token (which is yielded) or after
    ``max_new_tokens``."""
    if len(prompt) == 0:
        raise ValueError("prompt must hold at least one token")
    vocab = model.config.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token {bad[0]} is outside the vocabulary [0, {vocab})")
    if sampling.max_new_tokens == 0:
        return
    device = model.embed.weight.device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    was_training = model.training
    model.eval()
    try:
        tokens = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
        seen[0, tokens[0]] = True
        logits, cache = model(tokens, model.init_cache(1))
        for _ in range(sampling.max_new_tokens):
            token = next_token(logits[:, -1], seen, sampling, generator)
            token_id = int(token.item())
            yield token_id
            if token_id in sampling.stop_tokens:
                return
            seen[0, token_id] = True
            logits, cache = model(token.view(1, 1), cache)
    finally:
        model.train(was_training)


def generate(model: Chimera, prompt: Sequence[int], sampling: SamplingConfig = SamplingConfig()
             ) -> list[int]:
    """All new token ids at once (see ``stream``)."""
    return list(stream(model, prompt, sampling))
