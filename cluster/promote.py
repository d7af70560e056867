"""``chimera promote``: the search's winner becomes a chat model.

    refine (Optuna on Ray) -> pretrain (packed, checkpointed; Ray Train with several workers)
        -> chat fine-tune (assistant-only loss) -> evaluate -> model directory

The model directory::

    model.safetensors, config.json   the chat model (``chimera generate`` / ``chat`` load it)
    tokenizer/                       with the chat template
    base/                            the pretrained model before fine-tuning
    sft-data/train.jsonl, val.jsonl  the conversations it was fine-tuned on
    checkpoints/pretrain, /sft       full training state (resume; removed when done)
    report.md, metrics.json, loss_curves.png

Every stage resumes: run the same command again after a crash or Ctrl+C and the Optuna study,
the pretraining and the fine-tuning continue where they stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from chimera.chat import reply
from chimera.checkpoint import atomic_write, load_model, save_model
from chimera.config import ChimeraConfig
from chimera.generation import SamplingConfig, generate
from chimera.inference import TOKENIZER_DIR
from chimera.model import Chimera, param_counts_analytic
from chimera.tokenizer import load_tokenizer
from cluster.refine import RayTrials, TrialSpec, train_trial_rung, tuned
from results.db import RunDatabase, database_url
from results.plots import curves_figure
from search.genome import Genome
from search.refine import TUNED, InProcessTrials, RefineSettings, open_study, refine
from trainers.fit import FitResult, FitSettings, History, StepReport, fit
from trainers.instructions import conversations, qa_items
from trainers.pretrain import PretrainPlan, pretrain, steps_for_tokens
from trainers.recipe import TrainHparams
from trainers.sft import (
    ChatBatches,
    ensure_chat_tokens,
    fitting,
    qa_accuracy,
    write_conversations,
)
from trainers.store import TokenStore

BASE_DIR = "base"
STORY_PROMPT = "Once upon a time, there was a little"
SAMPLE_QUESTIONS = ["Hello!", "Tell me a story about Lily at the park.", "What can you do?"]


class PromoteError(ValueError):
    """A run or model that cannot be promoted as asked."""


@dataclass(frozen=True)
class PromoteSettings:
    run_dir: str
    candidate_id: int | None = None  # None: the best candidate
    out: str | None = None  # None: RUN/promoted
    refine: RefineSettings = RefineSettings(trials=8, rungs=4, parallel=2)
    # Tokens per trial; None: the pretraining budget. Hyperband's top rung is then the run the
    # winner gets, so the study ranks hyperparameters by what pretraining will make of them
    # (shorter trials favour rates and batch sizes that do not transfer), and the lower rungs
    # are where it saves compute.
    refine_tokens: int | None = None
    pretrain_tokens: int = 1_200_000
    max_seq_len: int = 512  # the chat model's context
    sft_steps: int = 400
    sft_conversations: int = 4000
    sft_hparams: TrainHparams = TrainHparams(learning_rate=1e-3, warmup_fraction=0.05,
                                             batch_size=16, seq_len=320, eval_batches=4,
                                             weight_decay=0.0)
    qa_questions: int = 100
    train_workers: int = 1  # Ray Train workers for pretraining; 1: in this process
    in_process: bool = False  # refinement trials in this process instead of on Ray actors
    address: str | None = None
    device: str = "cpu"
    compile: bool = False
    seed: int = 0

    @property
    def out_dir(self) -> Path:
        return Path(self.out or Path(self.run_dir) / "promoted")


# ----------------------------------------------------------------------------- the winner
def winner(run_dir: str, candidate_id: int | None):
    """The candidate to promote: (id, genome, the run's ``EvolveSettings``)."""
    from cluster.evolve import load_settings

    try:
        settings = load_settings(run_dir)
    except FileNotFoundError:
        raise PromoteError(f"{run_dir}: not a run directory (no run.json); run `chimera "
                           f"evolve` first") from None
    db = RunDatabase(settings.database_target, readonly=True)
    try:
        rows = db.leaderboard()
    finally:
        db.close()
    if not rows:
        raise PromoteError(f"{run_dir}: no candidate finished ok; nothing to promote")
    if candidate_id is not None:
        rows = [r for r in rows if r["id"] == candidate_id]
        if not rows:
            raise PromoteError(f"{run_dir}: candidate {candidate_id} did not finish ok (or "
                               f"does not exist); see `chimera leaderboard {run_dir}`")
    row = rows[0]
    return row["id"], Genome.from_dict(json.loads(row["genome"])), settings


# ----------------------------------------------------------------------------- progress
class StepProgress:
    """A rich progress bar fed by ``fit``'s step reports: loss, bpb, tokens/s, ETA."""

    def __init__(self, console: Console, label: str, total: int, store: TokenStore | None
                 ) -> None:
        self.store = store
        self.progress = Progress(
            TextColumn(f"[bold]{label}[/bold]"), BarColumn(), TextColumn("{task.completed}/"
                                                                         "{task.total}"),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, transient=False, disable=not console.is_terminal)
        self.task = self.progress.add_task(label, total=total, stats="")
        self.val = ""
        # Without a terminal (a log file, a Ray job) a bar cannot redraw: print a line at
        # every tenth of the run and at every evaluation instead.
        self.console, self.label, self.total = console, label, total
        self.lines = not console.is_terminal

    def __enter__(self) -> StepProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, report: StepReport) -> None:
        bpb = (f" bpb {self.store.bits_per_byte(report.loss, 'train'):.3f}"
               if self.store is not None else "")
        if report.val_loss is not None:
            self.val = f" val {report.val_loss:.3f}"
        speed = f" {report.tokens_per_second:,.0f} tok/s" if report.tokens_per_second else ""
        stats = f"loss {report.loss:.3f}{bpb}{self.val}{speed}"
        self.progress.update(self.task, completed=report.step, stats=stats)
        if self.lines and (report.val_loss is not None
                           or report.step % max(1, self.total // 10) == 0):
            self.console.print(f"  {self.label} step {report.step}/{self.total}: {stats}",
                               highlight=False)


# ----------------------------------------------------------------------------- stages
def run_refinement(settings: PromoteSettings, config: ChimeraConfig, base: TrainHparams,
                   store: TokenStore, database: str, candidate_id: int, console: Console):
    """The Optuna study (stored in the run's database); returns its outcome."""
    refine_settings = dataclasses.replace(settings.refine,
                                          study_name=f"refine-candidate-{candidate_id}",
                                          seed=settings.seed)
    tokens = settings.refine_tokens or settings.pretrain_tokens
    spec = TrialSpec(config, base, str(store.root), tokens, refine_settings.rungs,
                     settings.seed)
    study = open_study(database_url(database), refine_settings)
    defaults = {**{name: getattr(base, name) for name in TUNED if name != "dropout"},
                "dropout": config.dropout}

    def show(report, verdict):
        value = "failed" if report.value is None else f"{report.value:.4f} bpb"
        console.print(f"  trial {report.number} rung {report.rung}/{refine_settings.rungs}: "
                      f"{value} -> {verdict}" + (f" ({report.error})" if report.error else ""))

    if settings.in_process:
        runner = InProcessTrials(lambda params, rung, state: train_trial_rung(
            spec, store, params, rung, state))
        return refine(study, runner, refine_settings, defaults, show), study
    runner = RayTrials(spec, refine_settings.parallel)
    try:
        return refine(study, runner, refine_settings, defaults, show), study
    finally:
        runner.shutdown()


def story_sampler(tokenizer, console: Console, seed: int = 0):
    """A sample generation at each evaluation of pretraining, printed as it comes."""
    prompt = tokenizer(STORY_PROMPT, add_special_tokens=False)["input_ids"]
    sampling = SamplingConfig(max_new_tokens=48, temperature=0.8, top_p=0.95, seed=seed)

    def sample(model: Chimera) -> str:
        text = STORY_PROMPT + tokenizer.decode(generate(model, prompt, sampling),
                                               skip_special_tokens=True)
        console.print(f"  [dim]sample: {text}[/dim]", highlight=False)
        return text

    return sample


def run_pretrain(plan: PretrainPlan, store: TokenStore, out: Path, console: Console,
                 train_workers: int = 1, device: str = "cpu", checkpoints: Path | None = None,
                 sampler=None) -> tuple[Chimera, FitResult]:
    """Pretrain (resuming from ``checkpoints``, default ``out/checkpoints/pretrain``) and save
    the model to ``out``. ``sampler(model) -> text`` makes samples at each evaluation (in this
    process only; Ray Train workers do not sample)."""
    checkpoints = checkpoints or out / "checkpoints" / "pretrain"
    if train_workers > 1:
        from cluster.distributed import pretrain_on_ray

        console.print(f"  data-parallel on {train_workers} Ray Train workers")
        step, history = pretrain_on_ray(plan, store.root, out, checkpoints, train_workers,
                                        use_gpu=device.startswith("cuda"))
        result = FitResult(step, history, interrupted=step < plan.fit.steps)
        return load_model(out), result
    with StepProgress(console, "pretrain", plan.fit.steps, store) as progress:
        model, result = pretrain(plan, store, checkpoints, device, on_step=progress,
                                 sampler=sampler)
    save_model(model, out)
    return model, result


def run_sft(model: Chimera, tokenizer, train: list[dict], val: list[dict],
            hparams: TrainHparams, steps: int, out: Path, console: Console, seed: int = 0,
            device: str = "cpu") -> tuple[Chimera, FitResult, int]:
    """Fine-tune on conversations (resuming from ``out/checkpoints/sft``); returns the model
    (its vocabulary grown if the tokenizer lacked the chat tokens), the result and how many
    conversations were too long for ``hparams.seq_len`` and left out."""
    model, added = ensure_chat_tokens(model, tokenizer)
    if added:
        console.print(f"  added chat tokens {added}; vocabulary now {model.config.vocab_size}")
    if hparams.seq_len > model.config.max_seq_len:
        raise PromoteError(f"SFT seq_len {hparams.seq_len} exceeds the model's max_seq_len "
                           f"{model.config.max_seq_len}")
    batches = ChatBatches([r["messages"] for r in train], [r["messages"] for r in val],
                          tokenizer, hparams, seed)
    settings = FitSettings(steps=steps, eval_every=max(1, steps // 4),
                           checkpoint_every=max(1, steps // 4))
    meta = {"hparams": dataclasses.asdict(hparams), "steps": steps, "seed": seed,
            "config": model.config.to_dict(), "conversations": len(train)}
    with StepProgress(console, "sft", steps, None) as progress:
        result = fit(model.to(device), hparams, batches, settings, out / "checkpoints" / "sft",
                     device, meta=meta, on_step=progress)
    return model, result, batches.dropped


def promote(settings: PromoteSettings, console: Console) -> dict:
    """Run every stage; returns the metrics (also in OUT/metrics.json and OUT/report.md)."""
    from cluster.evolve import STORE_DIR
    from cluster.runtime import start_ray

    started = time.perf_counter()
    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    candidate_id, genome, run = winner(settings.run_dir, settings.candidate_id)
    store = TokenStore.open(Path(settings.run_dir) / STORE_DIR)
    tokenizer = load_tokenizer(store.tokenizer_path)
    config = genome.to_config(store.vocab_size, settings.max_seq_len)
    base = run.hparams
    console.print(f"[bold]promoting[/bold] candidate #{candidate_id} {genome.summary()} "
                  f"({param_counts_analytic(config).total / 1e6:.2f}M parameters) -> {out}")
    timings: dict[str, float] = {}

    ray_started = False
    if not settings.in_process or settings.train_workers > 1:
        ray_started = start_ray(settings.address)
    try:
        # 1. Refinement.
        t0 = time.perf_counter()
        console.rule("refine: Optuna TPE + Hyperband")
        outcome, study = run_refinement(settings, config, base, store, run.database_target,
                                        candidate_id, console)
        timings["refine"] = time.perf_counter() - t0
        console.print(f"  best trial {outcome.best_value:.4f} bpb ({outcome.complete} "
                      f"complete, {outcome.pruned} pruned, {outcome.failed} failed): "
                      f"{outcome.best_params}")
        tuned_config, hparams = tuned(config, base, outcome.best_params)

        # 2. Pretraining.
        t0 = time.perf_counter()
        console.rule("pretrain")
        steps = steps_for_tokens(settings.pretrain_tokens, hparams)
        plan = PretrainPlan(tuned_config, hparams,
                            FitSettings(steps=steps, eval_every=max(1, steps // 8),
                                        checkpoint_every=max(1, steps // 8),
                                        compile=settings.compile), settings.seed)
        _, pre = run_pretrain(plan, store, out / BASE_DIR, console, settings.train_workers,
                              settings.device, out / "checkpoints" / "pretrain",
                              story_sampler(tokenizer, console, settings.seed))
        if pre.interrupted:
            raise KeyboardInterrupt
        tokenizer.save_pretrained(str(out / BASE_DIR / TOKENIZER_DIR))
        timings["pretrain"] = time.perf_counter() - t0
    finally:
        if ray_started:
            import ray

            ray.shutdown()

    # 3. Chat fine-tuning on story instructions.
    t0 = time.perf_counter()
    console.rule("chat fine-tune")
    train = conversations(settings.sft_conversations, settings.seed)
    val = conversations(max(64, settings.sft_conversations // 20), settings.seed, heldout=True)
    write_conversations(train, out / "sft-data" / "train.jsonl")
    write_conversations(val, out / "sft-data" / "val.jsonl")
    chat_model, sft, dropped = run_sft(load_model(out / BASE_DIR, device=settings.device),
                                       tokenizer, train, val, settings.sft_hparams,
                                       settings.sft_steps, out, console, settings.seed,
                                       settings.device)
    if sft.interrupted:
        raise KeyboardInterrupt
    timings["sft"] = time.perf_counter() - t0

    # 4. Evaluation: held-out question answering before and after fine-tuning, samples.
    t0 = time.perf_counter()
    console.rule("evaluate")
    items = fitting(tokenizer, qa_items(settings.qa_questions, settings.seed),
                    settings.max_seq_len)
    if not items:
        raise PromoteError(f"no held-out question fits a context of {settings.max_seq_len} "
                           f"tokens; raise --max-seq-len")
    base_for_chat, _ = ensure_chat_tokens(load_model(out / BASE_DIR), tokenizer)
    qa_base = qa_accuracy(base_for_chat, tokenizer, items, context=settings.max_seq_len)
    qa_chat = qa_accuracy(chat_model, tokenizer, items, context=settings.max_seq_len)
    console.print(f"  held-out question answering: base {qa_base:.0%}, chat {qa_chat:.0%}")
    samples = sample_outputs(base_for_chat, chat_model, tokenizer, settings.seed)
    timings["evaluate"] = time.perf_counter() - t0

    save_model(chat_model, out)
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    metrics = {
        "candidate_id": candidate_id, "genome": genome.to_dict(),
        "genome_summary": genome.summary(),
        "params": param_counts_analytic(chat_model.config).total,
        "search_val_bpb": _search_bpb(run.database_target, candidate_id),
        "refine": {"best_params": outcome.best_params, "best_trial_bpb": outcome.best_value,
                   "complete": outcome.complete, "pruned": outcome.pruned,
                   "failed": outcome.failed, "trials": settings.refine.trials,
                   "tokens_per_trial": settings.refine_tokens or settings.pretrain_tokens,
                   "study": study.study_name},
        "hparams": dataclasses.asdict(hparams), "dropout": tuned_config.dropout,
        "pretrain": {"steps": pre.step, "tokens": pre.history.tokens,
                     "val_loss": pre.val_loss,
                     "val_bpb": store.bits_per_byte(pre.val_loss, "val"),
                     "samples": [list(sample) for sample in pre.history.samples]},
        "sft": {"steps": sft.step, "conversations": len(train), "dropped_too_long": dropped,
                "val_loss_assistant_tokens": sft.val_loss,
                "hparams": dataclasses.asdict(settings.sft_hparams)},
        "qa_accuracy": {"base": qa_base, "chat": qa_chat, "questions": len(items)},
        "samples": samples, "seconds": timings,
        "total_seconds": time.perf_counter() - started,
        "hardware": hardware(settings.device),
    }
    write_report(out, metrics, pre.history, sft.history, store)
    for done in (out / "checkpoints", out / BASE_DIR / "ray-train"):  # the models are saved
        shutil.rmtree(done, ignore_errors=True)
    return metrics


def _search_bpb(database: str, candidate_id: int) -> float | None:
    db = RunDatabase(database, readonly=True)
    try:
        return next((r["val_bpb"] for r in db.leaderboard() if r["id"] == candidate_id), None)
    finally:
        db.close()


def sample_outputs(base: Chimera, chat: Chimera, tokenizer, seed: int) -> dict:
    sampling = SamplingConfig(max_new_tokens=80, temperature=0.8, top_p=0.95, seed=seed)
    prompt = tokenizer(STORY_PROMPT, add_special_tokens=False)["input_ids"]
    story = tokenizer.decode(generate(base, prompt, sampling), skip_special_tokens=True)
    item = qa_items(1, seed + 1)[0]
    chats = [{"user": q, "assistant": reply(chat, tokenizer, [{"role": "user", "content": q}],
                                            sampling)} for q in SAMPLE_QUESTIONS]
    question = item["messages"][0]["content"]
    chats.append({"user": question, "assistant": reply(
        chat, tokenizer, item["messages"], dataclasses.replace(sampling, temperature=0.0)),
        "expected": item["expected"]})
    return {"base_story": STORY_PROMPT + story, "chat": chats}


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
| held-out question answering, base model | {m['qa_accuracy']['base']:.1%} |
| held-out question answering, chat model | {m['qa_accuracy']['chat']:.1%} |
| questions | {m['qa_accuracy']['questions']} |

![loss curves](loss_curves.png)

## Hyperparameters (refined by Optuna)

Study `{m['refine']['study']}` in the run's database: {m['refine']['complete']} trials complete,
{m['refine']['pruned']} pruned, {m['refine']['failed']} failed, {m['refine']['tokens_per_trial']:,}
tokens per trial; best trial {m['refine']['best_trial_bpb']:.4f} bpb.

| hyperparameter | value |
|---|---|
{hp}

Chat fine-tuning: {m['sft']['steps']} steps on {m['sft']['conversations']} conversations
({m['sft']['dropped_too_long']} too long, left out), loss on assistant tokens only.

## Samples

Base model, from "{STORY_PROMPT}":

> {m['samples']['base_story']}

During pretraining (step: sample):

{during}

Chat model:

{chats}

## Time and hardware

{seconds}; total {m['total_seconds'] / 60:.1f} min on {m['hardware']}.
"""
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))
