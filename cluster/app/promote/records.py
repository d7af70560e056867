"""The stage records, ``OUT/promote-state.json``: what each stage ran with and what it made, so a
rerun skips what is done and refuses settings that would mix two runs in one directory."""

from __future__ import annotations

import json
from pathlib import Path

from chimera.checkpoint import atomic_write
from cluster.app.promote.settings import STAGES, STATE_FILE, PromoteError, PromoteSettings
from search.genome import Genome


def stage_settings(settings: PromoteSettings, candidate_id: int) -> dict[str, dict]:
    """What each stage's outcome depends on, keyed by the flag that sets it (so a refusal can
    name the flag). Later stages also depend on the earlier ones, which are checked first.
    Left out on purpose: --parallel, --train-workers, --device, --address, --in-process,
    --compile (how the work is run, not what it computes; data-parallel pretraining follows the
    same trajectory on any number of workers; a checkpoint still refuses a changed --compile).
    The dpo stage's record exists only once a promote with --dpo began it; "--dpo" in the
    evaluation's settings (only with --dpo: a promote without it records what it always did)
    makes a promote that adds --dpo to a finished one evaluate again."""
    budget = {"--budget": settings.budget_seconds, "--refine-share": settings.refine_share} \
        if settings.budget_seconds is not None else {}
    dpo = settings.dpo_settings
    return {
        "refine": {**budget, "--genome": candidate_id, "--trials": settings.refine.trials,
                   "--rungs": settings.refine.rungs,
                   "--refine-tokens": settings.refine_tokens or settings.pretrain_tokens,
                   "--seed": settings.seed},
        "pretrain": {"--pretrain-tokens": settings.pretrain_tokens,
                     "--max-seq-len": settings.max_seq_len,
                     **({"--finalists": settings.finalists} if settings.ranks_finalists else {})},
        "sft": {"--sft-steps": settings.sft_steps,
                "--sft-conversations": settings.sft_conversations,
                "--sft-seq-len": settings.sft_hparams.seq_len,
                "--sft-batch-size": settings.sft_hparams.batch_size,
                "--pretrain-mix": settings.pretrain_mix},
        "dpo": {"--dpo": settings.dpo, "--dpo-steps": dpo.steps, "--dpo-lr": dpo.learning_rate,
                "--dpo-beta": dpo.beta, "--dpo-pairs": settings.dpo_pairs,
                "--dpo-sft-weight": dpo.sft_weight, "--dpo-own-mistakes": dpo.own_mistakes},
        "evaluate": {"--qa-questions": settings.qa_questions,
                     **({"--dpo": True} if settings.dpo else {})},
    }


class StageRecords:
    """``OUT/promote-state.json``: for each stage the settings it was started with, whether it
    is done, its results and the attempt (run of the command) that finished it. Rewritten
    atomically after every change, so a kill leaves the previous version or the new one."""

    def __init__(self, out: Path) -> None:
        self.path = out / STATE_FILE
        self.data: dict = {}
        self._new_plan: dict | None = None
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

    @property
    def budget_plan(self) -> dict | None:
        """The stage plan of ``--budget`` (``cluster.app.promote.budget``), recorded or new."""
        return self.data.get("budget_plan", self._new_plan)

    def keep_budget_plan(self, plan: dict) -> None:
        """Record ``plan`` with the attempt (``start_attempt``), once the checks passed."""
        self._new_plan = plan

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
            settings = record.get("settings", {})
            # Flags recorded but not asked for count too: a stage recorded with --finalists 2
            # is not resumed by a command that has no --finalists (it would mean 1).
            for flag in {**settings, **wanted[stage]}:
                recorded, value = settings.get(flag), wanted[stage].get(flag)
                if recorded == value:
                    continue
                if stage == "evaluate":
                    redo.append(stage)
                    break
                state = "done" if record.get("done") else "started"
                raise PromoteError(f"{self.path}: {_refusal(stage, state, flag, recorded, value)}"
                                   f", or use another --out to start over")
        return redo

    def changed(self, stage: str, wanted: dict) -> list[str]:
        """The flags whose value differs from those ``stage`` was recorded with."""
        recorded = self.data.get("stages", {}).get(stage, {}).get("settings", {})
        return [flag for flag in {**recorded, **wanted}
                if recorded.get(flag) != wanted.get(flag)]

    def start_attempt(self, run_dir: str, candidate_id: int, genome: Genome) -> int:
        if not self.data:
            self.data = {"version": 1, "run": str(Path(run_dir).resolve()),
                         "candidate_id": candidate_id, "genome": genome.to_dict(),
                         "attempts": 0, "stages": {}}
        if self._new_plan is not None:
            self.data["budget_plan"] = self._new_plan
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
            "started_in_attempt": earlier.get("started_in_attempt", self.data["attempts"]),
            "progress": earlier.get("progress", {})}
        self.save()

    def progress(self, stage: str) -> dict:
        """A begun stage's parts done so far (its own keys; kept across attempts, saved by
        ``save``): the finalists of pretraining."""
        return self.data["stages"][stage].setdefault("progress", {})

    def finish(self, stage: str, result: dict) -> None:
        record = self.data["stages"][stage]
        record.update(done=True, finished_in_attempt=self.data["attempts"], result=result)
        self.save()

    def moved(self, stage: str, model: str) -> None:
        """Record that a done stage's model now lives in ``model`` (relative to OUT): the SFT
        model, once DPO's takes its place at the top level."""
        self.data["stages"][stage]["result"]["model"] = model
        self.save()

    def save(self) -> None:
        text = json.dumps(self.data, indent=2) + "\n"
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))


def _refusal(stage: str, state: str, flag: str, recorded, value) -> str:
    if isinstance(recorded, bool) or isinstance(value, bool):  # a switch: with it, or without
        def used(on) -> str:
            return f"with {flag}" if on else f"without {flag}"
        asked = f"asks {flag}" if value else f"has no {flag}"
        return (f"{stage} was {state} {used(recorded)}, this command {asked}; rerun "
                f"{used(recorded)} to resume")
    return (f"{stage} was {state} with {flag} {_flag_value(recorded)}, this command asks "
            f"{flag} {_flag_value(value)}; rerun with {flag} {_flag_value(recorded)} to resume")


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return "(set)" if value else "(not set)"
    return "(unset)" if value is None else str(value)
