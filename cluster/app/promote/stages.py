"""The training stages, also used by ``chimera train`` and ``chimera sft``: Optuna refinement,
pretraining (in this process or on Ray Train), chat fine-tuning, and their progress bars."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from chimera.checkpoint import load_model, save_model
from chimera.config import ChimeraConfig
from chimera.generation import SamplingConfig, generate
from chimera.model import Chimera
from cluster.app.promote.settings import STORY_PROMPT, PromoteError, PromoteSettings
from cluster.ray.trials import RayTrials, TrialSpec, train_trial_rung
from results.db import database_url
from search.refine import TUNED, InProcessTrials, open_study, refine
from trainers.fit import FitResult, FitSettings, StepReport, fit
from trainers.pretrain import PretrainPlan, pretrain
from trainers.recipe import TrainHparams
from trainers.sft import (
    ChatBatches,
    ensure_chat_tokens,
)
from trainers.store import TokenStore


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
        # On a clock the run's length is the pace so far extrapolated (report.total_steps).
        self.progress.update(self.task, completed=report.step, total=report.total_steps,
                             stats=stats)
        if self.lines and (report.val_loss is not None
                           or report.step % max(1, self.total // 10) == 0):
            self.console.print(f"  {self.label} step {report.step}/{report.total_steps}: "
                               f"{stats}", highlight=False)


class DpoProgress:
    """A rich bar over DPO's optimizer steps, with TRL's latest loss, reward accuracy and
    margin; a line per log where there is no terminal to redraw a bar on."""

    def __init__(self, console: Console, total: int) -> None:
        self.console, self.lines = console, not console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}[/bold]"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, disable=self.lines)
        self.task = self.progress.add_task("dpo", total=total, stats="")
        self.answers = None  # a second bar while the model answers the training questions

    def answering(self, done: int, total: int) -> None:
        """``trainers.dpo.with_own_mistakes``'s progress."""
        if self.answers is None:
            self.answers = self.progress.add_task("answers", total=total,
                                                  stats="answering the training questions")
            if self.lines:
                self.console.print(f"  answering {total} training questions (own mistakes)")
        self.progress.update(self.answers, completed=done)

    def __enter__(self) -> DpoProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, step: int, total: int, logs: dict | None) -> None:
        stats = None
        if logs and "loss" in logs:
            stats = (f"loss {logs['loss']:.3f} reward acc "
                     f"{logs.get('rewards/accuracies', float('nan')):.2f} margin "
                     f"{logs.get('rewards/margins', float('nan')):.3f}")
            if self.lines:
                self.console.print(f"  dpo step {step}/{total}: {stats}", highlight=False)
        self.progress.update(self.task, completed=step, total=total,
                             **({"stats": stats} if stats else {}))


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
        from cluster.ray.train import pretrain_on_ray

        console.print(f"  data-parallel on {train_workers} Ray Train workers")
        step, history = pretrain_on_ray(plan, store.root, out, checkpoints, train_workers,
                                        use_gpu=device.startswith("cuda"))
        result = FitResult(step, history, interrupted=step < plan.fit.steps)
        return load_model(out), result
    with StepProgress(console, "pretrain", plan.fit.steps, store) as progress:
        model, result = pretrain(plan, store, checkpoints, device=device, on_step=progress,
                                 sampler=sampler, on_message=_notice(console))
    save_model(model, out)
    return model, result


def _notice(console: Console):
    """Resume notices of ``fit`` (which checkpoint, any skipped as unreadable) as plain lines:
    paths are not rich markup."""
    return lambda line: console.print(f"  {line}", markup=False, highlight=False)


def run_sft(model: Chimera, tokenizer, train: list[dict], val: list[dict],
            hparams: TrainHparams, steps: int, out: Path, console: Console, seed: int = 0,
            device: str = "cpu", plain: TokenStore | None = None,
            pretrain_mix: float = 0.0, seconds: float | None = None
            ) -> tuple[Chimera, FitResult, int]:
    """Fine-tune on conversations (resuming from ``out/checkpoints/sft``), with
    ``pretrain_mix`` of each batch's rows windows of ``plain``'s training text, for ``steps``
    (or ``seconds`` of wall clock, at most ``steps``: see FitSettings); returns the
    model (its vocabulary grown if the tokenizer lacked the chat tokens), the result and how
    many conversations were too long for ``hparams.seq_len`` and left out."""
    model, added = ensure_chat_tokens(model, tokenizer)
    if added:
        console.print(f"  added chat tokens {added}; vocabulary now {model.config.vocab_size}")
    if hparams.seq_len > model.config.max_seq_len:
        raise PromoteError(f"SFT seq_len {hparams.seq_len} exceeds the model's max_seq_len "
                           f"{model.config.max_seq_len}")
    batches = ChatBatches([r["messages"] for r in train], [r["messages"] for r in val],
                          tokenizer, hparams, seed, plain, pretrain_mix)
    settings = FitSettings(steps=steps, eval_every=max(1, steps // 4),
                           checkpoint_every=max(1, steps // 4), seconds=seconds)
    meta = {"hparams": dataclasses.asdict(hparams), "steps": steps, "seconds": seconds,
            "seed": seed,
            "config": model.config.to_dict(), "conversations": len(train),
            "pretrain_mix": pretrain_mix}
    with StepProgress(console, "sft", steps, None) as progress:
        result = fit(model.to(device), hparams, batches, settings, out / "checkpoints" / "sft",
                     device=device, meta=meta, on_step=progress, on_message=_notice(console))
    return model, result, batches.dropped
