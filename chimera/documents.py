"""Document boundaries inside packed training windows.

The token store packs documents end to end, each followed by the end-of-text token, so one
training window often holds the end of one document and the start of the next. A model whose
config names a ``document_token`` treats every occurrence of it as the first token of a new
document, as Griffin's reference does at ``segment_pos == 0``: the RG-LRU state restarts there
(a_t = 0, so h_t = i_t * u_t), the temporal conv reads no earlier input, and attention stays
inside the document. Without one (the default), windows mix documents as in nanoGPT.

Off by default because, measured at the sizes a CPU search trains, it did not pay: paired runs of
the same weights and batches moved held-out bits per byte by -0.2% on average on tinyshakespeare's
speeches and +0.8% on the built-in stories (-0.4% to +2.7%, the small model undertrained), at the
same training speed (BENCHMARKS.md, "Document boundaries"). A config may still set it
(``chimera train --config``), and everything downstream (evaluation, decoding, the Hugging Face
port) follows.

Decoding keeps the same rules across calls: the cache carries where each row's current document
began, so a document token met while generating starts a fresh document there too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Documents(NamedTuple):
    """Where the documents of a (B, T) block of tokens start."""

    starts: Tensor  # (B, T) bool: this token begins a document (the recurrence resets)
    first: Tensor  # (B, T) int64: the position of this token's document's first token
    offsets: Tensor  # (B, T) int64: tokens since that first token (0 at a start)


def find_documents(tokens: Tensor, document_token: int | None, position: int = 0,
                   carried: Tensor | None = None) -> Documents | None:
    """The document layout of ``tokens`` (positions ``position ..``), given ``carried`` (B,),
    where each row's document began before them (a decoding cache; None: at ``position``).

    None where no boundary can matter (no document token configured, none in the tokens and
    none carried from after position 0): the plain paths then run unchanged. A start at
    position 0 still counts: its RG-LRU input is not scaled by sqrt(1 - a^2), as at any start.
    """
    if document_token is None:
        return None
    starts = tokens == document_token
    if not starts.any() and (carried is None or not carried.any()):
        return None
    positions = torch.arange(position, position + tokens.shape[1], device=tokens.device)
    positions = positions.expand_as(tokens)
    before = (torch.full_like(tokens[:, :1], position) if carried is None
              else carried.unsqueeze(1))
    first = torch.where(starts, positions, before).cummax(dim=1).values
    return Documents(starts, first, positions - first)
