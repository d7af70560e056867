"""``chimera evolve``: wire data, strategy, evaluator, database and display into one run.

A run lives in a directory (``cluster.app.rundir``). Resuming (``--resume RUN``) reads the
configuration back, replays the finished candidates into the strategy (so the population is what
it was), relaunches what was pending, running or cancelled, and never trains a finished genome
again.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live

from chimera.checkpoint import atomic_write
from chimera.kernels import fused_ops
from chimera.model import training_flops_per_token
from cluster.app.candidate_budget import default_candidate_budget
from cluster.app.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    DATABASE_FILE,
    STORE_DIR,
    RunDirError,
    exclusive_run,
)
from cluster.ray.node_store import DEFAULT_CACHE_ROOT, StoreTransfer
from cluster.ray.runtime import start_ray
from cluster.ray.worker import (
    CandidateSettings,
    CandidateTrainer,
    FaultPolicy,
    machine_memory,
    memory_rejection,
)
from results.db import RunDatabase
from results.leaderboard import leaderboard_table, live_view
from results.records import CandidateRecord
from search.baselines import SAMPLERS, OptunaSearch, RandomSearch
from search.evolution import AgingEvolution, EvolutionConfig, Proposal
from search.genome import Genome, get_space, preset_seeds
from search.hurdles import Hurdles
from search.loop import InProcessEvaluator, SearchLimits, SearchLoop, SearchReport
from search.objectives import Objectives
from trainers.candidate import BudgetKind, Status, TrainBudget, TrainHparams, budget_steps
from trainers.corpus import CorpusFormat, CorpusSpec, DecodeErrors, Separator
from trainers.store import (
    DEFAULT_VOCAB_SIZE,
    META_FILE,
    SplitConfig,
    StoreError,
    TokenStore,
    prepare_store,
    tokenizer_for,
    tokenizer_recipe,
)

LIVE_TOP = 10  # leaderboard rows in the live view and the final report


@dataclass(frozen=True)
class EvolveSettings:
    run_dir: str
    corpus: CorpusSpec = CorpusSpec("stories", stories_bytes=2_000_000)
    tokenizer: str = "bpe"  # bpe | char | a tokenizer directory
    vocab_size: int = DEFAULT_VOCAB_SIZE
    space: str = "cpu"
    evolution: EvolutionConfig = EvolutionConfig()
    limits: SearchLimits = SearchLimits(wall_seconds=180)
    # None: equal time on a wall clock, else tokens (cluster.app.candidate_budget)
    candidate_budget: TrainBudget | None = None
    hparams: TrainHparams = TrainHparams()
    seed: int = 0  # the search's: proposals, initial weights, batch order
    # The built-in stories and the train/validation split. Apart from ``seed`` so that runs with
    # different search seeds are scored on the same validation documents and can be compared.
    data_seed: int = 0
    warm_start: bool = True
    strategy: str = "evolution"  # evolution | random | tpe | nsga2 (the baselines)
    objectives: tuple[str, ...] = ("bpb",)  # with more than one, selection is by Pareto rank
    max_params: int | None = None  # a parameter budget tighter than the space's
    workers: int | None = None  # None: as many as the cluster's CPUs allow
    cpus_per_candidate: float = 1.0
    gpus_per_candidate: float = 0.0
    address: str | None = None  # None: an embedded local Ray
    in_process: bool = False  # no Ray: one candidate at a time in this process
    database: str | None = None  # a SQLAlchemy URL; None: RUN_DIR/results.db (SQLite)
    faults: FaultPolicy = FaultPolicy()
    store_transfer: StoreTransfer = StoreTransfer.AUTO
    store_cache: str = DEFAULT_CACHE_ROOT  # node-local copies of the store live here
    hurdles: Hurdles | None = None  # successive halving over budget rungs; None: one budget

    def __post_init__(self) -> None:
        if self.candidate_budget is None:  # frozen: set once, here, like a default
            object.__setattr__(self, "candidate_budget", default_candidate_budget(
                self.limits.wall_seconds, self.limits.train_flops, self.hurdles is not None,
                self.workers, self.cpus_per_candidate))
        Objectives(self.objectives)  # validates the names
        if self.max_params is not None and self.max_params < 1:
            raise ValueError(f"max_params must be positive, got {self.max_params}")
        if self.hurdles is not None and self.candidate_budget.kind is BudgetKind.SECONDS:
            raise ValueError("hurdles need a step or token budget per candidate, not seconds")
        if self.limits.train_flops is not None \
                and self.candidate_budget.kind is BudgetKind.SECONDS:
            raise ValueError("a FLOPs budget needs a step or token budget per candidate (what "
                             "a candidate trains in seconds cannot be known before it runs)")

    @property
    def database_target(self) -> str:
        return self.database or str(Path(self.run_dir) / DATABASE_FILE)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=_enum_value))

    @classmethod
    def from_dict(cls, data: dict) -> EvolveSettings:
        corpus = dict(data["corpus"])
        corpus.update(format=CorpusFormat(corpus["format"]), separator=Separator(
            corpus["separator"]), errors=DecodeErrors(corpus["errors"]))
        budget = data["candidate_budget"]
        # settings added after a run was made keep their defaults; runs made before the data
        # seed drew their split from the search seed
        extra = {"data_seed": data.get("data_seed", data["seed"])}
        if "faults" in data:
            extra["faults"] = FaultPolicy(**data["faults"])
        if "store_transfer" in data:
            extra["store_transfer"] = StoreTransfer(data["store_transfer"])
        if data.get("hurdles"):
            extra["hurdles"] = Hurdles(**data["hurdles"])
        if "objectives" in data:
            extra["objectives"] = tuple(data["objectives"])
        return cls(**{**data, **extra, "corpus": CorpusSpec(**corpus),
                      "evolution": EvolutionConfig(**data["evolution"]),
                      "limits": SearchLimits(**data["limits"]),
                      "candidate_budget": TrainBudget(BudgetKind(budget["kind"]),
                                                      budget["amount"]),
                      "hparams": TrainHparams.from_dict(data["hparams"])})


def _enum_value(value):
    return value.value


@dataclass
class EvolveOutcome:
    report: SearchReport
    leaders: list[CandidateRecord] = field(default_factory=list)  # the top LIVE_TOP
    parent_genomes: dict[int, dict] = field(default_factory=dict)  # of the leaders' parents
    counts: dict[str, int] = field(default_factory=dict)
    worst_bpb: float | None = None  # of every candidate that finished ok


def load_settings(run_dir: str | Path) -> EvolveSettings:
    """The settings of the run in ``run_dir``, wherever that directory now is: a run is
    relocatable, so the ``run_dir`` it recorded when it was made is replaced by this one (and
    the default database, the store and the checkpoints are found inside it)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a Chimera run (no {CONFIG_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        settings = EvolveSettings.from_dict(data)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError,
            AttributeError) as err:
        raise RunDirError(f"{path}: not a readable run configuration ({type(err).__name__}: "
                          f"{err})") from None
    return dataclasses.replace(settings, run_dir=str(run_dir))


def _write_json_atomic(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def prepare_data(settings: EvolveSettings, console: Console):
    """The run's token store: the one it already holds (a resumed run keeps its data, and
    needs neither the corpus nor the tokenizer directory it was made from), else built."""
    out = Path(settings.run_dir) / STORE_DIR
    split = SplitConfig(seed=settings.data_seed)
    recipe = tokenizer_recipe(settings.tokenizer, settings.vocab_size)
    if (out / META_FILE).is_file():
        try:
            store = TokenStore.open(out)
        except StoreError as err:
            console.print(f"[yellow]the run's store is unusable ({err}); building it "
                          f"again[/yellow]", highlight=False)
        else:
            if store.meta.get("split") == dataclasses.asdict(split) \
                    and store.meta.get("tokenizer_recipe") == recipe:
                return store
    with console.status(f"preparing the {settings.tokenizer} tokenizer and the token store "
                        f"from {settings.corpus.describe()}"):
        tokenizer = tokenizer_for(settings.corpus, settings.tokenizer, settings.vocab_size, out)
        store, _ = prepare_store(settings.corpus, tokenizer, out, split,
                                 tokenizer_recipe=recipe)
    return store


def _proposal_of(record: CandidateRecord) -> Proposal:
    return Proposal(Genome.from_dict(record.genome), record.parents, record.operator,
                    record.generation)


STRATEGIES = ("evolution", "random", "tpe", "nsga2")


def make_strategy(name: str, space, settings: EvolveSettings, seeds: list[Genome]):
    """Aging evolution, or a baseline on the same space and interface."""
    if name == "evolution":
        return AgingEvolution(space, settings.evolution, settings.seed, seeds)
    if name == "random":
        return RandomSearch(space, settings.seed, seeds)
    if name in SAMPLERS:
        return OptunaSearch(space, name, settings.seed, seeds,
                            population_size=settings.evolution.population_size,
                            n_objectives=len(settings.objectives),
                            final_rung=settings.hurdles.rungs - 1 if settings.hurdles else 0)
    raise ValueError(f"unknown strategy {name!r}: choose from {', '.join(STRATEGIES)}")


def build_strategy(settings: EvolveSettings, vocab_size: int, db: RunDatabase):
    """A fresh strategy, or one replayed from the database's history when resuming."""
    space = dataclasses.replace(get_space(settings.space), vocab_size=vocab_size)
    if settings.max_params is not None:
        space = dataclasses.replace(space, max_params=min(settings.max_params,
                                                          space.max_params or settings.max_params))
    objectives = Objectives(settings.objectives)
    history = db.finished_records()
    done = {record.genome_key for record in history}
    seeds = [g for g in preset_seeds(space) if space.repair(g).key not in done] \
        if settings.warm_start else []
    strategy = make_strategy(settings.strategy, space, settings, seeds)
    for record in history:
        strategy.tell(record.id, _proposal_of(record), objectives.of(record.result),
                      rung=record.rung)
    if history:  # a resumed search draws fresh randomness, deterministically
        strategy.reseed(f"{settings.seed}:{len(history)}")
    relaunch = [(record.id, _proposal_of(record)) for record in db.unfinished_records()]
    for _, proposal in relaunch:
        strategy.mark_seen(proposal.genome.key)
    return strategy, len(history), relaunch


def _make_evaluator(settings: EvolveSettings, candidate: CandidateSettings):
    """The evaluator, and whether Ray was started for it (and must be shut down)."""
    if settings.in_process:
        trainer = CandidateTrainer(candidate, "in-process")
        available = machine_memory()
        return InProcessEvaluator(
            lambda genome, candidate_id, rung: trainer.train(genome.to_dict(), candidate_id,
                                                             rung), slots=1,
            reject=lambda genome: memory_rejection(genome, candidate, available,
                                                   "this machine"),
            release=lambda candidate_id: candidate.checkpoint_path(candidate_id).unlink(
                missing_ok=True)), False
    import ray

    from cluster.ray.evaluator import RayEvaluator
    from cluster.ray.node_store import ship_store

    started = start_ray(settings.address)
    workers = settings.workers or max(
        1, int(ray.cluster_resources().get("CPU", 1) // settings.cpus_per_candidate))
    # Ship the store through the object store only where a node may not see this directory.
    alone = sum(1 for node in ray.nodes() if node.get("Alive")) == 1
    store = ship_store(candidate.store_dir, settings.store_transfer, settings.store_cache,
                       ship=settings.store_transfer is StoreTransfer.COPY or not alone)
    return RayEvaluator(candidate, workers, settings.cpus_per_candidate,
                        settings.gpus_per_candidate, store, settings.faults,
                        name_prefix=f"{Path(settings.run_dir).name}-"), started


class EventLog:
    """A ``Recorder`` that writes to the database and prints one line per event."""

    def __init__(self, db: RunDatabase, console: Console) -> None:
        self.db, self.console = db, console

    def _say(self, text: str) -> None:
        self.console.print(f"[{time.strftime('%H:%M:%S')}] {text}", highlight=False)

    def lookup(self, genome_key: str):
        return self.db.lookup(genome_key)

    def record_proposal(self, proposal: dict) -> int:
        return self.db.record_proposal(proposal)

    def record_start(self, candidate_id: int, worker: str) -> None:
        self.db.record_start(candidate_id, worker)
        self._say(f"#{candidate_id} started on {worker or 'a worker'}")

    def record_result(self, candidate_id: int, result: dict) -> None:
        self.db.record_result(candidate_id, result)
        bpb = result.get("val_bpb")
        score = f"{bpb:.4f} bpb" if bpb is not None else (result.get("error") or "")[:200]
        attempts = result.get("attempts", 1)
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        self._say(f"#{candidate_id} {result['status']}{tries}: {score}")

    def record_reused(self, proposal: dict, source_id: int, result: dict) -> int:
        candidate_id = self.db.record_reused(proposal, source_id, result)
        self._say(f"#{candidate_id} reuses #{source_id} (same genome)")
        return candidate_id

    def record_cancelled(self, candidate_id: int, reason: str) -> None:
        self.db.record_cancelled(candidate_id, reason)
        self._say(f"#{candidate_id} cancelled: {reason}")

    def record_rung(self, candidate_id: int, rung: int, result: dict) -> None:
        self.db.record_rung(candidate_id, rung, result)
        bpb = result.get("val_bpb")
        self._say(f"#{candidate_id} rung {rung}: {result['status']}"
                  + (f" {bpb:.4f} bpb" if bpb is not None else ""))


def _rung_history(db: RunDatabase) -> list[tuple[int, float]]:
    """The hurdle results of finished candidates (a resumed run's bars start from them; the
    rungs of candidates still owed are trained again)."""
    finished = {record.id for record in db.finished_records()}
    arrived = sorted(db.rung_records(), key=lambda rung: rung.finished_at)  # a window needs order
    return [(rung.rung, rung.val_bpb) for rung in arrived
            if rung.candidate_id in finished and rung.status is Status.OK
            and rung.val_bpb is not None]


def _rung_steps(settings: EvolveSettings) -> tuple[int, ...]:
    """Total steps at the end of each hurdle rung; () without hurdles."""
    if settings.hurdles is None:
        return ()
    return settings.hurdles.steps(budget_steps(settings.candidate_budget, settings.hparams))


def training_flops(settings: EvolveSettings, vocab_size: int) -> Callable[[Genome, int], float]:
    """FLOPs of training a genome from scratch to the end of a rung (the whole budget without
    hurdles), as the trainer counts them after the fact."""
    steps = _rung_steps(settings) or (budget_steps(settings.candidate_budget, settings.hparams),)
    seq_len = settings.hparams.seq_len
    tokens_per_step = settings.hparams.batch_size * seq_len

    def flops(genome: Genome, rung: int) -> float:
        config = genome.to_config(vocab_size, max_seq_len=seq_len)
        return float(steps[rung] * tokens_per_step * training_flops_per_token(config, seq_len))

    return flops


def run_evolve(settings: EvolveSettings, console: Console | None = None,
               live: bool = True, spent_seconds: float = 0.0) -> EvolveOutcome:
    """Run (or resume) the search. ``spent_seconds``: of the wall clock, what the command spent
    before this call (its start-up): a ``--budget`` is the command's wall clock, so that and
    the setting up here (the store, Ray, the kernels) come out of the search's time."""
    began = time.monotonic() - spent_seconds
    run_dir = Path(settings.run_dir)
    # The outermost folder this call creates (runs/ too, for a first runs/<timestamp>).
    created = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_run(run_dir):
        return _evolve(settings, console or Console(), live, created, began)


def _candidate_settings(settings: EvolveSettings, store: TokenStore) -> CandidateSettings:
    """How every worker trains a candidate of this run."""
    return CandidateSettings(
        store_dir=str(store.root), budget=settings.candidate_budget, hparams=settings.hparams,
        seed=settings.seed, vocab_size=store.vocab_size,
        threads=max(1, int(settings.cpus_per_candidate)), rung_steps=_rung_steps(settings),
        checkpoint_dir=str(Path(settings.run_dir) / CHECKPOINT_DIR),
        device="cuda" if settings.gpus_per_candidate > 0 else "cpu")


def _time_left(limits: SearchLimits, began: float) -> SearchLimits:
    """``limits`` less what the command spent since ``began`` (a ``time.monotonic()``): its
    start-up and the setting up (the store, Ray, the kernels) come out of the search's time."""
    if limits.wall_seconds is None:
        return limits
    return dataclasses.replace(limits, wall_seconds=max(
        1.0, limits.wall_seconds - (time.monotonic() - began)))


def _evolve(settings: EvolveSettings, console: Console, live: bool, created: Path | None,
            began: float) -> EvolveOutcome:
    run_dir = Path(settings.run_dir)
    try:  # what can fail on bad input fails here, before the run is recorded
        db = RunDatabase(settings.database_target)  # a bad URL, a damaged database
        store = prepare_data(settings, console)  # bad data
    except BaseException:
        if created is not None:  # leave nothing behind: all of it is this call's
            shutil.rmtree(created, ignore_errors=True)
        raise
    if settings.gpus_per_candidate == 0:
        # Compile the fused CPU kernels here, once per machine (~30 s the first time, a cache
        # hit after), rather than inside the first candidates' timed training on the workers.
        with console.status("fused CPU kernels (compiled once per machine)"):
            fused_ops()
    _write_json_atomic(run_dir / CONFIG_FILE, settings.to_dict())
    db.set_config(settings.to_dict() | {"store": store.meta})
    strategy, already, relaunch = build_strategy(settings, store.vocab_size, db)
    evaluator, started_ray = _make_evaluator(settings, _candidate_settings(settings, store))
    started = time.monotonic()

    flops_budget, already_flops = settings.limits.train_flops, db.train_flops_spent()
    loop = None  # built below; the first frame is drawn before it

    def view():
        # The loop's count of finished training (read once from the database, not per frame);
        # before the loop exists or runs, what earlier sessions spent.
        spent = max(already_flops, loop.flops_spent if loop else 0.0)
        leaders = db.leaderboard_records(LIVE_TOP)
        return live_view(leaders, db.running_records(), db.counts(),
                         time.monotonic() - started, settings.limits.wall_seconds,
                         settings.limits.max_candidates,
                         (spent, flops_budget) if flops_budget else None,
                         db.parent_genomes(leaders))

    # Transient: when the run ends the live view gives way to the final leaderboard. Without a
    # terminal (a submitted Ray job, a log file) each event is a line instead.
    live = live and console.is_terminal
    display = Live(view(), console=console, refresh_per_second=4, transient=True) \
        if live else None
    recorder = db if live else EventLog(db, console)
    loop = SearchLoop(strategy, evaluator, recorder, _time_left(settings.limits, began),
                      hurdles=settings.hurdles,
                      objectives=Objectives(settings.objectives), rung_history=_rung_history(db),
                      on_tick=(lambda: display.update(view())) if display else None,
                      train_flops=training_flops(settings, store.vocab_size)
                      if settings.limits.train_flops else None,
                      candidate_seconds=settings.candidate_budget.amount
                      if settings.candidate_budget.kind is BudgetKind.SECONDS else None)
    try:
        if display:
            display.start()
        report = loop.run(already_launched=already + len(relaunch), relaunch=relaunch,
                          already_flops=already_flops)
    except KeyboardInterrupt:
        for candidate_id in evaluator.cancel_all():
            db.record_cancelled(candidate_id, "interrupted")
        loop.report.stop_reason = "interrupted"
        report = loop.report
    finally:
        if display:
            display.stop()
        evaluator.close()
        if started_ray:
            import ray

            ray.shutdown()
        # Checkpoints only carry a candidate between rungs of this session (a resumed run
        # retrains what was in flight from rung 0), so none outlives it.
        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    ranked = db.leaderboard_records()
    outcome = EvolveOutcome(report, ranked[:LIVE_TOP], db.parent_genomes(ranked[:LIVE_TOP]),
                            db.counts(), ranked[-1].val_bpb if ranked else None)
    db.close()
    return outcome


def print_outcome(outcome: EvolveOutcome, run_dir: str, console: Console) -> None:
    report = outcome.report
    console.print(leaderboard_table(outcome.leaders, f"leaderboard of {run_dir}",
                                    outcome.parent_genomes))
    console.print(f"stopped: {report.stop_reason}; {report.completed} trained, {report.reused} "
                  f"reused, {report.cancelled} cancelled in {report.seconds:.0f}s "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(report.statuses.items()))})",
                  highlight=False)
    if outcome.leaders:
        best = outcome.leaders[0]
        console.print(f"best: #{best.id} {best.summary} at {best.val_bpb:.4f} bpb "
                      f"(worst that finished ok: {outcome.worst_bpb:.4f})", highlight=False)
