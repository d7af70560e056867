"""``chimera promote``: the search's winner becomes a chat model.

    refine (Optuna on Ray) -> pretrain (packed, checkpointed; Ray Train with several workers)
        -> chat fine-tune (assistant-only loss) -> evaluate -> model directory

The model directory::

    model.safetensors, config.json   the chat model (``chimera generate`` / ``chat`` load it),
                                     saved as soon as fine-tuning ends
    tokenizer/                       with the chat template
    base/                            the pretrained model before fine-tuning
    sft-data/train.jsonl, val.jsonl  the conversations it was fine-tuned on
    checkpoints/pretrain, /sft       full training state (resume; removed when done)
    promote-state.json               the stage records (below)
    report.md, metrics.json, loss_curves.png

Before any work a preflight checks what would otherwise fail hours later: the settings fit
together (``--sft-seq-len`` within ``--max-seq-len``, the run's training windows too), every prompt
the evaluation uses encodes and leaves room for its reply in the context, at least one
fine-tuning conversation and one held-out question fit, the output directory is writable, and
the stage records agree with this command. Each fails as a ``PromoteError`` naming the flag to
change. Prompts that do not fit (a character-level tokenizer spends a token per character) are
skipped or trimmed, with a note in report.md, rather than failing the evaluation.

Stage records: ``promote-state.json`` (written atomically after every change) holds, per stage
(refine, pretrain, sft, evaluate), the settings it was started with and, once it is done, its
results: the refinement's best hyperparameters and trial counts, pretraining's history (the model
is in base/), fine-tuning's history (the chat model is in the directory itself), and which
attempt finished it. Run the same command again after a crash, a kill or Ctrl+C and the stages
recorded as done are skipped; the one that was running continues where it stopped (the Optuna
study from the run's database, training from its newest readable checkpoint). A command whose
settings differ from those a stage was started with is refused, naming the flag, rather than
mixing two runs in one directory; only the evaluation, which keeps no partial state, is simply
redone when its settings (``--qa-questions``) change. A promote that fails before writing
anything removes the output directory it created (and only that).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from chimera.chat import ConversationError, prompt_ids, reply
from chimera.checkpoint import atomic_write, load_model, save_model
from chimera.config import ChimeraConfig
from chimera.generation import SamplingConfig, generate
from chimera.inference import TOKENIZER_DIR
from chimera.model import Chimera, param_counts_analytic
from chimera.tokenizer import CHAT_TEMPLATE, CHAT_TOKENS, load_tokenizer
from cluster.ray.trials import RayTrials, TrialSpec, train_trial_rung, tuned
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
    ChatDataError,
    encode_conversation,
    ensure_chat_tokens,
    qa_accuracy,
    write_conversations,
)
from trainers.store import TokenStore

BASE_DIR = "base"
STATE_FILE = "promote-state.json"
STAGES = ("refine", "pretrain", "sft", "evaluate")
STORY_PROMPT = "Once upon a time, there was a little"
SAMPLE_QUESTIONS = ["Hello!", "Tell me a story about Lily at the park.", "What can you do?"]
QA_NEW_TOKENS = 24  # the longest answer the question answering scores (qa_accuracy's default)
SAMPLE_NEW_TOKENS = 80  # the samples in report.md
# Held-out questions too long for the context are replaced by the next ones, up to this many
# times the number asked for, and at most 400 more (a char tokenizer needs a token per
# character of the story, and the shortest stories are the ones that fit).
QA_DRAW_FACTOR = 20
SFT_SCAN = 500  # fine-tuning conversations the preflight looks at (see _check_sft_data)


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
    from cluster.app.evolve import CONFIG_FILE, RunDirError, load_settings

    path = Path(run_dir) / CONFIG_FILE
    try:
        settings = load_settings(run_dir)
    except FileNotFoundError:
        raise PromoteError(f"{run_dir}: not a run directory (no {CONFIG_FILE}); run `chimera "
                           f"evolve` first") from None
    except RunDirError as err:  # already one line naming the file
        raise PromoteError(str(err)) from None
    except OSError as err:
        raise PromoteError(f"{path}: cannot read it ({err.strerror or err})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        # Truncated, hand-edited or from another program: say which file, not just the parser's
        # "Expecting value: line 1 column 1".
        reason = f"missing field {err}" if isinstance(err, KeyError) else \
            f"{type(err).__name__}: {err}"
        raise PromoteError(f"{path}: not a readable run settings file ({reason}); is {run_dir} "
                           f"a run of chimera evolve?") from None
    try:
        db = RunDatabase(settings.database_target, readonly=True)
    except FileNotFoundError as err:
        raise PromoteError(f"{err}; is {run_dir} a run of chimera evolve?") from None
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


# ----------------------------------------------------------------------------- stage records
def stage_settings(settings: PromoteSettings, candidate_id: int) -> dict[str, dict]:
    """What each stage's outcome depends on, keyed by the flag that sets it (so a refusal can
    name the flag). Later stages also depend on the earlier ones, which are checked first.
    Left out on purpose: --parallel, --train-workers, --device, --address, --in-process,
    --compile (how the work is run, not what it computes; data-parallel pretraining follows the
    same trajectory on any number of workers; a checkpoint still refuses a changed --compile)."""
    return {
        "refine": {"--genome": candidate_id, "--trials": settings.refine.trials,
                   "--rungs": settings.refine.rungs,
                   "--refine-tokens": settings.refine_tokens or settings.pretrain_tokens,
                   "--seed": settings.seed},
        "pretrain": {"--pretrain-tokens": settings.pretrain_tokens,
                     "--max-seq-len": settings.max_seq_len},
        "sft": {"--sft-steps": settings.sft_steps,
                "--sft-conversations": settings.sft_conversations,
                "--sft-seq-len": settings.sft_hparams.seq_len,
                "--sft-batch-size": settings.sft_hparams.batch_size},
        "evaluate": {"--qa-questions": settings.qa_questions},
    }


class StageRecords:
    """``OUT/promote-state.json``: for each stage the settings it was started with, whether it
    is done, its results and the attempt (run of the command) that finished it. Rewritten
    atomically after every change, so a kill leaves the previous version or the new one."""

    def __init__(self, out: Path) -> None:
        self.path = out / STATE_FILE
        self.data: dict = {}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
                if not isinstance(self.data, dict) or not isinstance(self.data.get("stages"),
                                                                     dict):
                    raise ValueError("no stages")
            except (OSError, ValueError) as err:
                raise PromoteError(f"{self.path}: unreadable stage records ({err}); it says "
                                   f"which stages of this promote are done: restore it, or use "
                                   f"another --out to start over") from None

    @property
    def exists(self) -> bool:
        return bool(self.data)

    def check(self, candidate_id: int, genome: Genome, wanted: dict[str, dict],
              out: Path) -> list[str]:
        """Refuse a command that would mix with what this directory holds; returns the stages
        to redo quietly (the evaluation, when only its settings changed)."""
        if not self.data:
            return []
        if self.data.get("candidate_id") != candidate_id or \
                self.data.get("genome") != genome.to_dict():
            raise PromoteError(
                f"{self.path}: {out} holds a promote of candidate #"
                f"{self.data.get('candidate_id')}, not #{candidate_id}; pass --genome "
                f"{self.data.get('candidate_id')} to resume it, or use another --out")
        redo = []
        for stage in STAGES:
            record = self.data["stages"].get(stage)
            if record is None:
                continue
            for flag, value in wanted[stage].items():
                recorded = record.get("settings", {}).get(flag)
                if recorded == value:
                    continue
                if stage == "evaluate":
                    redo.append(stage)
                    break
                state = "done" if record.get("done") else "started"
                raise PromoteError(
                    f"{self.path}: {stage} was {state} with {flag} {_flag_value(recorded)}, "
                    f"this command asks {flag} {_flag_value(value)}; rerun with "
                    f"{flag} {_flag_value(recorded)} to resume, or use another --out to start "
                    f"over")
        return redo

    def start_attempt(self, run_dir: str, candidate_id: int, genome: Genome) -> int:
        if not self.data:
            self.data = {"version": 1, "run": str(Path(run_dir).resolve()),
                         "candidate_id": candidate_id, "genome": genome.to_dict(),
                         "attempts": 0, "stages": {}}
        self.data["attempts"] += 1
        return self.data["attempts"]

    def done(self, stage: str) -> dict | None:
        """The results of a stage recorded as done; None when it is not."""
        record = self.data.get("stages", {}).get(stage)
        return record["result"] if record and record.get("done") else None

    def begin(self, stage: str, settings: dict) -> None:
        earlier = self.data["stages"].get(stage) or {}
        self.data["stages"][stage] = {
            "settings": settings, "done": False,
            "started_in_attempt": earlier.get("started_in_attempt", self.data["attempts"])}
        self.save()

    def finish(self, stage: str, result: dict) -> None:
        record = self.data["stages"][stage]
        record.update(done=True, finished_in_attempt=self.data["attempts"], result=result)
        self.save()

    def save(self) -> None:
        text = json.dumps(self.data, indent=2) + "\n"
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return "(set)" if value else "(not set)"
    return "(unset)" if value is None else str(value)


# ----------------------------------------------------------------------------- preflight
@dataclass
class EvaluationPlan:
    """The prompts the evaluation will use, chosen (and checked) before any work."""

    story_prompt: list[int]  # token ids of STORY_PROMPT (its tail, if trimmed)
    story_text: str  # what those ids stand for, as report.md shows it
    questions: list[str]  # the SAMPLE_QUESTIONS whose prompt fits
    qa_items: list[dict]  # the held-out questions scored
    sample_item: dict  # the held-out question shown in report.md
    sample_tokens: int  # new tokens per sample
    sample_item_tokens: int  # new tokens for the held-out question's reply
    notes: list[str] = field(default_factory=list)  # what was skipped or trimmed, and why


def _probe_tokenizer(tokenizer):
    """A copy of the tokenizer with the chat tokens and template fine-tuning will give it, so
    the preflight encodes prompts exactly as the evaluation will, without touching the one
    pretraining saves in base/."""
    probe = copy.deepcopy(tokenizer)
    missing = [t for t in CHAT_TOKENS if t not in probe.get_vocab()]
    if missing:
        probe.add_tokens(missing, special_tokens=True)
    if not getattr(probe, "chat_template", None) or missing:
        probe.chat_template = CHAT_TEMPLATE
    return probe


def _encode(tokenizer, text: str, what: str) -> list[int]:
    try:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    except Exception as err:  # noqa: BLE001 - a tokenizer's own failure, whatever its type
        raise PromoteError(f"the run's tokenizer cannot encode {what} ({type(err).__name__}: "
                           f"{err})") from None


def _unknown_characters(tokenizer, texts: list[str]) -> list[str]:
    """Characters that a tokenizer with an unknown token (character-level) turns into it."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return []
    chars = sorted({c for text in texts for c in text})
    return [c for c in chars if _encode(tokenizer, c, repr(c)) == [unk]]


def _prompt_fits(tokenizer, messages: list[dict], room: int) -> int | None:
    """Tokens of the prompt (the assistant's turn opened) when it fits ``room``, else None."""
    try:
        ids, dropped = prompt_ids(tokenizer, messages, room)
    except ConversationError:
        return None
    return len(ids) if not dropped else None


def _first_fitting(tokenizer, items: list[dict], want: int, room: int
                   ) -> tuple[list[dict], int, int]:
    """The first ``want`` items whose prompt fits ``room`` tokens, how many items were looked
    at, and the shortest prompt seen (for a message saying what would fit)."""
    kept, shortest, seen = [], None, 0
    for seen, item in enumerate(items, 1):
        length = len(prompt_ids(tokenizer, item["messages"], 1 << 30)[0])
        shortest = length if shortest is None else min(shortest, length)
        if length <= room:
            kept.append(item)
            if len(kept) == want:
                break
    return kept, seen, shortest


def plan_evaluation(settings: PromoteSettings, tokenizer) -> EvaluationPlan:
    """Choose the evaluation's prompts so that each leaves room for its reply in the context;
    raise PromoteError when the evaluation could not work at all."""
    context = settings.max_seq_len
    if context < QA_NEW_TOKENS + 8:  # chat.reply_stream needs 8 tokens of prompt room
        raise PromoteError(f"--max-seq-len {context} leaves no room for a question and its "
                           f"{QA_NEW_TOKENS}-token answer; use at least {QA_NEW_TOKENS + 8}")
    notes = []
    # Samples shrink with a small context rather than crowd the prompt out.
    sample_tokens = min(SAMPLE_NEW_TOKENS, context // 4)
    story = _encode(tokenizer, STORY_PROMPT, f"the story prompt {STORY_PROMPT!r}")
    story_text = STORY_PROMPT
    if len(story) + sample_tokens > context:
        story = story[-(context - sample_tokens):]
        story_text = tokenizer.decode(story, skip_special_tokens=True)
        notes.append(f"the story prompt was trimmed to its last {len(story)} tokens to leave "
                     f"{sample_tokens} for the story in --max-seq-len {context}")
    room = context - sample_tokens
    questions = []
    for question in SAMPLE_QUESTIONS:
        if _prompt_fits(tokenizer, [{"role": "user", "content": question}], room) is None:
            notes.append(f"sample question {question!r} skipped: it does not fit --max-seq-len "
                         f"{context} with {sample_tokens} tokens for the reply")
        else:
            questions.append(question)

    wanted = settings.qa_questions
    drawn = qa_items(min(wanted * QA_DRAW_FACTOR, wanted + 400), settings.seed)
    items, considered, shortest = _first_fitting(tokenizer, drawn, wanted,
                                                 context - QA_NEW_TOKENS)
    if not items:
        raise PromoteError(
            f"no held-out question fits --max-seq-len {context} with {QA_NEW_TOKENS} tokens "
            f"for the answer (the shortest of {len(drawn)} needs {shortest} tokens of prompt "
            f"with this tokenizer); use --max-seq-len {shortest + QA_NEW_TOKENS} or more")
    if considered > len(items):
        notes.append(f"{considered - len(items)} of the first {considered} held-out questions "
                     f"were too long for --max-seq-len {context} and were skipped, so the "
                     f"{len(items)} scored have shorter stories"
                     + (f" (only {len(items)} of {wanted} asked for fit)"
                        if len(items) < wanted else ""))
    sample, _, _ = _first_fitting(tokenizer, qa_items(QA_DRAW_FACTOR, settings.seed + 1), 1,
                                  room)
    sample_item_tokens = sample_tokens
    if not sample:
        # Its answer is a short fact: the scored questions' reply length will do.
        sample, sample_item_tokens = items[:1], QA_NEW_TOKENS
        notes.append(f"no sample held-out question fits --max-seq-len {context} with "
                     f"{sample_tokens} tokens for the reply: report.md shows a scored one, "
                     f"with {QA_NEW_TOKENS}")

    texts = [STORY_PROMPT, *SAMPLE_QUESTIONS, *(m["content"] for i in items
                                                for m in i["messages"])]
    template = tokenizer.apply_chat_template([{"role": "user", "content": ""}],
                                             tokenize=False, add_generation_prompt=True)
    for special in tokenizer.all_special_tokens:  # a token of its own, not characters
        template = template.replace(special, "")
    unknown = _unknown_characters(tokenizer, [*texts, template])
    if unknown:
        notes.append(f"the tokenizer lacks {', '.join(repr(c) for c in unknown)} (used by the "
                     f"prompts or the chat template): they become {tokenizer.unk_token}")
    return EvaluationPlan(story, story_text, questions, items, sample[0], sample_tokens,
                          sample_item_tokens, notes)


def _check_sft_data(settings: PromoteSettings, tokenizer) -> None:
    """At least one training and one validation conversation must fit --sft-seq-len (+1
    tokens: the inputs and the shifted targets), with assistant tokens to learn from. Only the
    first ``SFT_SCAN`` are looked at: a tenth of them are greetings, the shortest kind, so when
    none of those fit, fine-tuning would have next to nothing to learn from anyway."""
    width = settings.sft_hparams.seq_len + 1
    for heldout, n in ((False, settings.sft_conversations),
                       (True, max(64, settings.sft_conversations // 20))):
        shortest, n = None, min(n, SFT_SCAN)
        for record in conversations(n, settings.seed, heldout=heldout):
            try:
                ids, mask = encode_conversation(tokenizer, record["messages"])
            except (ChatDataError, ConversationError) as err:
                raise PromoteError(f"the chat template cannot render the fine-tuning data with "
                                   f"the run's tokenizer: {err}") from None
            if len(ids) <= width and any(mask):
                break
            shortest = len(ids) if shortest is None else min(shortest, len(ids))
        else:
            kind = "validation" if heldout else "training"
            raise PromoteError(
                f"none of the first {n} {kind} conversations fits --sft-seq-len "
                f"{settings.sft_hparams.seq_len} (the shortest needs {shortest} tokens with "
                f"this tokenizer); raise --sft-seq-len to {shortest - 1} or more (and "
                f"--max-seq-len with it)")


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PromoteError(f"{out}: exists and is not a directory; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PromoteError(f"{out}: cannot write the model directory there "
                           f"({err.strerror or err}); choose another --out") from None


def preflight(settings: PromoteSettings, run, tokenizer, records: StageRecords,
              candidate_id: int, genome: Genome) -> tuple[EvaluationPlan, list[str]]:
    """Everything that can be checked before the work starts (see the module docstring).
    Returns the evaluation's plan and the stages to redo because only their settings changed."""
    out = settings.out_dir
    sft_len = settings.sft_hparams.seq_len
    if sft_len > settings.max_seq_len:
        raise PromoteError(f"--sft-seq-len {sft_len} exceeds --max-seq-len "
                           f"{settings.max_seq_len}: a conversation must fit the chat model's "
                           f"context; lower --sft-seq-len or raise --max-seq-len")
    if run.hparams.seq_len > settings.max_seq_len:
        raise PromoteError(f"the run trained on windows of {run.hparams.seq_len} tokens "
                           f"(seq_len in {Path(settings.run_dir) / 'run.json'}); --max-seq-len "
                           f"{settings.max_seq_len} must be at least that")
    redo = records.check(candidate_id, genome, stage_settings(settings, candidate_id), out)
    _check_writable(out)  # creates it: any failure from here on removes it again if empty
    for stage, needed in (("pretrain", out / BASE_DIR / "model.safetensors"),
                          ("sft", out / "model.safetensors"),
                          ("sft", out / TOKENIZER_DIR)):
        if records.done(stage) is not None and not needed.exists():
            raise PromoteError(f"{records.path} records {stage} as done but {needed} is "
                               f"missing; restore it, or use another --out to start over")
    probe = _probe_tokenizer(tokenizer)
    if records.done("sft") is None:
        _check_sft_data(settings, probe)
    plan = plan_evaluation(settings, probe)
    return plan, redo


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
        from cluster.ray.train import pretrain_on_ray

        console.print(f"  data-parallel on {train_workers} Ray Train workers")
        step, history = pretrain_on_ray(plan, store.root, out, checkpoints, train_workers,
                                        use_gpu=device.startswith("cuda"))
        result = FitResult(step, history, interrupted=step < plan.fit.steps)
        return load_model(out), result
    with StepProgress(console, "pretrain", plan.fit.steps, store) as progress:
        model, result = pretrain(plan, store, checkpoints, device, on_step=progress,
                                 sampler=sampler, on_message=_notice(console))
    save_model(model, out)
    return model, result


def _notice(console: Console):
    """Resume notices of ``fit`` (which checkpoint, any skipped as unreadable) as plain lines:
    paths are not rich markup."""
    return lambda line: console.print(f"  {line}", markup=False, highlight=False)


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
                     device, meta=meta, on_step=progress, on_message=_notice(console))
    return model, result, batches.dropped


def promote(settings: PromoteSettings, console: Console) -> dict:
    """Run every stage not yet done; returns the metrics (also in OUT/metrics.json and
    OUT/report.md). A failure before anything is written into an output directory this call
    created removes that directory again (and the parents it created), and nothing else."""
    created = _missing_directories(settings.out_dir)
    try:
        return _promote(settings, console)
    except BaseException:
        _remove_if_empty(created)
        raise


def _missing_directories(path: Path) -> list[Path]:
    """The directories ``path.mkdir(parents=True)`` would create, deepest first."""
    missing = []
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_if_empty(directories: list[Path]) -> None:
    for directory in directories:
        try:
            if not directory.is_dir() or any(directory.iterdir()):
                return  # something was written (progress to keep), or it is not ours
            directory.rmdir()
        except OSError:
            return  # another process wrote into it meanwhile, or it went away: leave it


def _promote(settings: PromoteSettings, console: Console) -> dict:
    from cluster.app.evolve import STORE_DIR
    from cluster.ray.runtime import start_ray

    out = settings.out_dir
    candidate_id, genome, run = winner(settings.run_dir, settings.candidate_id)
    store = TokenStore.open(Path(settings.run_dir) / STORE_DIR)
    tokenizer = store.load_tokenizer()
    config = genome.to_config(store.vocab_size, settings.max_seq_len)
    base = run.hparams
    records = StageRecords(out)
    evaluation, redo = preflight(settings, run, tokenizer, records, candidate_id, genome)
    wanted = stage_settings(settings, candidate_id)
    # Saved with the first stage it begins: a failure before that leaves the directory as
    # empty as the preflight found it (and removable, if this call created it).
    attempt = records.start_attempt(settings.run_dir, candidate_id, genome)
    console.print(f"[bold]promoting[/bold] candidate #{candidate_id} {genome.summary()} "
                  f"({param_counts_analytic(config).total / 1e6:.2f}M parameters) -> {out}"
                  + (f" (attempt {attempt}; done earlier: "
                     f"{', '.join(s for s in STAGES if records.done(s) is not None) or 'none'})"
                     if attempt > 1 else ""), highlight=False)
    for note in evaluation.notes:
        console.print(f"  note: {note}", markup=False, highlight=False)

    def skipped(stage: str, what: str) -> None:
        console.rule(stage)
        console.print(f"  {stage}: done in attempt "
                      f"{records.data['stages'][stage]['finished_in_attempt']} ({what}); "
                      f"skipped", markup=False, highlight=False)

    refine_needed = records.done("refine") is None
    pretrain_needed = records.done("pretrain") is None
    ray_started = False
    if (refine_needed and not settings.in_process) or \
            (pretrain_needed and settings.train_workers > 1):
        ray_started = start_ray(settings.address)
    try:
        # 1. Refinement.
        if refine_needed:
            t0 = time.perf_counter()
            console.rule("refine: Optuna TPE + Hyperband")
            records.begin("refine", wanted["refine"])
            outcome, study = run_refinement(settings, config, base, store,
                                            run.database_target, candidate_id, console)
            records.finish("refine", {
                "best_params": outcome.best_params, "best_value": outcome.best_value,
                "complete": outcome.complete, "pruned": outcome.pruned,
                "failed": outcome.failed, "study": study.study_name,
                "seconds": time.perf_counter() - t0})
        refined = records.done("refine")
        if not refine_needed:
            skipped("refine", f"study {refined['study']}")
        console.print(f"  best trial {refined['best_value']:.4f} bpb ({refined['complete']} "
                      f"complete, {refined['pruned']} pruned, {refined['failed']} failed): "
                      f"{refined['best_params']}", highlight=False)
        tuned_config, hparams = tuned(config, base, refined["best_params"])

        # 2. Pretraining.
        if pretrain_needed:
            t0 = time.perf_counter()
            console.rule("pretrain")
            records.begin("pretrain", wanted["pretrain"])
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
            records.finish("pretrain", {
                "model": BASE_DIR, "step": pre.step, "history": pre.history.to_dict(),
                "seconds": max(time.perf_counter() - t0, pre.history.seconds)})
    finally:
        if ray_started:
            import ray

            ray.shutdown()
    pretrained = records.done("pretrain")
    if not pretrain_needed:
        skipped("pretrain", f"the model is in {out / BASE_DIR}")
    pre = FitResult(pretrained["step"], History.from_dict(pretrained["history"]))

    # 3. Chat fine-tuning on story instructions. The chat model is saved as soon as it is
    # trained, so a failure in the evaluation never costs the fine-tuning.
    if records.done("sft") is None:
        t0 = time.perf_counter()
        console.rule("chat fine-tune")
        records.begin("sft", wanted["sft"])
        train = conversations(settings.sft_conversations, settings.seed)
        val = conversations(max(64, settings.sft_conversations // 20), settings.seed,
                            heldout=True)
        write_conversations(train, out / "sft-data" / "train.jsonl")
        write_conversations(val, out / "sft-data" / "val.jsonl")
        chat_model, sft, dropped = run_sft(load_model(out / BASE_DIR, device=settings.device),
                                           tokenizer, train, val, settings.sft_hparams,
                                           settings.sft_steps, out, console, settings.seed,
                                           settings.device)
        if sft.interrupted:
            raise KeyboardInterrupt
        save_model(chat_model, out)
        tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
        records.finish("sft", {
            "model": ".", "step": sft.step, "history": sft.history.to_dict(),
            "dropped_too_long": dropped, "conversations": len(train),
            "seconds": max(time.perf_counter() - t0, sft.history.seconds)})
    else:
        skipped("sft", f"the chat model is in {out}")
        chat_model = load_model(out, device=settings.device)
        tokenizer = load_tokenizer(out / TOKENIZER_DIR)  # with the chat tokens SFT added
    fine_tuned = records.done("sft")
    sft = FitResult(fine_tuned["step"], History.from_dict(fine_tuned["history"]))

    # 4. Evaluation: held-out question answering before and after fine-tuning, samples.
    finished = records.done("evaluate")
    if finished is not None and "evaluate" not in redo and (out / "metrics.json").is_file():
        skipped("evaluate", f"{out / 'report.md'}")
        console.print("  nothing left to do", highlight=False)
        return json.loads((out / "metrics.json").read_text())
    if "evaluate" in redo:
        console.print("  --qa-questions changed: the evaluation is done again", highlight=False)
    t0 = time.perf_counter()
    console.rule("evaluate")
    records.begin("evaluate", wanted["evaluate"])
    items = evaluation.qa_items
    base_for_chat, _ = ensure_chat_tokens(load_model(out / BASE_DIR), tokenizer)
    qa_base = qa_accuracy(base_for_chat, tokenizer, items, QA_NEW_TOKENS,
                          context=settings.max_seq_len)
    qa_chat = qa_accuracy(chat_model, tokenizer, items, QA_NEW_TOKENS,
                          context=settings.max_seq_len)
    console.print(f"  held-out question answering: base {qa_base:.0%}, chat {qa_chat:.0%} "
                  f"({len(items)} questions)", highlight=False)
    samples = sample_outputs(base_for_chat, chat_model, tokenizer, settings.seed, evaluation)
    timings = {stage: records.done(stage)["seconds"] for stage in STAGES[:3]}
    timings["evaluate"] = time.perf_counter() - t0

    metrics = {
        "candidate_id": candidate_id, "genome": genome.to_dict(),
        "genome_summary": genome.summary(),
        "params": param_counts_analytic(chat_model.config).total,
        "search_val_bpb": _search_bpb(run.database_target, candidate_id),
        "refine": {"best_params": refined["best_params"],
                   "best_trial_bpb": refined["best_value"],
                   "complete": refined["complete"], "pruned": refined["pruned"],
                   "failed": refined["failed"], "trials": settings.refine.trials,
                   "tokens_per_trial": settings.refine_tokens or settings.pretrain_tokens,
                   "study": refined["study"]},
        "hparams": dataclasses.asdict(hparams), "dropout": tuned_config.dropout,
        "pretrain": {"steps": pre.step, "tokens": pre.history.tokens,
                     "val_loss": pre.val_loss,
                     "val_bpb": store.bits_per_byte(pre.val_loss, "val"),
                     "samples": [list(sample) for sample in pre.history.samples]},
        "sft": {"steps": sft.step, "conversations": fine_tuned["conversations"],
                "dropped_too_long": fine_tuned["dropped_too_long"],
                "val_loss_assistant_tokens": sft.val_loss,
                "hparams": dataclasses.asdict(settings.sft_hparams)},
        "qa_accuracy": {"base": qa_base, "chat": qa_chat, "questions": len(items)},
        "samples": samples, "notes": evaluation.notes, "seconds": timings,
        # The stages' own times as recorded (for training, summed over resumed segments): a
        # resumed promote reports the work, not just the time of its last run.
        "total_seconds": sum(timings.values()),
        "attempts": attempt,
        "hardware": hardware(settings.device),
    }
    write_report(out, metrics, pre.history, sft.history, store)
    records.finish("evaluate", {"seconds": timings["evaluate"]})
    for done in (out / "checkpoints", out / BASE_DIR / "ray-train"):  # the models are saved
        shutil.rmtree(done, ignore_errors=True)
    return metrics


def _search_bpb(database: str, candidate_id: int) -> float | None:
    db = RunDatabase(database, readonly=True)
    try:
        return next((r["val_bpb"] for r in db.leaderboard() if r["id"] == candidate_id), None)
    finally:
        db.close()


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

{seconds}; total {m['total_seconds'] / 60:.1f} min on {m['hardware']}{attempts}.
{notes}"""
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))
