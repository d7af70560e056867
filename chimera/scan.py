"""Fast linear recurrence ``h_t = a_t * h_{t-1} + b_t`` (elementwise) for the RG-LRU.

Training cannot afford an autograd graph with one node per time step, so ``linear_scan`` is a
custom autograd Function:

* forward: a chunked scan. The sequence is cut into chunks of ``CHUNK`` steps. All chunks are
  scanned at once from a zero state (a loop of ``CHUNK`` vectorised steps over every chunk),
  keeping only each chunk's end state and the product of its a's; the true chunk-end states are
  a linear recurrence over chunks, solved by the same scan recursively; then every chunk is
  scanned again from its true start, writing the output in place. The Python loop length is
  ~2 * CHUNK * log_CHUNK(T), not T; memory traffic is two reads of a and b and one write of h;
  and nothing divides by a cumulative product, so it is stable however small ``a`` gets.
* backward: the gradient of a linear recurrence is the same recurrence run backwards in time,
  ``g_t = dL/dh_t + a_{t+1} g_{t+1}``, so the same chunked scan in reverse mode computes it;
  then ``dL/db = g`` and ``dL/da_t = g_t * h_{t-1}``.

``linear_scan_reference`` is the obviously-correct step-by-step twin used by the tests.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.profiler import record_function

CHUNK = 16  # steps scanned sequentially inside one chunk; sqrt-ish of typical lengths


def scan(a: Tensor, b: Tensor, h0: Tensor | None, reverse: bool = False) -> Tensor:
    """Chunked, vectorised scan on (B, T, D) tensors; no autograd.

    Forward: ``h_t = a_t * h_{t-1} + b_t``. Reverse: ``h_t = a_t * h_{t+1} + b_t``, with h0 the
    state after the last step. Reverse mode is what the gradient needs, without flipping copies.
    """
    batch, length, dim = b.shape
    order = range(length - 1, -1, -1) if reverse else range(length)
    if length <= CHUNK:
        out = torch.empty_like(b)
        h = h0
        for t in order:  # each step written in place: no allocation per step
            if h is None:
                h = out[:, t].copy_(b[:, t])
            else:
                h = torch.addcmul(b[:, t], a[:, t], h, out=out[:, t])
        return out

    n_chunks = -(-length // CHUNK)
    pad = n_chunks * CHUNK - length
    if pad:  # padded steps (a=1, b=0) carry the state through unchanged and are dropped
        a = torch.cat([a, a.new_ones(batch, pad, dim)], dim=1)
        b = torch.cat([b, b.new_zeros(batch, pad, dim)], dim=1)
    a4 = a.view(batch, n_chunks, CHUNK, dim)
    b4 = b.view(batch, n_chunks, CHUNK, dim)
    steps = range(CHUNK - 1, -1, -1) if reverse else range(CHUNK)

    # 1. every chunk at once from a zero state, keeping only the chunk-end state and the
    #    product of a over the chunk (nothing of full size is written)
    h, p = b4[:, :, steps[0]].clone(), a4[:, :, steps[0]].clone()  # running buffers
    for t in steps[1:]:
        torch.addcmul(b4[:, :, t], a4[:, :, t], h, out=h)
        p.mul_(a4[:, :, t])

    # 2. the true state at each chunk's end is itself a linear recurrence over chunks
    ends = scan(p, h, h0, reverse)
    starts = torch.empty_like(ends)  # the state entering each chunk
    first, rest, prev = (-1, slice(None, -1), slice(1, None)) if reverse else \
        (0, slice(1, None), slice(None, -1))
    if h0 is None:
        starts[:, first].zero_()
    else:
        starts[:, first] = h0
    starts[:, rest] = ends[:, prev]

    # 3. rescan every chunk from its true start, writing each step straight into the output
    out = torch.empty_like(b4)
    h = starts
    for t in steps:
        h = torch.addcmul(b4[:, :, t], a4[:, :, t], h, out=out[:, :, t])
    out = out.view(batch, n_chunks * CHUNK, dim)
    return out[:, :length] if pad else out


def scan_backward(grad_h: Tensor, a: Tensor, h: Tensor, h0: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients (dL/da, dL/db, dL/dh0) of ``h = scan(a, b, h0)`` given dL/dh."""
    # g_t = dL/dh_t + a_{t+1} g_{t+1}: the reverse scan with coefficients shifted by one.
    a_next = torch.empty_like(a)
    a_next[:, :-1] = a[:, 1:]
    a_next[:, -1] = 0
    g = scan(a_next, grad_h.contiguous(), None, reverse=True)
    grad_a = torch.empty_like(g)  # g_t * h_{t-1}
    torch.mul(g[:, 1:], h[:, :-1], out=grad_a[:, 1:])
    if h0 is None:
        grad_a[:, 0] = 0
        grad_h0 = None
    else:
        torch.mul(g[:, 0], h0, out=grad_a[:, 0])
        grad_h0 = a[:, 0] * g[:, 0]
    return grad_a, g, grad_h0


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor | None) -> Tensor:
        with record_function("rglru_scan_forward"):
            a = a.contiguous()
            h = scan(a, b.contiguous(), h0)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        a, h, h0 = ctx.saved_tensors
        with record_function("rglru_scan_backward"):
            return scan_backward(grad_h, a, h, h0)


def linear_scan(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` for (B, T, D) inputs; ``h_{-1} = h0`` or 0."""
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"linear_scan wants two (B, T, D) tensors, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.shape[1] == 1:  # one decoding step: plain ops, no chunking
        h = b[:, 0] if h0 is None else torch.addcmul(b[:, 0], a[:, 0], h0)
        return h.unsqueeze(1)
    return _LinearScan.apply(a, b, h0)


def linear_scan_reference(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """Step-by-step recurrence recorded op by op by autograd: slow, obviously correct."""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    states = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        states.append(h)
    return torch.stack(states, dim=1)
