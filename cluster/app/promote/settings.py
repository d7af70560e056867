"""What ``chimera promote`` is asked to do: its settings, its error, the candidate it promotes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from results.db import RunDatabase
from search.genome import Genome
from search.refine import RefineSettings
from trainers.dpo import DpoSettings
from trainers.recipe import TrainHparams

BASE_DIR = "base"
STATE_FILE = "promote-state.json"
STAGES = ("refine", "pretrain", "sft", "dpo", "evaluate")  # dpo: only with --dpo
STORY_PROMPT = "Once upon a time, there was a little"
SAMPLE_QUESTIONS = ["Hello!", "Tell me a story about Lily at the park.", "What can you do?"]
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
    # A wall clock for the whole promote (``--budget``): the stages' tokens and steps are then
    # sized to it on this machine (cluster.app.promote.budget), replacing pretrain_tokens,
    # refine_tokens and sft_steps (the last becomes a cap).
    budget_seconds: float | None = None
    # Under a budget, pretraining's wall clock (the plan's): it trains until these are spent,
    # ``pretrain_tokens`` only setting its evaluations' cadence (see budget.py).
    pretrain_seconds: float | None = None
    sft_seconds: float | None = None  # likewise fine-tuning's (sft_steps then caps it)
    # Under a budget, refinement's share of it (0: none; its gain at CPU budgets, BENCHMARKS.md).
    refine_share: float = 0.0
    # Under a budget, with no --genome and no refinement: pretraining's time is shared by up to
    # this many finalists of growing size, and the best is the base model (finalists.py). 1 (off)
    # by default: three finalists on the 30-minute bench did not pay (BENCHMARKS.md).
    finalists: int = 1
    max_seq_len: int = 512  # the chat model's context
    sft_steps: int = 400
    sft_conversations: int = 4000
    # 3e-3 (pretraining's rate) with a quarter of each batch plain text: on tinyshakespeare,
    # 400 steps, held-out QA 16% and chat/base bpb 0.99x, against 8% and 1.00x at 1e-3 with half.
    sft_hparams: TrainHparams = TrainHparams(learning_rate=3e-3, warmup_fraction=0.05,
                                             batch_size=16, seq_len=320, eval_batches=4,
                                             weight_decay=0.0)
    # Share of each fine-tuning batch's rows that are plain windows of the corpus's training
    # text (loss on every token), so the chat model keeps the corpus it was pretrained on.
    pretrain_mix: float = 0.25
    qa_questions: int = 100
    # Preference tuning (DPO) of the chat model after fine-tuning, on pairs of a right and a
    # wrong answer to reading questions about the run's corpus (``cluster.app.dpo``).
    dpo: bool = False
    dpo_settings: DpoSettings = DpoSettings()  # its max_length and seed: the promote's
    dpo_pairs: int = 2000  # training pairs
    train_workers: int = 1  # Ray Train workers for pretraining; 1: in this process
    in_process: bool = False  # refinement trials in this process instead of on Ray actors
    address: str | None = None
    device: str = "cpu"
    compile: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.budget_seconds is not None and not self.budget_seconds > 0:
            raise ValueError(f"budget_seconds must be positive, got {self.budget_seconds}")
        if not 0 <= self.refine_share < 0.8:
            raise ValueError(f"refine_share must be in [0, 0.8), got {self.refine_share}")
        if self.finalists < 1:
            raise ValueError(f"finalists must be at least 1, got {self.finalists}")
        if self.dpo_pairs < 1:
            raise ValueError(f"dpo_pairs must be at least 1, got {self.dpo_pairs}")

    @property
    def skips_refinement(self) -> bool:
        """A budget that gives refinement no share: the search's hyperparameters are kept."""
        return self.budget_seconds is not None and self.refine_tokens is None

    @property
    def ranks_finalists(self) -> bool:
        """Whether pretraining ranks finalists: under a budget, the search's pick (no
        --genome), its hyperparameters (no refinement), and more than one asked for."""
        return self.skips_refinement and self.candidate_id is None and self.finalists > 1

    @property
    def out_dir(self) -> Path:
        return Path(self.out or Path(self.run_dir) / "promoted")


# ----------------------------------------------------------------------------- the winner
def run_settings(run_dir: str):
    """The run's ``EvolveSettings``, or a PromoteError naming its run.json."""
    from cluster.app.evolve import load_settings
    from cluster.app.rundir import CONFIG_FILE, RunDirError

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
    return settings


def winner(run_dir: str, candidate_id: int | None):
    """The candidate to promote: (id, genome, the run's ``EvolveSettings``)."""
    settings = run_settings(run_dir)
    try:
        db = RunDatabase(settings.database_target, readonly=True)
    except FileNotFoundError as err:
        raise PromoteError(f"{err}; is {run_dir} a run of chimera evolve?") from None
    try:
        records = db.leaderboard_records()
    finally:
        db.close()
    if not records:
        raise PromoteError(f"{run_dir}: no candidate finished ok; nothing to promote")
    if candidate_id is not None:
        records = [r for r in records if r.id == candidate_id]
        if not records:
            raise PromoteError(f"{run_dir}: candidate {candidate_id} did not finish ok (or "
                               f"does not exist); see `chimera leaderboard {run_dir}`")
    record = records[0]
    return record.id, Genome.from_dict(record.genome), settings


# ----------------------------------------------------------------------------- stage records
