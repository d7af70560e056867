"""Autoregressive generation: sampling settings, logit processing and a streaming generator.

Works on token ids only (tokenisation is the caller's business). One prefill forward fills the
cache, then every new token costs one cached step: O(1) state for recurrent blocks and a
window-sized KV ring for attention blocks, so generation can run past ``max_seq_len``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from chimera.model import Chimera


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the context
    stop_tokens: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: must be >= 1 or None")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] or None")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be > 0")


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
    # Drop a token when the mass before it already reaches p; the top token always stays.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
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
