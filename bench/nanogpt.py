"""A nanoGPT-style baseline for the end-to-end bench, and the wall-clock training loop that every
baseline of that bench (this model and the Chimera presets) trains with.

The model is GPT-2 in miniature: learned absolute positions, pre-LayerNorm blocks of full causal
attention (torch SDPA) and a 4x GELU MLP, dropout on the embedding and the residual branches,
the output head tied to the token embedding. Its
``forward`` returns ``(logits, None)`` like ``chimera.model.Chimera``, so Chimera's optimizer step
(``trainers.steps.train_step``: AdamW with decay on matrices only, clipping at 1.0, the warmup +
cosine schedule) trains it unchanged, on the same store batches as the presets.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.checkpoints import cpu_weights
from trainers.plateau import PlateauDecay
from trainers.recipe import TrainHparams, evaluate, make_optimizer
from trainers.steps import NonFiniteLoss, train_step
from trainers.store import TokenStore

# nanoGPT's small-data recipe (its shakespeare config) at the bench's lr and batch: beta2 0.99
# because with few tokens per step the second-moment estimate needs the longer memory.
NANOGPT_HPARAMS = TrainHparams(learning_rate=2e-3, min_lr_fraction=0.1, warmup_fraction=0.05,
                               weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
                               batch_size=8, seq_len=256, eval_batches=8, optimizer="adamw")
HEAD_DIM = 32  # sweep widths keep this head size, so only width and dropout change


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    dropout: float = 0.1
    block_size: int = NANOGPT_HPARAMS.seq_len  # the longest context (learned positions)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_proj = nn.Linear(d, d, bias=False)
        self.mlp_fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp_proj = nn.Linear(4 * d, d, bias=False)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, time_steps, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, time_steps, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        # No dropout on the attention weights (Chimera has none either): for dropout_p > 0
        # torch's CPU SDPA leaves its fused kernel and an attention layer gets ~5x slower, a
        # handicap at equal wall clock. The residual and embedding dropout regularise.
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attended = attended.transpose(1, 2).reshape(batch, time_steps, width)
        x = x + self.resid_drop(self.attn_proj(attended))
        return x + self.resid_drop(self.mlp_proj(F.gelu(self.mlp_fc(self.ln_2(x)))))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.d_model % config.n_heads:
            raise ValueError(f"d_model {config.d_model} is not a multiple of n_heads "
                             f"{config.n_heads}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        # GPT-2's init: N(0, 0.02), the residual projections shrunk by 1/sqrt(2L) so the
        # residual stream does not grow with depth.
        for name, param in self.named_parameters():
            if param.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.n_layers) if name.endswith("proj.weight") \
                    else 0.02
                nn.init.normal_(param, std=std)

    def forward(self, tokens: Tensor, cache=None) -> tuple[Tensor, None]:
        """tokens (B, T) -> logits (B, T, vocab); the None stands where Chimera returns a
        cache, so the project's training step and evaluation run this model as they are."""
        if tokens.shape[1] > self.config.block_size:
            raise ValueError(f"{tokens.shape[1]} tokens exceed block_size "
                             f"{self.config.block_size}")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.tok_emb.weight), None


def sweep_config(vocab_size: int, d_model: int, dropout: float) -> GPTConfig:
    return GPTConfig(vocab_size, d_model=d_model, n_heads=d_model // HEAD_DIM, dropout=dropout)


@dataclass
class TimedRun:
    """What ``train_for_seconds`` did: the best validation state and how it got there."""

    best_state: dict[str, Tensor]
    best_val_loss: float
    best_step: int
    steps: int = 0
    tokens: int = 0
    train_seconds: float = 0.0  # in optimizer steps only (evaluations left out)
    diverged: bool = False
    decay_step: int | None = None  # with a plateau decay: the step it began at
    val_history: list[tuple[int, float]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.train_seconds, 1e-9)


def train_for_seconds(model: nn.Module, hparams: TrainHparams, store: TokenStore,
                      deadline: float, *, seed: int, evaluations: int = 10,
                      device: str = "cpu", plateau_patience: int = 0) -> TimedRun:
    """Train until ``deadline`` (a ``time.time()``), the schedule's progress being the share of
    the wall clock spent, so warmup and cosine decay span the budget whatever the step time.
    Evaluates on the store's validation windows ``evaluations`` times, evenly in time, and at
    the end; returns the best evaluated state (a careful user's early stopping). A diverged
    loss ends training early, keeping the best state so far. ``plateau_patience``: Chimera's
    plateau decay (``trainers.plateau``), as its pretraining runs it."""
    device = torch.device(device)
    optimizer = make_optimizer(model, hparams)
    validation = store.validation_batches(hparams.batch_size, hparams.seq_len,
                                          hparams.eval_batches)
    start = time.time()
    span = max(deadline - start, 1e-9)
    run = TimedRun({}, math.inf, 0)
    next_eval, eval_seconds, step_seconds = start + span / evaluations, 0.0, 0.0
    plateau = PlateauDecay(plateau_patience) if plateau_patience else None

    def progress() -> float:
        return min(1.0, (time.time() - start) / span)

    def checkpoint() -> float:
        began = time.time()
        loss = evaluate(model, validation, device)
        run.val_history.append((run.steps, loss))
        if loss < run.best_val_loss:
            run.best_val_loss, run.best_step = loss, run.steps
            run.best_state = cpu_weights(model)
        if plateau is not None and plateau.observe(loss, progress(), hparams, model):
            if plateau.restart_weights is not None:
                model.load_state_dict(plateau.restart_weights)
            run.decay_step = run.steps
        return time.time() - began

    model.train()
    # Stop while the final evaluation still fits: the budget is the whole wall clock.
    while time.time() + step_seconds + eval_seconds < deadline:
        began, now = time.time(), progress()
        if plateau is not None and plateau.finished(now):
            break
        batch = store.sample("train", hparams.batch_size, hparams.seq_len, seed, run.steps)
        rate = None if plateau is None else plateau.learning_rate(now, hparams)
        try:
            train_step(model, optimizer, (batch, None), hparams, progress=now, step=run.steps,
                       device=device, learning_rate=rate)
        except NonFiniteLoss:
            run.diverged = True
            break
        step_seconds = time.time() - began
        run.steps, run.tokens = run.steps + 1, run.tokens + batch.shape[0] * hparams.seq_len
        run.train_seconds += step_seconds
        if time.time() >= next_eval:
            eval_seconds = checkpoint()
            next_eval += span / evaluations
    if not run.val_history or run.val_history[-1][0] != run.steps:
        checkpoint()  # a diverged step left the weights as they were: they still count
    if run.best_state:
        model.load_state_dict(run.best_state)
    return run
