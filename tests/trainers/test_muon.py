"""Chimera's Muon: the Newton-Schulz iteration orthogonalises, and a step is the library's step
(``torch.optim.Muon``, which iterates in bf16) to bf16's precision, matrices of every shape."""

import pytest
import torch

from trainers.muon import Muon, orthogonalise


@pytest.mark.parametrize("shape", [(3, 16, 48), (2, 48, 16), (1, 32, 32)])
def test_the_iteration_brings_every_singular_value_near_one(shape):
    matrices = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    singular = torch.linalg.svdvals(orthogonalise(matrices))
    # The quintic trades exactness for speed: about 0.7-1.2 after five steps (Jordan's Muon).
    assert singular.min() > 0.6 and singular.max() < 1.25
    assert orthogonalise(matrices).shape == matrices.shape


def test_a_stack_is_each_matrix_on_its_own():
    matrices = torch.randn(3, 8, 24, generator=torch.Generator().manual_seed(1))
    stacked = orthogonalise(matrices)
    for index in range(3):
        assert torch.allclose(stacked[index], orthogonalise(matrices[index:index + 1])[0],
                              atol=1e-5)


def test_steps_match_torch_optim_muon_to_bf16_precision():
    generator = torch.Generator().manual_seed(2)
    shapes = [(16, 48), (48, 16), (16, 48), (32, 32)]  # two of one shape: one batched product
    ours = [torch.nn.Parameter(torch.randn(*s, generator=generator)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    mine = Muon(ours, lr=0.02, weight_decay=0.1)
    library = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grads = [torch.randn(*s, generator=generator) for s in shapes]
        for params, optimizer in ((ours, mine), (theirs, library)):
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.clone()
            optimizer.step()
    for a, b, before in zip(ours, theirs, start, strict=True):
        assert (a - before).abs().max() > 1e-2  # the steps moved the weights ...
        assert torch.allclose(a, b, atol=5e-4, rtol=0), (a - b).abs().max()  # ... alike


def test_muon_refuses_a_tensor_that_is_not_a_matrix():
    with pytest.raises(ValueError, match=r"2-D parameters, not \(4, 3, 2\)"):
        Muon([torch.nn.Parameter(torch.zeros(4, 3, 2))], lr=0.01, weight_decay=0.0)
