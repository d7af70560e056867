"""The fused C++ kernels (chimera/csrc) against the eager PyTorch paths they replace."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chimera.kernels import fused_ops
from chimera.recurrent import causal_conv, gelu_gate
from chimera.rglru import RGLRU, rg_lru

if fused_ops() is None:
    if os.environ.get("CI"):
        pytest.fail("the fused kernels must build in CI (gcc, ninja and Python headers)",
                    pytrace=False)
    pytest.skip("no C++ toolchain here: the fused kernels could not be built",
                allow_module_level=True)


def _outputs_and_grads(fn, inputs, params, fused):
    out = fn(*inputs, fused=fused)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    wanted = [t for t in (*inputs, *params) if isinstance(t, torch.Tensor) and t.requires_grad]
    return [out, *torch.autograd.grad((out * weight).sum(), wanted)]


def _assert_fused_equals_eager(fn, inputs, params=(), rtol=1e-5, atol=1e-5):
    fused = _outputs_and_grads(fn, inputs, params, fused=True)
    eager = _outputs_and_grads(fn, inputs, params, fused=False)
    for got, want in zip(fused, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("batch,length,width,heads,with_state", [
    (3, 50, 16, 4, True),     # fewer batch rows than 2 x threads: rows cut into head ranges
    (9, 33, 32, 2, False),    # whole rows per work item
    (1, 2, 8, 1, True),       # the shortest sequence the kernel sees
])
def test_fused_rg_lru_equals_the_eager_function(batch, length, width, heads, with_state):
    torch.manual_seed(0)
    layer = RGLRU(width, heads)
    u = torch.randn(batch, length, width, requires_grad=True)
    h0 = torch.randn(batch, width, requires_grad=True) if with_state else None
    # the block-diagonal layer hands over a block-major view, as in the model
    assert layer.gates(u).is_contiguous() == (heads == 1)

    def run(u, h0, fused):
        return rg_lru(u, layer.gates(u), layer.a_logit, h0, fused=fused)

    _assert_fused_equals_eager(run, (u, h0), params=(layer.a_logit, layer.gates.weight,
                                                      layer.gates.bias))


def _document_starts(batch: int, length: int, seed: int = 3) -> torch.Tensor:
    starts = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) < 0.2
    starts[0, 0] = True  # a start at position 0 too, and one right after it
    starts[0, 1] = True
    return starts


@pytest.mark.parametrize("heads,with_state", [(4, True), (1, False)])
def test_fused_rg_lru_with_document_resets_equals_the_eager_function(heads, with_state):
    torch.manual_seed(0)
    batch, length, width = 3, 41, 16
    layer = RGLRU(width, heads)
    u = torch.randn(batch, length, width, requires_grad=True)
    h0 = torch.randn(batch, width, requires_grad=True) if with_state else None
    reset = _document_starts(batch, length)

    def run(u, h0, fused):
        return rg_lru(u, layer.gates(u), layer.a_logit, h0, reset, fused=fused)

    _assert_fused_equals_eager(run, (u, h0), params=(layer.a_logit, layer.gates.weight,
                                                      layer.gates.bias))


@pytest.mark.parametrize("length", [2, 5, 37])
def test_fused_causal_conv_inside_documents_equals_the_eager_function(length):
    from chimera.documents import find_documents

    tokens = torch.where(_document_starts(3, length), 0, 1)
    offsets = find_documents(tokens, 0).offsets
    u = torch.randn(3, length, 24, requires_grad=True)
    weight = torch.randn(4, 24, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)

    def run(u, weight, bias, fused):
        return causal_conv(u, weight, bias, offsets, fused=fused)

    _assert_fused_equals_eager(run, (u, weight, bias))


def test_fused_rg_lru_stays_finite_at_saturated_gates():
    layer = RGLRU(8, 2)
    u = torch.randn(2, 20, 8, requires_grad=True)
    gates = (torch.randn(2, 20, 2, 8) * 200).requires_grad_()  # sigmoid fully saturated
    h = rg_lru(u, gates, layer.a_logit)
    h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(u.grad).all()
    assert torch.isfinite(gates.grad).all()
    torch.testing.assert_close(h, rg_lru(u, gates, layer.a_logit, fused=False))


@pytest.mark.parametrize("length", [1, 3, 4, 37])
def test_fused_causal_conv_equals_the_eager_function(length):
    u = torch.randn(3, length, 24, requires_grad=True)
    weight = torch.randn(4, 24, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    _assert_fused_equals_eager(causal_conv, (u, weight, bias))


def test_fused_gelu_gate_equals_the_eager_expression():
    h = torch.randn(4, 33, 40, requires_grad=True)
    gate = (torch.randn(4, 33, 40) * 4).requires_grad_()  # well into both tails
    _assert_fused_equals_eager(gelu_gate, (h, gate))


def test_loading_the_kernels_keeps_denormals():
    # -ffast-math at link time would set flush-to-zero for the whole process on load.
    assert fused_ops() is not None
    assert (torch.tensor(1e-40) * 1.0).item() != 0.0


def test_the_kernels_can_be_switched_off():
    code = ("from chimera.kernels import fused_ops; from chimera.rglru import rg_lru; "
            "import torch; assert fused_ops() is None; "
            "print(rg_lru(torch.randn(1, 4, 8), torch.randn(1, 4, 2, 8), torch.zeros(8)).shape)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "CHIMERA_FUSED_KERNELS": "0"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 4, 8])" in result.stdout


def test_a_builder_killed_mid_build_does_not_block_later_builds(tmp_path):
    # torch's lock file, left behind by a builder that died, is cleared; our own lock dies with
    # its holder, so the next process gets it at once.
    from chimera.kernels import _exclusive_build

    build = tmp_path / "chimera_kernels"
    build.mkdir()
    (build / "lock").touch()  # what a killed torch build leaves
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from chimera.kernels import _exclusive_build\n"
         f"with _exclusive_build(Path({str(build)!r})):\n"
         "    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not (build / "lock").exists()
        (build / "lock").touch()  # the holder is now a builder killed mid-build
    finally:
        holder.kill()
        holder.wait()
    with _exclusive_build(build):  # would wait forever on a lock that outlived its holder
        assert not (build / "lock").exists()
