"""The recurrent block's hand-written backward passes, checked numerically in float64."""

import torch

from chimera.config import ChimeraConfig
from chimera.documents import find_documents
from chimera.recurrent import RecurrentBlock, _CausalConv
from chimera.rglru import RGLRU, rg_lru, rg_lru_reference


def test_fused_rg_lru_gradients_pass_gradcheck():
    layer = RGLRU(width=8, n_heads=2).double()
    u = torch.randn(2, 21, 8, dtype=torch.float64, requires_grad=True)
    gates = layer.gates(u).detach().requires_grad_()
    a_logit = layer.a_logit.detach().clone().requires_grad_()
    h0 = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rg_lru, (u, gates, a_logit, h0))
    assert torch.autograd.gradcheck(rg_lru, (u, gates, a_logit, None))


def test_fused_rg_lru_equals_the_autograd_reference():
    layer = RGLRU(width=16, n_heads=4)
    u = torch.randn(3, 50, 16, requires_grad=True)
    weight = torch.randn(3, 50, 16)
    fast = rg_lru(u, layer.gates(u), layer.a_logit)
    slow = rg_lru_reference(u, layer.gates(u), layer.a_logit)
    torch.testing.assert_close(fast, slow)
    params = [u, layer.a_logit, layer.gates.weight]
    for got, want in zip(torch.autograd.grad((fast * weight).sum(), params),
                         torch.autograd.grad((slow * weight).sum(), params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_causal_conv_passes_gradcheck_and_matches_the_decoding_path():
    u = torch.randn(2, 9, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_CausalConv.apply, (u, weight, bias, None))
    short = torch.randn(1, 2, 5, dtype=torch.float64, requires_grad=True)  # shorter than width
    assert torch.autograd.gradcheck(_CausalConv.apply, (short, weight, bias, None))
    # inside documents: no tap reaches back past a document's first token
    offsets = find_documents(torch.tensor([[1, 0, 1, 1, 1, 1, 0, 0, 1]] * 2), 0).offsets
    assert torch.autograd.gradcheck(_CausalConv.apply, (u, weight, bias, offsets))

    config = ChimeraConfig(vocab_size=10, d_model=8, n_heads=2, lru_width=8)
    block = RecurrentBlock(config).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    whole, _ = block._conv(x, None)
    history = torch.zeros(2, 3, 8, dtype=torch.float64)
    stepped = []
    for t in range(9):
        out, history = block._conv(x[:, t:t + 1], history)
        stepped.append(out)
    torch.testing.assert_close(whole, torch.cat(stepped, dim=1))
