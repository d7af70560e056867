"""``chimera dpo``: preference-tune a chat model directory, with a progress bar, resumable
checkpoints, the preference accuracy before and after on held-out pairs, and a report.

OUT receives the tuned model directory (``model.safetensors``, ``config.json``,
``tokenizer/``), ``dpo.json`` (settings, timings, accuracies, TRL's logged curves),
``dpo.md``, ``dpo_curves.png`` and the pairs it trained on (``dpo-data/train.jsonl``); TRL's
checkpoints go to ``OUT/checkpoints/dpo``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from chimera.checkpoint import CheckpointError, atomic_write, save_model
from chimera.inference import TOKENIZER_DIR, load_pretrained
from cluster.app.promote.stages import DpoProgress
from results.plots import curves_figure
from trainers.dpo import (
    CHECKPOINTS,
    PAIRS_FILE,
    DpoResult,
    DpoSettings,
    loss_label,
    preference_accuracy,
    preference_tune,
    training_pairs,
)

METRICS_FILE, REPORT_FILE, CURVES_FILE = "dpo.json", "dpo.md", "dpo_curves.png"


def _check_out(model_dir: Path, out: Path) -> None:
    if out.resolve() == model_dir.resolve():
        raise CheckpointError(f"--out {out} is the model directory itself: DPO writes a new "
                              f"model and never replaces the one it starts from")
    ours = (out / METRICS_FILE).exists() or (out / CHECKPOINTS).is_dir()
    if (out / "model.safetensors").exists() and not ours:
        raise CheckpointError(f"--out {out} holds a model that chimera dpo did not write; "
                              f"choose another --out")


def run_dpo(model_dir: str | Path, out: str | Path, train: list[dict], heldout: list[dict],
            settings: DpoSettings, console: Console, device: str = "cpu",
            source: str = "") -> dict:
    """Tune the model in ``model_dir`` on ``train`` pairs; score ``heldout`` pairs before and
    after; write OUT (see the module docstring). Returns the metrics."""
    model_dir, out = Path(model_dir), Path(out)
    _check_out(model_dir, out)
    done = _finished(out)
    if done is not None:
        if done["settings"] == dataclasses.asdict(settings) and \
                done["train_pairs"] == len(train):
            console.print(f"  {out}: this DPO is done already ({out / REPORT_FILE})")
            return done
        raise CheckpointError(f"{out / METRICS_FILE}: a finished DPO with other settings or "
                              f"data; choose another --out")
    model, tokenizer = load_pretrained(model_dir, device=device)
    if tokenizer.chat_template is None:
        raise CheckpointError(f"{model_dir / TOKENIZER_DIR}: the tokenizer has no chat "
                              f"template; DPO tunes a chat model (chimera sft makes one)")
    before = preference_accuracy(model, tokenizer, heldout)
    console.print(f"  held-out preference accuracy before: {before['accuracy']:.1%} of "
                  f"{before['pairs']} pairs (margin {before['margin']:.3f} nats)")
    out.mkdir(parents=True, exist_ok=True)
    with DpoProgress(console, settings.steps) as progress:
        began = time.perf_counter()
        train, own = training_pairs(model, tokenizer, train, settings, out / PAIRS_FILE,
                                    progress.answering)
        if own is not None:
            console.print(f"  own mistakes: the model answers {own} of {len(train)} training "
                          f"questions wrong; those answers are the rejected replies")
        answering = time.perf_counter() - began
        tuned, result = preference_tune(model, tokenizer, train, settings, out / CHECKPOINTS,
                                        device, on_progress=progress)
    after = preference_accuracy(tuned, tokenizer, heldout)
    save_model(tuned, out)
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    metrics = {"model": str(model_dir), "source": source, "train_pairs": len(train),
               "own_mistakes": own,
               "settings": dataclasses.asdict(settings), "steps": result.steps,
               # Training over every attempt, and this one's answering (own mistakes).
               "seconds": result.seconds + answering, "resumed_from_step": result.resumed_from,
               "heldout": {"before": before, "after": after}, "history": result.history}
    _write_report(out, metrics, result)  # dpo.json last: it marks the tuned model complete
    # TRL's checkpoints hold optimizer states (twice the model): done with, they go.
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    try:
        (out / CHECKPOINTS).parent.rmdir()  # checkpoints/, unless something else is in it
    except OSError:
        pass
    return metrics


def _finished(out: Path) -> dict | None:
    try:
        return json.loads((out / METRICS_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{out / METRICS_FILE}: unreadable ({err}); move it away to "
                              f"tune into {out} again") from None


def _write_report(out: Path, metrics: dict, result: DpoResult) -> None:
    figure = curves_figure({
        "loss": [(h["step"], h["loss"]) for h in result.history if "step" in h],
        "reward margin": [(h["step"], h["rewards/margins"]) for h in result.history
                          if "rewards/margins" in h],
    }, "optimizer step", "nats", "DPO")
    atomic_write(out / CURVES_FILE, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    before, after = metrics["heldout"]["before"], metrics["heldout"]["after"]
    s = metrics["settings"]
    text = (f"# DPO of {metrics['model']}\n\n"
            f"{metrics['train_pairs']} training pairs ({metrics['source'] or 'given'}), "
            f"{metrics['steps']} steps of {s['batch_size']} in {metrics['seconds'] / 60:.1f} "
            f"min; loss {loss_label(s['loss_type'], s['sft_weight'])}"
            + f", beta {s['beta']}, learning rate {s['learning_rate']:g}."
            + ("" if metrics["own_mistakes"] is None else
               f" Rejected replies: the model's own wrong answer on {metrics['own_mistakes']} "
               f"pairs, a constructed one on the rest.")
            + "\n\n"
            "| held-out pairs | before | after |\n|---|---|---|\n"
            f"| preference accuracy (chosen likelier) | {before['accuracy']:.1%} | "
            f"{after['accuracy']:.1%} |\n"
            f"| mean margin, nats | {before['margin']:.3f} | {after['margin']:.3f} |\n\n"
            f"Pairs scored: {after['pairs']} ({after['too_long']} longer than the context "
            f"left out).\n\n![curves]({CURVES_FILE})\n")
    atomic_write(out / REPORT_FILE, lambda tmp: Path(tmp).write_text(text))
    atomic_write(out / METRICS_FILE, lambda tmp: Path(tmp).write_text(
        json.dumps(metrics, indent=2) + "\n"))
