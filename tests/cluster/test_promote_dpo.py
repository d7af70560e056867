"""`chimera promote --dpo`: preference tuning after the chat fine-tune. The SFT model moves to
OUT/sft unchanged, the SFT+DPO model takes the top level, the evaluation compares the three
models, a rerun does nothing, other DPO settings are refused, a promote stopped in DPO resumes
from TRL's checkpoint, and a promote without --dpo keeps the layout it always had.

One tiny run is promoted once without --dpo; the DPO promote starts from a copy of that
directory (its stages done), so it pays only for DPO and the evaluation."""

import contextlib
import io
import json
import shutil

import pytest
from safetensors.torch import load_file

from chimera.inference import load_pretrained
from cluster.app.promote import STATE_FILE
from cluster.cli import main

TINY_RUN = ["--corpus-size", "40KB", "--tokenizer", "bpe", "--vocab-size", "400",
            "--batch-size", "4", "--seq-len", "32", "--population", "2", "--tournament", "2",
            "--in-process", "--max-candidates", "1", "--candidate-steps", "3", "--no-live"]
# As small as promote goes: one refinement trial, a few pretraining and fine-tuning steps.
PROMOTE = ["--genome", "1", "--in-process", "--trials", "1", "--rungs", "1",
           "--refine-tokens", "512", "--pretrain-tokens", "384", "--max-seq-len", "512",
           "--sft-steps", "2", "--sft-conversations", "16", "--sft-seq-len", "256",
           "--sft-batch-size", "2", "--qa-questions", "2"]
# Four steps: TRL checkpoints every quarter (each step), so a stop at step 2 resumes from 1.
DPO = ["--dpo", "--dpo-steps", "4", "--dpo-pairs", "12"]


def _state(out) -> dict:
    return json.loads((out / STATE_FILE).read_text())


def _promote(run, out, *extra) -> int:
    return main(["promote", str(run), "--out", str(out), *PROMOTE, *extra])


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A run and its promote without --dpo."""
    run = tmp_path_factory.mktemp("dpo-run") / "run"
    assert main(["evolve", "--run-dir", str(run), *TINY_RUN]) == 0
    assert _promote(run, run / "promoted") == 0
    return run, run / "promoted"


@pytest.fixture(scope="module")
def tuned(plain, tmp_path_factory):
    """The plain promote's directory promoted again with --dpo: stopped (Ctrl+C) at DPO's
    second step, then run again to the end. Returns the run, the plain and the tuned
    directories, and what was found after the stop and said by the rerun."""
    import cluster.app.dpo

    run, source = plain
    out = tmp_path_factory.mktemp("dpo-out") / "model"
    shutil.copytree(source, out)
    progress = cluster.app.dpo.DpoProgress.__call__

    def stop_at_step_two(self, step, total, logs):
        progress(self, step, total, logs)
        if step == 2 and logs is None:  # after the step, before TRL saves it
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cluster.app.dpo.DpoProgress, "__call__", stop_at_step_two)
        assert _promote(run, out, *DPO) == 130
    stopped = {"state": _state(out),
               "checkpoints": sorted(p.name for p in (out / "checkpoints" / "dpo").glob(
                   "checkpoint-*")),
               "top_is_sft": (out / "model.safetensors").read_bytes()
               == (out / "sft" / "model.safetensors").read_bytes()}
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        assert _promote(run, out, *DPO) == 0
    return run, source, out, stopped, said.getvalue()


def test_without_dpo_the_layout_is_unchanged(plain):
    _, out = plain
    assert not (out / "sft").exists() and not (out / "dpo-data").exists()
    assert "dpo" not in _state(out)["stages"]
    assert _state(out)["stages"]["evaluate"]["settings"] == {"--qa-questions": 2}
    metrics = json.loads((out / "metrics.json").read_text())
    assert "dpo" not in metrics and "preference_accuracy" not in metrics
    assert set(metrics["qa_accuracy"]) == {"base", "chat", "questions", "source"}
    assert set(metrics["heldout_bpb"]) == {"base", "chat"}
    assert set(metrics["seconds"]) == {"refine", "pretrain", "sft", "evaluate"}
    assert "Preference tuning" not in (out / "report.md").read_text()


def test_dpo_keeps_the_sft_model_and_puts_the_dpo_model_on_top(tuned):
    _, source, out, _, _ = tuned
    for name in ("model.safetensors", "config.json", "tokenizer/tokenizer.json",
                 "sft/model.safetensors", "sft/config.json", "sft/tokenizer/tokenizer.json",
                 "dpo-data/train.jsonl", "base/model.safetensors", "report.md"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()  # TRL's optimizer states go when done
    # The SFT model moved unchanged; the top level is now another (the tuned) model.
    assert (out / "sft" / "model.safetensors").read_bytes() == \
        (source / "model.safetensors").read_bytes()
    sft, top = load_file(out / "sft" / "model.safetensors"), load_file(out / "model.safetensors")
    assert sft.keys() == top.keys() and any(not sft[k].equal(top[k]) for k in sft)
    lines = (out / "dpo-data" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 12
    # Own mistakes by default: the file marks the pairs whose rejected reply is the SFT
    # model's own answer, and the metrics count them.
    own = json.loads((out / "metrics.json").read_text())["dpo"]["own_mistakes"]
    assert own == sum(json.loads(line)["own_mistake"] for line in lines)
    assert _state(out)["stages"]["dpo"]["settings"]["--dpo-own-mistakes"] is True
    load_pretrained(out)
    load_pretrained(out / "sft")  # chimera chat OUT/sft works too
    stages = _state(out)["stages"]
    assert stages["dpo"]["done"] and stages["sft"]["result"]["model"] == "sft"
    assert stages["dpo"]["settings"]["--dpo-steps"] == 4


def test_a_promote_stopped_in_dpo_resumes_from_its_checkpoint(tuned):
    _, _, out, stopped, said = tuned
    stages = stopped["state"]["stages"]
    assert not stages["dpo"]["done"] and "evaluate" in stages  # the plain promote's
    assert stages["sft"]["result"]["model"] == "sft"  # sft/ written and recorded first
    assert stopped["checkpoints"] == ["checkpoint-1"]
    assert stopped["top_is_sft"]  # stopped before the top level was replaced
    assert "resumed from DPO step 1" in said and "--dpo changed" in said
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dpo"]["steps"] == 4 and metrics["dpo"]["resumed_from_step"] == 1
    assert metrics["attempts"] == 3
    assert "resumed from step 1" in (out / "report.md").read_text()


def test_dpo_metrics_and_report_compare_base_sft_and_dpo(tuned):
    out = tuned[2]
    metrics = json.loads((out / "metrics.json").read_text())
    for section in ("qa_accuracy", "preference_accuracy", "heldout_bpb"):
        assert all(0 <= metrics[section][name] for name in ("base", "sft", "chat")), section
    assert all(metrics["preference_accuracy"][name] <= 1 for name in ("base", "sft", "chat"))
    assert metrics["preference_accuracy"]["pairs"] == 2  # --qa-questions held-out pairs
    dpo = metrics["dpo"]
    assert dpo["pairs"] == 12 and dpo["settings"]["max_length"] == 512
    assert dpo["history"]["logs"] >= 1 and "loss" in dpo["history"]["last"]
    assert list(metrics["seconds"]) == ["refine", "pretrain", "sft", "dpo", "evaluate"]
    assert metrics["seconds"]["dpo"] > 0
    report = (out / "report.md").read_text()
    assert "## Preference tuning (DPO)" in report
    assert "| held-out | base | SFT | SFT+DPO |" in report
    for row in ("question answering", "preference accuracy", "text bpb"):
        assert f"| {row}" in report


def test_a_rerun_does_nothing_and_other_dpo_settings_are_refused(tuned, capsys):
    run, _, out, _, _ = tuned
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert _promote(run, out, *DPO) == 0
    said = capsys.readouterr().out
    assert "nothing left to do" in said and "dpo: done in attempt" in said
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert _promote(run, out, *DPO[:2], "3", *DPO[3:]) == 2
    err = capsys.readouterr().err
    assert "--dpo-steps 4" in err and "--dpo-steps 3" in err
    assert _promote(run, out) == 2  # its top level is the DPO model: not a plain promote
    assert "with --dpo, this command has no --dpo" in capsys.readouterr().err


def test_a_fresh_promote_with_dpo_runs_every_stage_once(plain, tmp_path):
    run, _ = plain
    out = tmp_path / "fresh"
    assert _promote(run, out, "--dpo", "--dpo-steps", "2", "--dpo-pairs", "8") == 0
    stages = _state(out)["stages"]
    assert list(stages) == ["refine", "pretrain", "sft", "dpo", "evaluate"]
    assert all(stage["done"] and stage["finished_in_attempt"] == 1 for stage in stages.values())
    assert stages["sft"]["result"]["model"] == "sft"
    for name in ("model.safetensors", "sft/model.safetensors", "sft/tokenizer/tokenizer.json",
                 "dpo-data/train.jsonl"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dpo"]["steps"] == 2 and metrics["dpo"]["resumed_from_step"] == 0
    assert set(metrics["preference_accuracy"]) >= {"base", "sft", "chat", "pairs"}
    assert "| held-out | base | SFT | SFT+DPO |" in (out / "report.md").read_text()
