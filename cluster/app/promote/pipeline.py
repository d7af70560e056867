"""The promote pipeline: refine -> pretrain -> fine-tune -> (with --dpo: preference-tune) ->
evaluate, each stage skipped when its record says it is done."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from chimera.checkpoint import load_model, save_model
from chimera.config import ChimeraConfig
from chimera.inference import TOKENIZER_DIR
from chimera.model import Chimera, param_counts_analytic
from chimera.tokenizer import load_tokenizer
from cluster.app.evolve import EvolveSettings
from cluster.app.promote.budget import (
    LOOP_EFFICIENCY,
    STEP_CAP,
    StagePlan,
    plan_stages,
    pretrain_dropout,
)
from cluster.app.promote.dpo_stage import dpo_metrics, evaluate_dpo, run_dpo, sft_dir
from cluster.app.promote.finalists import Finalist, pretrain_finalists, size_ladder, summary
from cluster.app.promote.instruction_data import (
    heldout_bpb,
    sft_conversations,
    source_of,
    validation_conversations,
)
from cluster.app.promote.preflight import preflight
from cluster.app.promote.records import StageRecords, stage_settings
from cluster.app.promote.report import hardware, sample_outputs, write_report
from cluster.app.promote.settings import BASE_DIR, STAGES, PromoteSettings, winner
from cluster.app.promote.stages import run_pretrain, run_refinement, run_sft, story_sampler
from cluster.app.rundir import STORE_DIR, removed_if_left_empty
from cluster.ray.runtime import start_ray
from cluster.ray.trials import tuned
from results.db import RunDatabase
from search.genome import Genome
from trainers.fit import FitResult, FitSettings, History
from trainers.plateau import PLATEAU_PATIENCE
from trainers.pretrain import PretrainPlan, measure_tokens_per_second, steps_for_tokens
from trainers.recipe import TrainHparams
from trainers.sft import (
    QA_NEW_TOKENS,
    ensure_chat_tokens,
    qa_accuracy,
    write_conversations,
)
from trainers.store import TokenStore


def promote(settings: PromoteSettings, console: Console, spent_seconds: float = 0.0) -> dict:
    """Run every stage not yet done; returns the metrics (also in OUT/metrics.json and
    OUT/report.md). ``spent_seconds``: of ``--budget``, what the command spent before this
    call (its start-up). A failure before anything is written into an output directory this
    call created removes that directory again (and the parents it created), and nothing else."""
    with removed_if_left_empty(settings.out_dir):
        return _promote(settings, console, spent_seconds)


@dataclass
class _Run:
    """What every stage of one promote reads: the settings, the candidate, its data, the
    records."""

    settings: PromoteSettings
    console: Console
    candidate_id: int
    genome: Genome
    run: EvolveSettings
    store: TokenStore
    tokenizer: object
    config: ChimeraConfig
    records: StageRecords
    wanted: dict[str, dict]
    finalists: list[Finalist]  # pretraining's (finalists.py); the candidate alone when one

    @property
    def out(self) -> Path:
        return self.settings.out_dir

    def skipped(self, stage: str, what: str) -> None:
        self.console.rule(stage)
        self.console.print(f"  {stage}: done in attempt "
                           f"{self.records.data['stages'][stage]['finished_in_attempt']} "
                           f"({what}); skipped", markup=False, highlight=False)


def _promote(settings: PromoteSettings, console: Console, spent_seconds: float) -> dict:
    started = time.perf_counter() - spent_seconds
    candidate_id, genome, run = winner(settings.run_dir, settings.candidate_id)
    store = TokenStore.open(Path(settings.run_dir) / STORE_DIR)
    tokenizer = store.load_tokenizer()
    records = StageRecords(settings.out_dir)
    config = genome.to_config(store.vocab_size, settings.max_seq_len)
    ladder = size_ladder(settings.run_dir, settings.finalists, store.vocab_size,
                         settings.max_seq_len) if settings.ranks_finalists else []
    if settings.budget_seconds is not None:
        plan = _budgeted(settings, config, run.hparams, store, records, console,
                         time.perf_counter() - started, max(1, len(ladder)))
        settings, ladder = plan.applied(settings), ladder[:plan.finalists]
    ladder = ladder if len(ladder) > 1 else []  # one finalist: the winner, pretrained alone
    evaluation, redo = preflight(settings, run, tokenizer, records, candidate_id, genome)
    ctx = _Run(settings, console, candidate_id, genome, run, store, tokenizer, config, records,
               stage_settings(settings, candidate_id), ladder)
    # Saved with the first stage it begins: a failure before that leaves the directory as
    # empty as the preflight found it (and removable, if this call created it).
    attempt = records.start_attempt(settings.run_dir, candidate_id, genome)
    done = ", ".join(s for s in STAGES if records.done(s) is not None) or "none"
    console.print(f"[bold]promoting[/bold] candidate #{candidate_id} {genome.summary()} "
                  f"({param_counts_analytic(ctx.config).total / 1e6:.2f}M parameters) -> "
                  f"{ctx.out}" + (f" (attempt {attempt}; done earlier: {done})"
                                  if attempt > 1 else ""), highlight=False)
    for note in evaluation.notes:
        console.print(f"  note: {note}", markup=False, highlight=False)

    needs_ray = (records.done("refine") is None and not settings.in_process
                 and not settings.skips_refinement) or \
        (records.done("pretrain") is None and settings.train_workers > 1)
    ray_started = needs_ray and start_ray(settings.address)
    try:
        refined = _refine(ctx)
        tuned_config, hparams = tuned(ctx.config, run.hparams, refined["best_params"])
        # A refinement's dropout stands; otherwise pretraining's epochs set it.
        pre, tuned_config, ctx = _pretrain(ctx, tuned_config, hparams,
                                           regularise="dropout" not in refined["best_params"])
    finally:
        if ray_started:
            import ray  # only when this promote started it

            ray.shutdown()
    sft_model, tokenizer, sft = _fine_tune(ctx)
    chat_model, dpo = run_dpo(ctx, sft_model, tokenizer) if settings.dpo else (sft_model, None)
    finished = records.done("evaluate")
    if finished is not None and "evaluate" not in redo and (ctx.out / "metrics.json").is_file():
        ctx.skipped("evaluate", f"{ctx.out / 'report.md'}")
        console.print("  nothing left to do", highlight=False)
        return json.loads((ctx.out / "metrics.json").read_text())
    if "evaluate" in redo:
        changed = " and ".join(records.changed("evaluate", ctx.wanted["evaluate"]))
        console.print(f"  {changed} changed: the evaluation is done again", highlight=False)
    trained = _Trained(refined, tuned_config, hparams, pre, sft, sft_model, dpo)
    metrics = _evaluate(ctx, evaluation, chat_model, tokenizer, trained, attempt)
    for leftover in (ctx.out / "checkpoints", ctx.out / BASE_DIR / "ray-train"):
        shutil.rmtree(leftover, ignore_errors=True)  # the models are saved
    return metrics


def _budgeted(settings: PromoteSettings, config: ChimeraConfig, hparams: TrainHparams,
              store: TokenStore, records: StageRecords, console: Console,
              spent: float, finalists: int) -> StagePlan:
    """The stages sized to ``--budget`` (pretraining's shared by up to ``finalists``): the
    plan recorded by an earlier attempt with the same budget (its checkpoints belong to it),
    else one measured now."""
    recorded = records.budget_plan
    if recorded and recorded["budget_seconds"] == settings.budget_seconds:
        plan = StagePlan.from_dict(recorded)
    else:
        with console.status("measuring this machine's training speed for the budget"):
            plan = plan_stages(settings, config, hparams, store, spent, finalists)
        records.keep_budget_plan(plan.to_dict())
    refine = f"{plan.refine_tokens:,} tokens per trial" if plan.refine_tokens else "none"
    shared = f", shared by {plan.finalists} finalists" if plan.finalists > 1 else ""
    console.print(f"  budget {plan.budget_seconds:,.0f}s at {plan.tokens_per_second:,.0f} "
                  f"training tokens/s: pretraining {plan.pretrain_seconds:,.0f}s "
                  f"(~{plan.pretrain_tokens:,} tokens{shared}), refinement {refine}, fine-tuning "
                  f"{plan.sft_seconds or 0:,.0f}s (at most {plan.sft_steps} steps)"
                  + (f"; DPO is not sized by it ({settings.dpo_settings.steps} steps, "
                     f"--dpo-steps)" if settings.dpo else ""), highlight=False)
    return plan


def _refine(ctx: _Run) -> dict:
    """1. Refinement: the Optuna study's best hyperparameters (recorded, or found now; none
    when a budget gives it no share: the search's hyperparameters are kept)."""
    if ctx.records.done("refine") is None and ctx.settings.skips_refinement:
        ctx.console.rule("refine")
        ctx.records.begin("refine", ctx.wanted["refine"])
        ctx.records.finish("refine", {
            "best_params": {}, "best_value": None, "complete": 0, "pruned": 0, "failed": 0,
            "study": None, "seconds": 0.0, "skipped": "no share of --budget (--refine-share)"})
        ctx.console.print("  skipped: no share of --budget (--refine-share); the search's "
                          "hyperparameters", highlight=False)
        return ctx.records.done("refine")
    if ctx.records.done("refine") is None:
        t0 = time.perf_counter()
        ctx.console.rule("refine: Optuna TPE + Hyperband")
        ctx.records.begin("refine", ctx.wanted["refine"])
        outcome, study = run_refinement(ctx.settings, ctx.config, ctx.run.hparams, ctx.store,
                                        ctx.run.database_target, ctx.candidate_id,
                                        ctx.console)
        ctx.records.finish("refine", {
            "best_params": outcome.best_params, "best_value": outcome.best_value,
            "complete": outcome.complete, "pruned": outcome.pruned, "failed": outcome.failed,
            "study": study.study_name, "seconds": time.perf_counter() - t0})
    else:
        refined = ctx.records.done("refine")
        ctx.skipped("refine", refined.get("skipped") or f"study {refined['study']}")
    refined = ctx.records.done("refine")
    if refined.get("skipped"):
        return refined
    ctx.console.print(f"  best trial {refined['best_value']:.4f} bpb ({refined['complete']} "
                      f"complete, {refined['pruned']} pruned, {refined['failed']} failed): "
                      f"{refined['best_params']}", highlight=False)
    return refined


def _regularised(ctx: _Run, config: ChimeraConfig, tokens: int) -> ChimeraConfig:
    """``config`` with the dropout pretraining it for ``tokens`` calls for
    (``pretrain_dropout``)."""
    train_tokens = ctx.store.info("train").tokens
    dropout = pretrain_dropout(config, tokens, train_tokens)
    if dropout != config.dropout:
        ctx.console.print(f"  dropout {config.dropout:g} -> {dropout:g}: pretraining will see "
                          f"the corpus {tokens / train_tokens:.0f} times", highlight=False)
    return dataclasses.replace(config, dropout=dropout)


def _pretrain(ctx: _Run, tuned_config: ChimeraConfig, hparams: TrainHparams,
              regularise: bool) -> tuple[FitResult, ChimeraConfig, _Run]:
    """2. Pretraining into OUT/base (recorded, or trained now): of the tuned configuration,
    with the dropout its epochs call for when ``regularise``, or of the best of the finalists.
    Returns the result, the configuration pretrained (its dropout the record's, so a promote
    resumed under another rule reports what its base model trained with) and ``ctx`` of the
    candidate pretrained."""
    settings, out = ctx.settings, ctx.out
    if ctx.records.done("pretrain") is None:
        t0 = time.perf_counter()
        ctx.console.rule("pretrain")
        ctx.records.begin("pretrain", ctx.wanted["pretrain"])
        if ctx.finalists:
            chosen, pre = pretrain_finalists(
                ctx.finalists, ctx.records.progress("pretrain"), out,
                lambda finalist, model_dir, checkpoints: _train_finalist(
                    ctx, finalist, hparams, model_dir, checkpoints),
                lambda loss: ctx.store.bits_per_byte(loss, "val"), ctx.records.save,
                lambda line: ctx.console.print(f"  {line}", markup=False, highlight=False))
            progress = ctx.records.progress("pretrain")
            candidate_id, genome = chosen.candidate_id, chosen.genome
            dropout, finalists = progress["trained"][chosen.name]["dropout"], summary(progress)
            trained_seconds = sum(finalist["seconds"] for finalist in finalists)
        else:
            config = _regularised(ctx, tuned_config, settings.pretrain_tokens) \
                if regularise else tuned_config
            pre = _train_base(ctx, config, hparams, settings.pretrain_tokens,
                              settings.pretrain_seconds, out / BASE_DIR,
                              out / "checkpoints" / "pretrain")
            candidate_id, genome, dropout = ctx.candidate_id, ctx.genome, config.dropout
            finalists, trained_seconds = [], pre.history.seconds
        ctx.tokenizer.save_pretrained(str(out / BASE_DIR / TOKENIZER_DIR))
        ctx.records.finish("pretrain", {
            "model": BASE_DIR, "step": pre.step, "history": pre.history.to_dict(),
            # Over every attempt: the histories' seconds are their resumed segments' sums.
            "seconds": max(time.perf_counter() - t0, trained_seconds),
            "dropout": dropout, "candidate_id": candidate_id, "genome": genome.to_dict(),
            "finalists": finalists})
    else:
        ctx.skipped("pretrain", f"the model is in {out / BASE_DIR}")
    pretrained = ctx.records.done("pretrain")
    if pretrained.get("candidate_id", ctx.candidate_id) != ctx.candidate_id:  # a finalist's
        genome = Genome.from_dict(pretrained["genome"])
        ctx = dataclasses.replace(ctx, candidate_id=pretrained["candidate_id"], genome=genome,
                                  config=genome.to_config(ctx.store.vocab_size,
                                                          settings.max_seq_len))
        tuned_config = ctx.config
    # A record from before the dropout rule trained the tuned configuration as it was.
    dropout = pretrained.get("dropout", tuned_config.dropout)
    result = FitResult(pretrained["step"], History.from_dict(pretrained["history"]))
    return result, dataclasses.replace(tuned_config, dropout=dropout), ctx


def _train_finalist(ctx: _Run, finalist: Finalist, hparams: TrainHparams, model_dir: Path,
                    checkpoints: Path) -> tuple[FitResult, float]:
    """One finalist's pretraining, for its share of pretraining's seconds at its own speed
    (measured here, the search's winner's is the plan's; kept in the stage record first, so a
    resumed finalist resumes the plan its checkpoints belong to). Returns it and its dropout."""
    planned = ctx.records.progress("pretrain").setdefault("planned", {})
    config = finalist.genome.to_config(ctx.store.vocab_size, ctx.settings.max_seq_len)
    if finalist.name not in planned:
        seconds = ctx.settings.pretrain_seconds / len(ctx.finalists)
        rate = ctx.records.budget_plan["tokens_per_second"]
        if finalist.candidate_id != ctx.candidate_id:
            began = time.perf_counter()
            rate = LOOP_EFFICIENCY * measure_tokens_per_second(config, hparams, ctx.store,
                                                               device=ctx.settings.device)
            seconds -= time.perf_counter() - began
        planned[finalist.name] = {"seconds": seconds, "tokens": int(seconds * rate)}
        ctx.records.save()
    plan = planned[finalist.name]
    config = _regularised(ctx, config, plan["tokens"])
    result = _train_base(ctx, config, hparams, plan["tokens"], plan["seconds"], model_dir,
                         checkpoints)
    return result, config.dropout


def _train_base(ctx: _Run, config: ChimeraConfig, hparams: TrainHparams, tokens: int,
                seconds: float | None, model_dir: Path, checkpoints: Path) -> FitResult:
    """Pretrain ``config`` for ``tokens`` (on a budget's clock: ``seconds``) into
    ``model_dir``, resuming from ``checkpoints``."""
    steps = steps_for_tokens(tokens, hparams)
    # Evaluated every 1/16 of the way, and the best evaluation's weights kept: on a small
    # corpus the last epochs of a long budget overfit, so once validation stops improving
    # the decay comes forward and training ends (trainers.plateau). Under a budget, on the
    # clock.
    plan = PretrainPlan(config, hparams,
                        FitSettings(steps=steps * (STEP_CAP if seconds else 1),
                                    eval_every=max(1, steps // 16),
                                    checkpoint_every=max(1, steps // 8),
                                    compile=ctx.settings.compile, keep_best=True,
                                    seconds=seconds, plateau_patience=PLATEAU_PATIENCE),
                        ctx.settings.seed)
    _, pre = run_pretrain(plan, ctx.store, model_dir, ctx.console, ctx.settings.train_workers,
                          ctx.settings.device, checkpoints,
                          story_sampler(ctx.tokenizer, ctx.console, ctx.settings.seed))
    if pre.interrupted:
        raise KeyboardInterrupt
    return pre


def _fine_tune(ctx: _Run):
    """3. Chat fine-tuning on instructions made for the run's corpus (the story generator's,
    or from its own training documents: see instruction_data), with ``--pretrain-mix`` of each
    batch plain training text. The chat model is saved as soon as it is trained, so a failure
    in the evaluation never costs the fine-tuning. Returns the chat model, its tokenizer (with
    the chat tokens) and the result."""
    settings, out, tokenizer = ctx.settings, ctx.out, ctx.tokenizer
    if ctx.records.done("sft") is None:
        t0 = time.perf_counter()
        ctx.console.rule("chat fine-tune")
        ctx.records.begin("sft", ctx.wanted["sft"])
        train = sft_conversations(settings, ctx.run, ctx.store, tokenizer,
                                  settings.sft_conversations)
        val = sft_conversations(settings, ctx.run, ctx.store, tokenizer,
                                validation_conversations(settings), heldout=True)
        write_conversations(train, out / "sft-data" / "train.jsonl")
        write_conversations(val, out / "sft-data" / "val.jsonl")
        chat_model, sft, dropped = run_sft(load_model(out / BASE_DIR, device=settings.device),
                                           tokenizer, train, val, settings.sft_hparams,
                                           settings.sft_steps, out, ctx.console, settings.seed,
                                           settings.device, ctx.store, settings.pretrain_mix,
                                           settings.sft_seconds)
        if sft.interrupted:
            raise KeyboardInterrupt
        save_model(chat_model, out)
        tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
        ctx.records.finish("sft", {
            "model": ".", "step": sft.step, "history": sft.history.to_dict(),
            "dropped_too_long": dropped, "conversations": len(train),
            "source": source_of(ctx.run), "pretrain_mix": settings.pretrain_mix,
            "seconds": max(time.perf_counter() - t0, sft.history.seconds)})
    else:
        where = out / sft_dir(ctx.records)  # sft/ once a DPO stage took the top level
        ctx.skipped("sft", f"the {'SFT' if where != out else 'chat'} model is in {where}")
        chat_model = load_model(where, device=settings.device)
        tokenizer = load_tokenizer(out / TOKENIZER_DIR)  # with the chat tokens SFT added
    fine_tuned = ctx.records.done("sft")
    return chat_model, tokenizer, FitResult(fine_tuned["step"],
                                            History.from_dict(fine_tuned["history"]))


@dataclass
class _Trained:
    """What the training stages made, for the evaluation."""

    refined: dict
    tuned_config: ChimeraConfig
    hparams: TrainHparams
    pre: FitResult
    sft: FitResult
    sft_model: Chimera
    dpo: dict | None  # the dpo stage's record; None without --dpo


def _evaluate(ctx: _Run, evaluation, chat_model, tokenizer, trained: _Trained,
              attempt: int) -> dict:
    """5. Evaluation: held-out question answering and held-out bits per byte (the validation
    split's text), before and after fine-tuning (with --dpo, after it too, and the preference
    accuracy of each model); samples; the report."""
    settings, out, hparams = ctx.settings, ctx.out, trained.hparams
    t0 = time.perf_counter()
    ctx.console.rule("evaluate")
    ctx.records.begin("evaluate", ctx.wanted["evaluate"])
    items = evaluation.qa_items
    base = load_model(out / BASE_DIR)
    bpb = {"base": heldout_bpb(base, ctx.store, hparams),
           "chat": heldout_bpb(chat_model, ctx.store, hparams)}
    ctx.console.print(f"  held-out text (validation split): base {bpb['base']:.4f} bpb, chat "
                      f"{bpb['chat']:.4f} bpb", highlight=False)
    base_for_chat, _ = ensure_chat_tokens(base, tokenizer)
    qa = {"base": None, "chat": None}  # None: not measured (the preflight's notes say why)
    if items:
        qa = {name: qa_accuracy(model, tokenizer, items, QA_NEW_TOKENS,
                                context=settings.max_seq_len)
              for name, model in (("base", base_for_chat), ("chat", chat_model))}
        ctx.console.print(f"  held-out question answering: base {qa['base']:.0%}, chat "
                          f"{qa['chat']:.0%} ({len(items)} questions)", highlight=False)
    extra = {}
    if trained.dpo is not None:
        measured = evaluate_dpo(ctx, evaluation, base_for_chat, trained.sft_model, chat_model,
                                tokenizer, hparams, items)
        bpb = {"base": bpb["base"], "sft": measured["bpb_sft"], "chat": bpb["chat"]}
        qa = {"base": qa["base"], "sft": measured["qa_sft"], "chat": qa["chat"]}
        extra = dpo_metrics(trained.dpo, measured, source_of(ctx.run))
    samples = sample_outputs(base_for_chat, chat_model, tokenizer, settings.seed, evaluation)
    timings = {stage: ctx.records.done(stage)["seconds"] for stage in STAGES[:3]}
    if trained.dpo is not None:
        timings["dpo"] = trained.dpo["seconds"]
    timings["evaluate"] = time.perf_counter() - t0
    metrics = _metrics(ctx, trained, chat_model, extra, {
        "heldout_bpb": bpb,
        "qa_accuracy": {**qa, "questions": len(items), "source": source_of(ctx.run)},
        "samples": samples, "notes": evaluation.notes, "seconds": timings,
        # The stages' own times as recorded (for training, summed over resumed segments): a
        # resumed promote reports the work, not just the time of its last run.
        "total_seconds": sum(timings.values()),
        "attempts": attempt,
        "hardware": hardware(settings.device),
    })
    write_report(out, metrics, trained.pre.history, trained.sft.history, ctx.store)
    ctx.records.finish("evaluate", {"seconds": timings["evaluate"]})
    return metrics


def _metrics(ctx: _Run, trained: _Trained, chat_model, dpo: dict, evaluated: dict) -> dict:
    """metrics.json: the candidate, what each stage ran with and made (``dpo``: the DPO
    sections, empty without --dpo), then the ``evaluated`` results."""
    settings, refined, pre, sft = ctx.settings, trained.refined, trained.pre, trained.sft
    fine_tuned = ctx.records.done("sft")
    return {
        "candidate_id": ctx.candidate_id, "genome": ctx.genome.to_dict(),
        "genome_summary": ctx.genome.summary(),
        "params": param_counts_analytic(chat_model.config).total,
        "search_val_bpb": _search_bpb(ctx.run.database_target, ctx.candidate_id),
        "refine": {"best_params": refined["best_params"],
                   "best_trial_bpb": refined["best_value"],
                   "complete": refined["complete"], "pruned": refined["pruned"],
                   "failed": refined["failed"], "trials": settings.refine.trials,
                   "tokens_per_trial": settings.refine_tokens or settings.pretrain_tokens,
                   "study": refined["study"], "skipped": refined.get("skipped")},
        "budget_plan": ctx.records.budget_plan,
        "hparams": dataclasses.asdict(trained.hparams),
        "dropout": trained.tuned_config.dropout,
        # Under a budget, the finalists pretraining ranked (finalists.py): empty when none.
        "finalists": ctx.records.done("pretrain").get("finalists", []),
        "pretrain": {"steps": pre.step, "tokens": pre.history.tokens,
                     "val_loss": pre.val_loss,
                     "val_bpb": ctx.store.bits_per_byte(pre.val_loss, "val"),
                     "samples": [list(sample) for sample in pre.history.samples]},
        "sft": {"steps": sft.step, "conversations": fine_tuned["conversations"],
                "dropped_too_long": fine_tuned["dropped_too_long"],
                "val_loss_assistant_tokens": sft.val_loss,
                "source": fine_tuned.get("source"),
                "pretrain_mix": fine_tuned.get("pretrain_mix", 0.0),
                "hparams": dataclasses.asdict(settings.sft_hparams)},
        **dpo, **evaluated,
    }


def _search_bpb(database: str, candidate_id: int) -> float | None:
    db = RunDatabase(database, readonly=True)
    try:
        return next((r.val_bpb for r in db.leaderboard_records() if r.id == candidate_id), None)
    finally:
        db.close()
