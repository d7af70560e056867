"""`chimera promote` under faults: SIGKILL in every stage, a damaged checkpoint, bad input.

One tiny character-level run (the tokenizer whose one-token-per-character prompts used to fail
the evaluation after every other stage had run) is promoted by a subprocess that is killed in
refinement, pretraining, fine-tuning and evaluation in turn, each kill placed by watching the
stage records, the checkpoint directories and stdout (never a fixed sleep); each rerun must
continue, and no stage finished before a kill may be done again.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from cluster.app.promote import STATE_FILE
from cluster.cli import main
from trainers.checkpoints import CheckpointManager

CHAR_RUN = ["--corpus-size", "60KB", "--tokenizer", "char", "--batch-size", "4", "--seq-len",
            "32", "--population", "4", "--tournament", "2", "--in-process", "--max-candidates",
            "3", "--candidate-steps", "5", "--no-live"]
# Enough steps in pretraining and fine-tuning that a kill lands between two checkpoints.
PROMOTE = ["--genome", "1", "--trials", "3", "--rungs", "2", "--parallel", "1", "--in-process",
           "--refine-tokens", "3K", "--pretrain-tokens", "2K", "--max-seq-len", "640",
           "--sft-steps", "40", "--sft-conversations", "40", "--sft-seq-len", "256",
           "--sft-batch-size", "4", "--qa-questions", "4"]
MODEL_FILES = ("model.safetensors", "config.json", "tokenizer/tokenizer.json", "report.md",
               "metrics.json", "loss_curves.png", "base/model.safetensors",
               "base/tokenizer/tokenizer.json", "sft-data/train.jsonl", STATE_FILE)
DEADLINE = 150  # seconds for one stage to be reached (a loaded 2-core machine)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("faults") / "run"
    assert main(["evolve", "--run-dir", str(run), *CHAR_RUN]) == 0
    return run


def _state(out) -> dict:
    try:
        return json.loads((out / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _stage(out, stage) -> dict:
    return _state(out).get("stages", {}).get(stage, {})


def _running(out, stage) -> bool:
    record = _stage(out, stage)
    return bool(record) and not record["done"]


class Promote:
    """``python -m cluster.cli promote`` in a subprocess, its output collected as it comes."""

    def __init__(self, run, out, *extra):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}  # no wrapped lines
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "promote", str(run), "--out", str(out),
             *PROMOTE, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env)
        self.lines: list[str] = []
        self.started = time.monotonic()
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout))
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, what: str, condition) -> None:
        deadline = time.monotonic() + DEADLINE
        while not condition():
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {what}:\n" \
                                             f"{self.output}"
            assert time.monotonic() < deadline, f"no {what} in {DEADLINE} s:\n{self.output}"
            time.sleep(0.02)

    def kill(self) -> str:
        self.proc.send_signal(signal.SIGKILL)
        return self.finish(expect=-signal.SIGKILL)

    def finish(self, expect=0) -> str:
        self.proc.wait(timeout=300)
        self.reader.join()
        print(f"promote ran {time.monotonic() - self.started:.1f} s, exit {self.proc.returncode}")
        assert self.proc.returncode == expect, self.output
        return self.output


def _trials(run) -> list:
    study = optuna.load_study(study_name="refine-candidate-1",
                              storage=f"sqlite:///{run / 'results.db'}")
    return study.trials


@pytest.fixture(scope="module")
def killed_in_every_stage(run, tmp_path_factory):
    """Kill a promote in each stage in turn, rerunning after each kill; what each run said."""
    out = tmp_path_factory.mktemp("promoted") / "model"
    pretrain_dir = out / "checkpoints" / "pretrain"
    sft_dir = out / "checkpoints" / "sft"
    said, facts = {}, {}
    running = None
    try:
        # 1. In refinement, once a trial has finished (its result is in the study).
        running = Promote(run, out)
        running.wait_for("finished trial", lambda: _running(out, "refine") and re.search(
            r"trial \d+ rung 2/2: .* -> (complete|pruned)", running.output))
        said["refine"] = running.kill()
        facts["trials_at_kill"] = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                                      for t in _trials(run))
        # 2. In pretraining, once two checkpoints are written; then damage the newest.
        running = Promote(run, out)
        running.wait_for("second pretraining checkpoint", lambda: _running(out, "pretrain")
                         and len(CheckpointManager(pretrain_dir).paths()) >= 2)
        said["pretrain"] = running.kill()
        paths = CheckpointManager(pretrain_dir).paths()
        facts["newest"], facts["previous"] = paths[-1], paths[-2]
        facts["previous_step"] = CheckpointManager.load(paths[-2]).step
        data = paths[-1].read_bytes()
        paths[-1].write_bytes(data[:len(data) // 3])  # a copy cut short
        # 3. In fine-tuning, once its first checkpoint is written.
        running = Promote(run, out)
        running.wait_for("fine-tuning checkpoint", lambda: _running(out, "sft")
                         and CheckpointManager(sft_dir).paths())
        said["sft"] = running.kill()
        facts["sft_step_at_kill"] = CheckpointManager.load(
            CheckpointManager(sft_dir).latest()).step
        # 4. In the evaluation, as soon as it starts.
        running = Promote(run, out)
        running.wait_for("evaluation", lambda: _running(out, "evaluate"))
        said["evaluate"] = running.kill()
        facts["chat_model_before_evaluation"] = (out / "model.safetensors").is_file()
        # 5. To the end.
        running = Promote(run, out)
        said["final"] = running.finish()
        running = None
    finally:
        if running is not None and running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait()
    return out, said, facts


def test_a_kill_in_each_stage_resumes_without_redoing_finished_stages(run,
                                                                      killed_in_every_stage):
    out, said, facts = killed_in_every_stage
    for name in MODEL_FILES:
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()
    state = _state(out)
    assert state["attempts"] == 5
    # Each stage finished in the run after the one killed in it, and was never done again.
    finished = {stage: record["finished_in_attempt"] for stage, record in
                state["stages"].items()}
    assert finished == {"refine": 2, "pretrain": 3, "sft": 4, "evaluate": 5}
    # Refinement: the rerun completed the study, no more trials than asked for.
    assert 1 <= facts["trials_at_kill"] < 3
    done = [t for t in _trials(run) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["refine"]["complete"] + metrics["refine"]["pruned"] == 3
    # Later runs skip what is recorded as done: no trial, no pretraining step redone.
    for later in ("sft", "evaluate", "final"):
        assert "refine: done in attempt 2" in said[later]
        assert not re.search(r"trial \d+ rung", said[later])
    for later in ("evaluate", "final"):
        assert "pretrain: done in attempt 3" in said[later]
        assert "pretrain step" not in said[later]
    # Fine-tuning resumed from its checkpoint, and the chat model was saved before the
    # evaluation began, so the kill there cost no fine-tuning.
    assert f"resuming from {out / 'checkpoints' / 'sft'}" in said["evaluate"]
    assert f"step {facts['sft_step_at_kill']} of 40" in said["evaluate"]
    assert facts["chat_model_before_evaluation"]
    assert "sft: done in attempt 4" in said["final"] and "sft step" not in said["final"]
    assert metrics["attempts"] == 5 and metrics["sft"]["steps"] == 40


def test_a_damaged_newest_pretrain_checkpoint_resumes_from_the_one_before(
        killed_in_every_stage):
    out, said, facts = killed_in_every_stage
    resumed = said["sft"]  # the run after the damage
    warning = next(line for line in resumed.splitlines() if "warning:" in line)
    assert str(facts["newest"]) in warning and "not a readable checkpoint" in warning
    assert f"resuming from {facts['previous']} (step {facts['previous_step']} of" in resumed
    assert facts["previous_step"] > 0  # not restarted from step 0
    assert "weights_only" not in resumed
    pre = _state(out)["stages"]["pretrain"]["result"]
    assert pre["step"] == json.loads((out / "metrics.json").read_text())["pretrain"]["steps"]


def test_char_tokenizer_evaluation_notes_what_did_not_fit(killed_in_every_stage):
    out, _, _ = killed_in_every_stage
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["qa_accuracy"]["questions"] == 4
    report = (out / "report.md").read_text()
    assert "## Notes" in report and "too long for --max-seq-len 640" in report
    assert len(metrics["samples"]["chat"]) == 4  # three questions and a held-out one


def test_a_finished_promote_refuses_other_settings_and_reevaluates_only(
        run, killed_in_every_stage, capsys):
    out, _, _ = killed_in_every_stage
    args = ["promote", str(run), "--out", str(out), *PROMOTE]
    other = list(args)
    other[other.index("--trials") + 1] = "4"
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "refine was done with --trials 3, this command asks --trials 4" in err
    assert str(out / STATE_FILE) in err
    fewer = list(args)
    fewer[fewer.index("--qa-questions") + 1] = "3"
    assert main(fewer) == 0
    said = capsys.readouterr().out
    assert "the evaluation is done again" in said and "pretrain: done in attempt 3" in said
    assert json.loads((out / "metrics.json").read_text())["qa_accuracy"]["questions"] == 3
    assert _state(out)["stages"]["sft"]["finished_in_attempt"] == 4


# ----------------------------------------------------------------------------- bad input
def _refused(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_not_a_run_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    _refused(["promote", str(tmp_path)], capsys, "not a run directory", "run.json")
    assert not (tmp_path / "promoted").exists()
    _refused(["promote", str(tmp_path / "missing")], capsys, "not a run directory")


@pytest.mark.parametrize("text", ["{not json", "{}", "[1, 2]"])
def test_a_garbage_run_json_names_the_file(tmp_path, capsys, text):
    (tmp_path / "run.json").write_text(text)
    _refused(["promote", str(tmp_path)], capsys, str(tmp_path / "run.json"))
    assert not (tmp_path / "promoted").exists()


def test_a_run_with_no_finished_candidate(run, tmp_path, capsys):
    from results.db import RunDatabase

    settings = json.loads((run / "run.json").read_text())
    settings.update(run_dir=str(tmp_path), database=None)
    (tmp_path / "run.json").write_text(json.dumps(settings))
    RunDatabase(tmp_path / "results.db").close()  # a database with no candidate in it
    _refused(["promote", str(tmp_path)], capsys, "no candidate finished ok")


def test_a_missing_genome_id(run, capsys):
    _refused(["promote", str(run), "--genome", "99"], capsys, "candidate 99",
             "chimera leaderboard")
    assert not (run / "promoted").exists()


def test_preflight_refuses_before_any_work_and_removes_only_what_it_created(run, tmp_path,
                                                                            capsys):
    nested = tmp_path / "a" / "b" / "model"
    _refused(["promote", str(run), "--out", str(nested), "--sft-seq-len", "600"], capsys,
             "--sft-seq-len 600 exceeds --max-seq-len 512")
    _refused(["promote", str(run), "--out", str(nested), "--sft-seq-len", "16"], capsys,
             "fits --sft-seq-len 16", "raise --sft-seq-len to")
    # Too small a context for any held-out question (one token per character): refused by
    # the preflight, after it made the folders, which it then removes, all three.
    _refused(["promote", str(run), "--out", str(nested), "--max-seq-len", "64",
              "--sft-seq-len", "64"], capsys, "--max-seq-len")
    assert not (tmp_path / "a").exists()
    mine = tmp_path / "mine"
    mine.mkdir()  # the user's own (empty) folder is never removed
    _refused(["promote", str(run), "--out", str(mine), "--max-seq-len", "64",
              "--sft-seq-len", "64"], capsys, "--max-seq-len")
    assert mine.is_dir()
