"""The chunked linear scan and the RG-LRU against their step-by-step twins."""

import pytest
import torch
import torch.nn.functional as F

from chimera.rglru import RG_LRU_C, RGLRU
from chimera.scan import CHUNK, linear_scan, linear_scan_reference


def _values_and_grads(fn, a, b, h0, weight):
    inputs = [a, b] + ([h0] if h0 is not None else [])
    out = fn(a, b, h0)
    grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True,
                                materialize_grads=True)
    return out, grads


@pytest.mark.parametrize("length", [1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 3,
                                    CHUNK * CHUNK + 7, 1000])
@pytest.mark.parametrize("with_state", [False, True])
def test_fast_scan_equals_step_by_step_in_values_and_gradients(length, with_state):
    a = torch.empty(2, length, 6).uniform_(0.3, 0.999).requires_grad_()
    b = torch.randn(2, length, 6, requires_grad=True)
    h0 = torch.randn(2, 6, requires_grad=True) if with_state else None
    weight = torch.randn(2, length, 6)

    fast, fast_grads = _values_and_grads(linear_scan, a, b, h0, weight)
    slow, slow_grads = _values_and_grads(linear_scan_reference, a, b, h0, weight)

    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast_grads, slow_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_scan_is_stable_when_decay_underflows():
    # a_t of 1e-30 over 64 steps: the cumulative product underflows to 0. A scan that divides
    # by cumulative products would produce inf/nan here.
    a = torch.full((1, 64, 3), 1e-30)
    b = torch.randn(1, 64, 3)
    torch.testing.assert_close(linear_scan(a, b), linear_scan_reference(a, b))


def _graph_size(tensor):
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


def test_autograd_records_no_loop_over_time():
    sizes = []
    for length in (32, 512):
        a = torch.rand(1, length, 4, requires_grad=True)
        b = torch.randn(1, length, 4, requires_grad=True)
        sizes.append(_graph_size(linear_scan(a, b).sum()))
    assert sizes[0] == sizes[1] <= 4


def rg_lru_step_by_step(layer: RGLRU, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The Griffin equations as written, one step at a time, with no log-space tricks."""
    block = layer.gates.weight.shape[1]
    a_base = torch.sigmoid(layer.a_logit)
    outputs = []
    for t in range(u.shape[1]):
        x_t = u[:, t]
        gates = torch.einsum("bnk,nko->bno", x_t.unflatten(-1, (-1, block)), layer.gates.weight)
        gates = gates + layer.gates.bias
        gate_x, gate_a = gates[..., :block].flatten(1), gates[..., block:].flatten(1)
        r_t, i_t = torch.sigmoid(gate_a), torch.sigmoid(gate_x)
        a_t = a_base ** (RG_LRU_C * r_t)
        h = a_t * h + torch.sqrt(1 - a_t**2) * (i_t * x_t)
        outputs.append(h)
    return torch.stack(outputs, dim=1)


def test_rg_lru_layer_matches_the_paper_equations():
    layer = RGLRU(width=16, n_heads=4)
    u = torch.randn(2, 37, 16, requires_grad=True)
    h0 = torch.randn(2, 16)
    fast, last = layer(u, h0)
    slow = rg_lru_step_by_step(layer, u, h0)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, slow[:, -1])
    weight = torch.randn_like(slow)
    params = [u, layer.a_logit, layer.gates.weight, layer.gates.bias]
    fast_grads = torch.autograd.grad((fast * weight).sum(), params)
    slow_grads = torch.autograd.grad((slow * weight).sum(), params)
    for got, want in zip(fast_grads, slow_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_rg_lru_decay_is_initialised_between_0_9_and_0_999():
    layer = RGLRU(width=4096, n_heads=8)
    a = torch.sigmoid(layer.a_logit)
    assert a.min() >= 0.9 - 1e-6 and a.max() <= 0.999 + 1e-6
    assert a.max() - a.min() > 0.05  # spread over the range, not a constant


def test_rg_lru_state_is_fp32_under_low_precision_inputs():
    layer = RGLRU(width=8, n_heads=2).to(torch.bfloat16)
    out, state = layer(torch.randn(1, 5, 8, dtype=torch.bfloat16), None)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert torch.isfinite(F.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32)))
