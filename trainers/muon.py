"""Muon (Jordan et al., 2024): momentum SGD whose update is orthogonalised by a quintic
Newton-Schulz iteration, for the 2-D weights between the embedding and the output head.

``torch.optim.Muon`` runs the iteration in bf16, which on a CPU without bf16 matrix units is
several times slower than fp32: with it, a 0.24M-parameter genome of the kind a CPU search picks
trained at 0.54x AdamW's tokens/s, the ``tiny`` preset at 0.26x (bench/recipe_pairs.py). This one
iterates in fp32 on CPU (bf16 on CUDA, as the reference does) and stacks the matrices of one shape
into one batched product: 0.94x and 0.90x of AdamW's tokens/s. The update is scaled to AdamW's
RMS (Moonlight's ``match_rms_adamw``: 0.2 * sqrt(max(rows, cols))), so one learning rate and one
weight decay mean the same for both optimizers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch

# The quintic's coefficients, chosen to maximise its slope at zero (Jordan's Muon).
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
RMS_MATCH = 0.2  # AdamW's typical update RMS, which Muon's is scaled to (Moonlight)


def orthogonalise(matrices: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The Newton-Schulz approximation of U V^T for each (rows, cols) matrix of a stack
    (N, rows, cols) with SVD U S V^T: its singular values brought near 1 (within about
    0.7-1.2, which works as well as exactly 1 and costs five iterations)."""
    a, b, c = NEWTON_SCHULZ
    x = matrices.bfloat16() if matrices.is_cuda else matrices.float()
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.mT).to(matrices.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters, with decoupled weight decay and Nesterov momentum."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "nesterov": nesterov, "ns_steps": ns_steps})
        for group in self.param_groups:
            for param in group["params"]:
                if param.dim() != 2:
                    raise ValueError(f"Muon takes 2-D parameters, not {tuple(param.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            momentum, lr = group["momentum"], group["lr"]
            by_shape: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                by_shape[param.shape].append((param, update))
            for shape, pairs in by_shape.items():
                updates = orthogonalise(torch.stack([update for _, update in pairs]),
                                        group["ns_steps"])
                scaled = lr * RMS_MATCH * math.sqrt(max(shape))
                for (param, _), update in zip(pairs, updates, strict=True):
                    param.mul_(1 - lr * group["weight_decay"])
                    param.add_(update, alpha=-scaled)
