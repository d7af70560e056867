"""The evaluation's samples and ``report.md`` / ``metrics.json`` / ``loss_curves.png``."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path

import torch

from chimera.chat import reply
from chimera.checkpoint import atomic_write
from chimera.generation import SamplingConfig, generate
from chimera.model import Chimera
from cluster.app.promote.preflight import EvaluationPlan
from cluster.app.promote.settings import STORY_PROMPT
from results.plots import curves_figure
from trainers.dpo import loss_label
from trainers.fit import History
from trainers.store import TokenStore


def sample_outputs(base: Chimera, chat: Chimera, tokenizer, seed: int,
                   evaluation: EvaluationPlan) -> dict:
    """The samples in report.md, from the prompts the preflight chose (each fits the context
    with room for its reply)."""
    sampling = SamplingConfig(max_new_tokens=evaluation.sample_tokens, temperature=0.8,
                              top_p=0.95, seed=seed)
    prompt = evaluation.story_prompt
    story = tokenizer.decode(generate(base, prompt, sampling), skip_special_tokens=True)
    chats = [{"user": q, "assistant": reply(chat, tokenizer, [{"role": "user", "content": q}],
                                            sampling)} for q in evaluation.questions]
    item = evaluation.sample_item
    if item is not None:
        chats.append({"user": item["messages"][0]["content"], "assistant": reply(
            chat, tokenizer, item["messages"], dataclasses.replace(
                sampling, temperature=0.0, max_new_tokens=evaluation.sample_item_tokens)),
            "expected": item["expected"]})
    return {"base_story": evaluation.story_text + story, "chat": chats}


def _finalists(m: dict) -> str:
    """The finalists pretraining ranked, when it ranked any (finalists.py)."""
    if not m.get("finalists"):
        return ""
    rows = "\n".join(f"| #{f['candidate_id']} | `{f['genome_summary']}` | "
                     f"{f['params'] / 1e6:.2f}M | {f['dropout']:g} | {f['step']:,} | "
                     f"{f['val_bpb']:.4f} |" for f in m["finalists"])
    return f"""
## Finalists

Pretraining's time was shared by the search's winner and larger candidates; the one with the
best validation is the base model (the others are in `finalists/`).

| candidate | genome | parameters | dropout | steps | validation bpb |
|---|---|---|---|---|---|
{rows}
"""


def _share(value: float | None) -> str:
    return "not measured (see the notes)" if value is None else f"{value:.1%}"


def hardware(device: str) -> str:
    text = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def write_report(out: Path, metrics: dict, pre: History, sft: History,
                 store: TokenStore) -> None:
    figure = curves_figure({
        "pretrain train": [(s, loss) for s, loss, _ in pre.train],
        "pretrain val": list(pre.val),
        "sft train (assistant tokens)": [(pre.train[-1][0] + s, loss)
                                         for s, loss, _ in sft.train],
        "sft val (assistant tokens)": [(pre.train[-1][0] + s, v) for s, v in sft.val],
    }, "optimizer step", "loss (nats/token)", f"candidate #{metrics['candidate_id']}")
    atomic_write(out / "loss_curves.png", lambda tmp: figure.savefig(tmp, format="png",
                                                                       dpi=120))
    atomic_write(out / "metrics.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2) + "\n"))
    m = metrics
    hp = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                   for k, v in {**m["hparams"], "dropout": m["dropout"]}.items())
    chats = "\n\n".join(f"**user:** {c['user'][:300]}\n\n**chimera:** {c['assistant']}"
                        for c in m["samples"]["chat"])
    during = "\n".join(f"- {step}: {text}" for step, text in m["pretrain"]["samples"]) \
        or "(none: data-parallel workers do not sample)"
    seconds = ", ".join(f"{k} {v / 60:.1f} min" for k, v in m["seconds"].items())
    search_bpb = f"{m['search_val_bpb']:.4f}" if m["search_val_bpb"] is not None else "n/a"
    attempts = f", over {m['attempts']} runs of the command (resumed)" \
        if m.get("attempts", 1) > 1 else ""
    notes = ("\n## Notes\n\n" + "\n".join(f"- {n}" for n in m["notes"]) + "\n") \
        if m.get("notes") else ""
    text = f"""# Chimera promoted model: candidate #{m['candidate_id']}

Genome: `{m['genome_summary']}` ({m['params'] / 1e6:.2f}M parameters)

```json
{json.dumps(m['genome'], indent=2)}
```

## Results

| metric | value |
|---|---|
| search validation bpb (short budget) | {search_bpb} |
| pretrained validation bpb ({m['pretrain']['tokens']:,} tokens) | {m['pretrain']['val_bpb']:.4f} |
| SFT validation loss, assistant tokens (nats) | {m['sft']['val_loss_assistant_tokens']:.4f} |
| held-out text bpb (validation split), base model | {m['heldout_bpb']['base']:.4f} |
| held-out text bpb (validation split), chat model | {m['heldout_bpb']['chat']:.4f} |
| held-out question answering, base model | {_share(m['qa_accuracy']['base'])} |
| held-out question answering, chat model | {_share(m['qa_accuracy']['chat'])} |
| questions (from {m['qa_accuracy']['source']}) | {m['qa_accuracy']['questions']} |

![loss curves](loss_curves.png)
{_finalists(m)}{_preference_tuning(m)}
## Hyperparameters

{_refinement(m)}

| hyperparameter | value |
|---|---|
{hp}

{_fine_tuning(m['sft'])}

## Samples

Base model, from "{STORY_PROMPT}":

> {m['samples']['base_story']}

During pretraining (step: sample):

{during}

Chat model:

{chats}

## Time and hardware

{seconds}; total {m['total_seconds'] / 60:.1f} min on {m['hardware']}{attempts}.
{notes}"""
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))


def _refinement(m: dict) -> str:
    """The refinement stage in a sentence: the study, or why there was none."""
    refined, seconds = m["refine"], m["seconds"]
    share = f"{seconds.get('refine', 0.0) / max(m['total_seconds'], 1e-9):.0%} of the promote"
    if refined.get("skipped"):
        return f"Not refined ({refined['skipped']}): the search's hyperparameters."
    return (f"Refined by Optuna ({share}): study `{refined['study']}` in the run's database, "
            f"{refined['complete']} trials complete, {refined['pruned']} pruned, "
            f"{refined['failed']} failed, {refined['tokens_per_trial']:,} tokens per trial; "
            f"best trial {refined['best_trial_bpb']:.4f} bpb.")


def _preference_tuning(m: dict) -> str:
    """With --dpo: the DPO stage in a sentence and the base, SFT and SFT+DPO models side by
    side, as a section (with its blank lines); nothing without --dpo."""
    if "dpo" not in m:
        return ""
    dpo, s = m["dpo"], m["dpo"]["settings"]
    pref = m["preference_accuracy"]

    def row(label: str, values: dict, show) -> str:
        return f"| {label} | " + " | ".join(show(values.get(name))
                                             for name in ("base", "sft", "chat")) + " |"

    loss = loss_label(s["loss_type"], s["sft_weight"])
    own = "" if dpo.get("own_mistakes") is None else \
        f"; on {dpo['own_mistakes']:,} pairs the SFT model's own wrong answer"
    resumed = f", resumed from step {dpo['resumed_from_step']}" \
        if dpo.get("resumed_from_step") else ""
    rows = "\n".join([
        row(f"question answering ({m['qa_accuracy']['questions']} questions)",
            m["qa_accuracy"], _share),
        row(f"preference accuracy, chosen reply likelier ({pref['pairs']} pairs)", pref,
            _share),
        row("mean preference margin (nats)", pref["margin"], lambda v: f"{v:.3f}"),
        row("text bpb (validation split)", m["heldout_bpb"], lambda v: f"{v:.4f}")])
    return f"""
## Preference tuning (DPO)

{dpo['steps']} steps of {s['batch_size']} pairs on {dpo['pairs']:,} preference pairs made from \
{dpo['source']} (the right answer to a reading question chosen over a wrong one{own}), \
loss {loss}, beta {s['beta']}, learning rate {s['learning_rate']:g}, \
{dpo['seconds'] / 60:.1f} min{resumed}. The chat model of the results above is the SFT+DPO one; \
the SFT model is kept in `sft/`.

| held-out | base | SFT | SFT+DPO |
|---|---|---|---|
{rows}
"""


def _fine_tuning(sft: dict) -> str:
    """The fine-tuning stage in a sentence: its data and how the loss was taken."""
    return (f"Chat fine-tuning: {sft['steps']} steps on {sft['conversations']} conversations "
            f"made from {sft['source']} ({sft['dropped_too_long']} too long, left out), loss "
            f"on assistant tokens only; {sft['pretrain_mix']:.0%} of each batch's rows plain "
            f"training text, loss on every token.")
