"""The Griffin recurrent block: a GeLU gate branch and a conv + RG-LRU branch, multiplied.

    y = gelu(W_y x)                         gate branch                       (B, T, lru)
    u = conv4(W_u x)                        causal depthwise temporal conv    (B, T, lru)
    h = RG-LRU(u)                           gated linear recurrence, fp32 state
    out = W_o (h * y)

The RG-LRU itself lives in ``chimera.rglru``. On CPU in fp32 the conv, the RG-LRU and the
output gating each run as one fused C++ kernel (``chimera.kernels``); elsewhere, the eager
Functions below, which compute the same thing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chimera.config import ChimeraConfig
from chimera.documents import Documents
from chimera.kernels import fused_kernels_apply, fused_ops
from chimera.rglru import RGLRU


class RecurrentCache(NamedTuple):
    """Decoding state of one recurrent block: O(1) in sequence length."""

    conv: Tensor  # (B, conv_width - 1, lru) the last inputs of the temporal conv
    state: Tensor  # (B, lru) the RG-LRU state, always fp32


class _CausalConv(torch.autograd.Function):
    """Depthwise causal conv over whole sequences from a zero history:
    ``out_t = bias + sum_k weight[k] * u_{t-k}``, as in-place shifted products with a hand-written
    backward (about 2x faster than autograd of the padded version: no padding copy, fewer
    temporaries). With ``offsets`` (tokens since each position's document start) a tap k is
    dropped where k > offset: no output reads the document before its own."""

    @staticmethod
    def forward(ctx, u: Tensor, weight: Tensor, bias: Tensor, offsets: Tensor | None) -> Tensor:
        length = u.shape[1]
        out = torch.addcmul(bias, u, weight[0])
        for k in range(1, min(weight.shape[0], length)):
            shifted = u[:, :length - k]
            if offsets is not None:
                shifted = shifted * _tap_mask(offsets[:, k:], k, u.dtype)
            out[:, k:].addcmul_(shifted, weight[k])
        ctx.save_for_backward(u, weight, offsets)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, weight, offsets = ctx.saved_tensors
        length = u.shape[1]
        grad_u = grad * weight[0]
        grad_weight = torch.zeros_like(weight)
        grad_weight[0] = torch.linalg.vecdot(grad, u, dim=1).sum(0)
        for k in range(1, min(weight.shape[0], length)):
            grad_k = grad[:, k:]
            if offsets is not None:
                grad_k = grad_k * _tap_mask(offsets[:, k:], k, grad.dtype)
            grad_u[:, :length - k].addcmul_(grad_k, weight[k])
            grad_weight[k] = torch.linalg.vecdot(grad_k, u[:, :length - k], dim=1).sum(0)
        return grad_u, grad_weight, grad.sum(dim=(0, 1)), None


def _tap_mask(offsets: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """(B, T, 1) for outputs' ``offsets`` (B, T): 1 where the output may read the input k steps
    back, which is inside its document."""
    return (offsets >= k).unsqueeze(-1).to(dtype)


class _FusedCausalConv(torch.autograd.Function):
    """The same conv through the fused kernel (chimera/csrc/causal_conv.cpp)."""

    @staticmethod
    def forward(ctx, u: Tensor, weight: Tensor, bias: Tensor, offsets: Tensor | None) -> Tensor:
        offsets = u.new_empty(0, dtype=torch.long) if offsets is None else offsets.contiguous()
        ctx.save_for_backward(u, weight, offsets)
        return fused_ops().causal_conv_forward(u, weight, bias, offsets)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (*fused_ops().causal_conv_backward(grad, *ctx.saved_tensors), None)


def causal_conv(u: Tensor, weight: Tensor, bias: Tensor, offsets: Tensor | None = None,
                fused: bool = True) -> Tensor:
    """Causal depthwise conv of whole sequences (zero history): (B, T, W) -> (B, T, W);
    ``offsets`` (B, T): tokens since each position's document start (None: one document)."""
    if fused and u.is_contiguous() and fused_kernels_apply(u, weight, bias):
        return _FusedCausalConv.apply(u, weight, bias, offsets)
    return _CausalConv.apply(u, weight, bias, offsets)


class _GeluGate(torch.autograd.Function):
    """``h * gelu_tanh(gate)`` through the fused kernel (chimera/csrc/gelu_gate.cpp)."""

    @staticmethod
    def forward(ctx, h: Tensor, gate: Tensor) -> Tensor:
        ctx.save_for_backward(h, gate)
        return fused_ops().gelu_gate_forward(h, gate)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return tuple(fused_ops().gelu_gate_backward(grad, *ctx.saved_tensors))


def gelu_gate(h: Tensor, gate: Tensor, fused: bool = True) -> Tensor:
    """The recurrent block's output gating ``h * gelu(gate)`` (tanh approximation). A decoding
    step (one position) stays eager: two small ops dispatch faster than a custom Function."""
    if (fused and h.dim() == 3 and h.shape[1] > 1 and h.is_contiguous() and gate.is_contiguous()
            and fused_kernels_apply(h, gate)):
        return _GeluGate.apply(h, gate)
    return h * F.gelu(gate, approximate="tanh")


class RecurrentBlock(nn.Module):
    def __init__(self, config: ChimeraConfig) -> None:
        super().__init__()
        width = config.lru_dim
        self.width = width
        self.conv_width = config.conv_width
        self.in_proj = nn.Linear(config.d_model, 2 * width, bias=False)  # gate branch | rnn branch
        self.conv_weight = nn.Parameter(torch.empty(config.conv_width, width))
        self.conv_bias = nn.Parameter(torch.zeros(width))
        self.rg_lru = RGLRU(width, config.n_heads)
        self.out_proj = nn.Linear(width, config.d_model, bias=False)
        nn.init.normal_(self.conv_weight, std=1.0 / math.sqrt(config.conv_width))

    def init_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype
                   ) -> RecurrentCache:
        return RecurrentCache(
            conv=torch.zeros(batch_size, self.conv_width - 1, self.width, device=device,
                             dtype=dtype),
            state=torch.zeros(batch_size, self.width, device=device, dtype=torch.float32),
        )

    def _conv(self, u: Tensor, history: Tensor | None, documents: Documents | None = None
              ) -> tuple[Tensor, Tensor | None]:
        """Causal depthwise conv; ``history`` holds the previous conv_width-1 inputs when
        decoding. Returns the output and the history to keep (None without a cache)."""
        offsets = None if documents is None else documents.offsets
        if history is None:
            return causal_conv(u, self.conv_weight, self.conv_bias, offsets), None
        length = u.shape[1]
        padded = torch.cat([history.to(u.dtype), u], dim=1)  # (B, conv_width - 1 + T, lru)
        out = self.conv_bias.expand_as(u)
        for k in range(self.conv_width):  # weight[k] multiplies the input k steps back
            start = self.conv_width - 1 - k
            shifted = padded[:, start:start + length]
            if offsets is not None and k:  # not from before the token's document
                shifted = shifted * _tap_mask(offsets, k, u.dtype)
            out = torch.addcmul(out, shifted, self.conv_weight[k])
        return out, padded[:, padded.shape[1] - (self.conv_width - 1):]

    def _input_branches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(gate branch, rnn branch). Two matmuls on the halves of in_proj's weight rather than
        chunking one product, whose backward would concatenate the two (B, T, width) gradients
        into a new tensor; a dynamically quantized in_proj (no weight tensor) is called whole."""
        weight = self.in_proj.weight
        if not isinstance(weight, Tensor):
            return self.in_proj(x).chunk(2, dim=-1)
        gate_weight, rnn_weight = weight.chunk(2, dim=0)
        return F.linear(x, gate_weight), F.linear(x, rnn_weight)

    def forward(self, x: Tensor, cache: RecurrentCache | None = None,
                documents: Documents | None = None) -> tuple[Tensor, RecurrentCache | None]:
        gate, u = self._input_branches(x)
        u, conv_history = self._conv(u, None if cache is None else cache.conv, documents)
        h, state = self.rg_lru(u, None if cache is None else cache.state,
                               None if documents is None else documents.starts)
        out = self.out_proj(gelu_gate(h, gate))
        new_cache = None if cache is None else RecurrentCache(conv_history, state)
        return out, new_cache
