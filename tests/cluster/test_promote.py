"""End to end on tiny budgets: evolve -> promote (Optuna on Ray, pretrain, SFT) -> chat."""

import json
import subprocess
import sys

import optuna
import pytest
from safetensors.torch import load_file

from chimera.inference import load_pretrained
from cluster.cli import main

TINY_RUN = ["--corpus-size", "60KB", "--tokenizer", "bpe", "--vocab-size", "400",
            "--batch-size", "4", "--seq-len", "32", "--population", "4", "--tournament", "2",
            "--in-process", "--max-candidates", "3", "--candidate-steps", "5", "--no-live"]
TINY_PROMOTE = ["--genome", "1", "--trials", "3", "--rungs", "2", "--parallel", "2",
                "--refine-tokens", "3K", "--pretrain-tokens", "6K", "--max-seq-len", "512",
                "--sft-steps", "4", "--sft-conversations", "40", "--sft-seq-len", "256",
                "--sft-batch-size", "4", "--qa-questions", "3"]


@pytest.fixture(scope="module")
def promoted(tmp_path_factory):
    run = tmp_path_factory.mktemp("e2e") / "run"
    assert main(["evolve", "--run-dir", str(run), *TINY_RUN]) == 0
    assert main(["promote", str(run), *TINY_PROMOTE]) == 0
    return run, run / "promoted"


def test_promote_writes_a_complete_model_directory(promoted):
    run, model_dir = promoted
    for name in ("model.safetensors", "config.json", "tokenizer/tokenizer.json", "report.md",
                 "metrics.json", "loss_curves.png", "base/model.safetensors",
                 "sft-data/train.jsonl", "sft-data/val.jsonl"):
        assert (model_dir / name).is_file(), name
    assert not (model_dir / "checkpoints").exists()  # removed once the models are saved
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["refine"]["complete"] + metrics["refine"]["pruned"] == 3
    assert 0 <= metrics["qa_accuracy"]["chat"] <= 1 and metrics["pretrain"]["val_bpb"] > 0
    report = (model_dir / "report.md").read_text()
    for section in ("## Results", "## Hyperparameters", "## Samples", "## Time and hardware",
                    "question answering"):
        assert section in report
    # The Optuna study lives in the run's database (optuna-dashboard can open it).
    study = optuna.load_study(study_name=metrics["refine"]["study"],
                              storage=f"sqlite:///{run / 'results.db'}")
    assert len(study.trials) >= 3 and study.trials[0].params["learning_rate"] == 3e-3
    model, tokenizer = load_pretrained(model_dir)
    assert tokenizer.chat_template and len(tokenizer) <= model.config.vocab_size
    assert set(load_file(model_dir / "model.safetensors")) == set(model.state_dict())


def test_chat_and_generate_answer(promoted):
    _, model_dir = promoted
    chat = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "chat", str(model_dir), "--max-new-tokens", "12",
         "--seed", "0"], input="Hello!\nWho are you?\n/reset\nHi\n", capture_output=True,
        text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr
    replies = [line for line in chat.stdout.splitlines() if "chimera>" in line]
    assert len(replies) == 3 and all(len(r.split("chimera>", 1)[1].strip()) > 0
                                     for r in replies)
    assert "new conversation" in chat.stdout
    generated = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", str(model_dir / "base"), "--prompt",
         "Once upon a time", "--max-new-tokens", "10", "--quantize", "8", "--seed", "1"],
        capture_output=True, text=True, timeout=120)
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("Once upon a time") and \
        len(generated.stdout.strip()) > len("Once upon a time")


def test_promote_bad_input_is_a_clean_error(tmp_path, capsys):
    assert main(["promote", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["chat", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_train_ctrl_c_saves_and_a_rerun_resumes(tmp_path):
    """`chimera train`: SIGINT mid-run saves a checkpoint and exits 130; the same command
    again finishes from there."""
    import signal
    import time

    from trainers.checkpoints import CheckpointManager

    store = tmp_path / "store"
    assert main(["data", "prepare", "--corpus", "stories", "--corpus-size", "40KB",
                 "--tokenizer", "char", "--out", str(store)]) == 0
    argv = [sys.executable, "-m", "cluster.cli", "train", "--preset", "tiny", "--store",
            str(store), "--out", str(tmp_path / "model"), "--tokens", "400K", "--batch-size",
            "4", "--seq-len", "32", "--max-seq-len", "64", "--checkpoint-every", "200"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = tmp_path / "model" / "checkpoints" / "pretrain"
    # Signal only once the training loop (and its SIGINT handler) runs: its first checkpoint
    # says so. A fixed sleep raced the set-up on a loaded machine.
    deadline = time.monotonic() + 120
    while CheckpointManager(checkpoints).latest() is None and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted" in out
    saved = CheckpointManager(checkpoints).latest()
    assert saved is not None
    step = CheckpointManager.load(saved).step
    assert 0 < step < 3125
    argv[argv.index("400K")] = "12K"  # a shorter run would be another plan: refused
    again = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "belongs to another run" in again.stderr
