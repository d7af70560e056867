"""Small building blocks shared by the Chimera blocks: RMSNorm, SwiGLU MLP and RoPE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, with gate and up fused into one matmul."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class PlainMLP(nn.Module):
    """``down(act(up(x)))`` with GeLU or squared ReLU (So et al. 2021, Primer): two matrices
    where SwiGLU has three, so the same hidden width costs a third fewer parameters."""

    def __init__(self, d_model: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)
        h = F.gelu(h, approximate="tanh") if self.activation == "gelu" else F.relu(h).square()
        return self.down(h)


def make_mlp(d_model: int, hidden: int, mlp_type: str) -> nn.Module:
    return SwiGLU(d_model, hidden) if mlp_type == "swiglu" else PlainMLP(d_model, hidden,
                                                                       mlp_type)


def mlp_params(d_model: int, hidden: int, mlp_type: str) -> int:
    return (3 if mlp_type == "swiglu" else 2) * d_model * hidden


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (GPT-NeoX half rotation) with NTK-aware base scaling.

    NTK-aware scaling stretches the wavelengths instead of interpolating positions: the base
    becomes ``theta * s ** (d / (d - 2))`` so the highest frequency is unchanged and the lowest is
    slowed by ``s``, letting a model trained on length L attend over roughly ``s * L``.
    """

    def __init__(self, head_dim: int, theta: float, ntk_scale: float = 1.0,
                 table_length: int = 0) -> None:
        super().__init__()
        self.head_dim, self.table_length = head_dim, table_length
        self.base = theta * ntk_scale ** (head_dim / (head_dim - 2)) if ntk_scale > 1 else theta
        # Derived constants, not state: rebuilt from the config, so kept out of checkpoints.
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.register_buffer("cos_table", torch.empty(table_length, head_dim), persistent=False)
        self.register_buffer("sin_table", torch.empty(table_length, head_dim), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Compute the tables (again: transformers builds models on the meta device, and loads
        only what checkpoints hold)."""
        device = self.inv_freq.device
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        self.inv_freq = 1.0 / self.base ** (steps / self.head_dim)
        self.cos_table, self.sin_table = self._angles(0, self.table_length, self.inv_freq)

    @staticmethod
    def _angles(start: int, length: int, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
        positions = torch.arange(start, start + length, device=inv_freq.device,
                                 dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos(), angles.sin()

    def cos_sin(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        """cos and sin of shape (length, head_dim) for positions start..start+length-1: a slice
        of the precomputed table, computed on the fly past its end (decoding may run on)."""
        if start + length <= self.cos_table.shape[0]:
            return self.cos_table[start:start + length], self.sin_table[start:start + length]
        return self._angles(start, length, self.inv_freq)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (..., T, head_dim) by the angles in cos/sin of shape (T, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
