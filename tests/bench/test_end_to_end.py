"""The end-to-end bench's pieces, small and fast: the held-out split, the shared scorer, the
baselines training for a few seconds, the chimera commands and the table."""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # bench/ holds scripts, not an installed package

from bench import end_to_end as e2e  # noqa: E402
from bench.nanogpt import GPT, GPTConfig, train_for_seconds  # noqa: E402
from trainers.plateau import PLATEAU_PATIENCE  # noqa: E402


def _documents(count: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocabulary = ["the", "king", "queen", "speaks", "of", "war", "and", "love", "my", "lord"]
    return [" ".join(rng.choice(vocabulary) for _ in range(words)).capitalize() + "."
            for _ in range(count)]


def _args(corpus: Path, **changes) -> argparse.Namespace:
    values = dict(corpus=str(corpus), val=None, separator="auto", quick=False, budget=3.0,
                  evolve_share=0.35, split_seed=0, evolve_args=None)
    return argparse.Namespace(**{**values, **changes})


def test_hold_out_is_seeded_and_capped():
    short = _documents(1000, 20)
    held = e2e.hold_out(short, seed=0)
    assert len(held) == 50 and held == e2e.hold_out(short, seed=0) != e2e.hold_out(short, 1)
    long = _documents(1000, 400)  # ~2 KB each: the byte cap stops the draw first
    held_long = e2e.hold_out(long, seed=0)
    assert sum(len(long[i].encode()) for i in held_long) <= e2e.HELD_OUT_MAX_BYTES
    assert 0 < len(held_long) < 50
    assert len(e2e.hold_out(short[:100], seed=0)) == 10  # a small corpus keeps 90% to train on


def test_prepare_bench_keeps_held_out_documents_out_of_training(tmp_path):
    documents = _documents(300, 15)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(documents) + "\n")  # blank-line separated, like Shakespeare
    work = tmp_path / "work"
    bench = e2e.prepare_bench(_args(corpus), work)
    assert bench["identity"]["separator"] == "blank"
    held = e2e.held_out_documents(work)
    train = (work / e2e.TRAIN_FILE).read_text().split(f"\n{e2e.END_OF_TEXT}\n")
    train = [d.strip() for d in train]
    assert len(held) == 30 and sorted(held + train) == sorted(documents)
    assert e2e.prepare_bench(_args(corpus), work) == bench  # resumed as it was
    with pytest.raises(SystemExit, match="budget_seconds"):
        e2e.prepare_bench(_args(corpus, budget=60.0), work)


def test_a_work_kept_as_bench_json_and_results_gets_its_split_back(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(_documents(300, 15)) + "\n")
    work = tmp_path / "work"
    bench = e2e.prepare_bench(_args(corpus), work)
    held, train = e2e.held_out_documents(work), (work / e2e.TRAIN_FILE).read_text()
    (work / e2e.TRAIN_FILE).unlink()
    (work / e2e.HELD_OUT_FILE).unlink()
    assert e2e.prepare_bench(_args(corpus), work) == bench
    assert e2e.held_out_documents(work) == held and (work / e2e.TRAIN_FILE).read_text() == train
    recorded = json.loads((work / e2e.BENCH_FILE).read_text())
    (work / e2e.BENCH_FILE).write_text(json.dumps({**recorded, "held_out_documents": 29}))
    (work / e2e.TRAIN_FILE).unlink()
    with pytest.raises(SystemExit, match="differs from the one bench.json records"):
        e2e.prepare_bench(_args(corpus), work)


def test_score_is_bits_per_byte_in_context_chunks():
    def uniform(ids):
        assert ids.shape[1] <= 3  # chunks of the context
        return torch.zeros(*ids.shape, 256)

    scored = e2e.score_documents(uniform, lambda text: list(text.encode()), ["hello", "héllo!"],
                                 context=3, bos_id=0)
    assert scored["bytes"] == 5 + 7 and scored["tokens"] == 12  # every byte predicted once
    assert scored["bpb"] == pytest.approx(8.0)  # log2(256) bits per byte-token


def test_padding_does_not_change_a_causal_models_score():
    model = GPT(GPTConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, dropout=0.0,
                          block_size=16)).eval()
    texts = ["a" * n for n in (3, 9, 20, 40)]

    def score(batch_size: int) -> float:
        return e2e.score_documents(lambda ids: model(ids)[0], lambda t: [ord(c) % 50 for c in t],
                                   texts, context=16, bos_id=1, batch_size=batch_size)["bits"]

    assert score(16) == pytest.approx(score(1), rel=1e-5)


@pytest.mark.parametrize("name", ["nanogpt-d96-drop0", "tiny"])
def test_a_baseline_trains_for_its_budget_and_is_scored(tmp_path, name):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(f"\n{e2e.END_OF_TEXT}\n".join(_documents(400, 20)) + "\n")
    work = tmp_path / "work"
    e2e.prepare_bench(_args(corpus), work)
    e2e.prepare_baseline_store(work, tokenizer="char")
    launched = time.time()
    # 6 s: the first evaluation and a step must fit even on a busy machine.
    result = e2e.run_baseline(e2e.Job(name, "x", 0), work, launched, launched + 6.0)
    assert result["wall_seconds"] < 15.0 and result["steps"] > 0
    assert 0 < result["bpb"] < 8 and math.isfinite(result["val_bpb"])
    assert result["tokens_per_second"] > 0 and result["documents"] == 40
    # The preset trains as Chimera's pretraining does; nanoGPT as its own recipe.
    assert result["plateau_patience"] == (PLATEAU_PATIENCE if name == "tiny" else 0)


def test_a_timed_run_decays_at_its_plateau_and_ends_early(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(f"\n{e2e.END_OF_TEXT}\n".join(_documents(400, 20)) + "\n")
    work = tmp_path / "work"
    e2e.prepare_bench(_args(corpus), work)
    store = e2e.prepare_baseline_store(work, tokenizer="char")
    real_sample = store.sample

    def turns_to_noise(split, rows, length, seed, step):  # validation rises after step 5
        if step < 5:
            return real_sample(split, rows, length, seed, step)
        return torch.randint(0, store.vocab_size, (rows, length + 1),
                             generator=torch.Generator().manual_seed(step))

    monkeypatch.setattr(store, "sample", turns_to_noise)
    torch.manual_seed(0)
    model, hparams = e2e.baseline("nanogpt-d96-drop0", store.vocab_size)
    deadline = time.time() + 8.0
    run = train_for_seconds(model, hparams, store, deadline, seed=0, evaluations=40,
                            plateau_patience=2)
    steps = [step for step, _ in run.val_history]
    assert run.decay_step == steps[steps.index(run.best_step) + 2]  # two evaluations later
    assert time.time() < deadline - 1.0  # the decay ended it, one evaluation interval on
    assert run.best_step < run.decay_step < run.steps


def test_chimera_commands_split_the_budget(tmp_path):
    evolve = e2e.evolve_command(tmp_path / "train.txt", tmp_path / "run", 14.2, seed=3)
    assert evolve[1:4] == ["-m", "cluster.cli", "evolve"]
    flags = dict(zip(evolve[4::2], evolve[5::2]))
    assert flags["--budget"] == "14s" and flags["--separator"] == "eot"
    assert flags["--tokenizer"] == "bpe" and flags["--vocab-size"] == "1024"
    assert flags["--seed"] == "3" and "--no-live" in evolve
    promote = e2e.promote_command(tmp_path / "run", tmp_path / "out", 3, ["--budget", "100s"])
    assert promote[3:5] == ["promote", str(tmp_path / "run")]
    assert promote[-2:] == ["--budget", "100s"]


def test_the_promoted_models_are_scored_with_the_stage_times(tmp_path, make_model_dir):
    from chimera.tokenizer import train_char

    documents = _documents(20, 10)
    tokenizer = train_char(documents)
    out = tmp_path / "promoted"
    make_model_dir(out / "base", tokenizer)
    make_model_dir(out, tokenizer)  # the chat model
    seconds = {"refine": 5.0, "pretrain": 20.0, "sft": 10.0, "evaluate": 5.0}
    (out / "metrics.json").write_text(json.dumps({
        "hparams": {"seq_len": 32}, "params": 123, "genome_summary": "d32 L2",
        "pretrain": {"tokens": 4000, "val_bpb": 3.0}, "seconds": seconds}))
    scored = e2e.score_promoted(out, documents)
    assert scored["tokens_per_second"] == 200 and scored["genome_summary"] == "d32 L2"
    assert 0 < scored["bpb"] and 0 < scored["chat_bpb"] and scored["documents"] == 20
    stages = e2e._stage_seconds(out, evolve_seconds=50.0, wall=100.0)
    assert stages["evolve"] == 50.0 and stages["other"] == pytest.approx(10.0)


def test_jobs_and_table():
    jobs = e2e.jobs_for(["chimera", "nanogpt-sweep"], [0, 1])
    assert [j.stem for j in jobs][:2] == ["chimera-seed0", "chimera-seed1"]
    assert {j.seed for j in jobs if j.method == "nanogpt-sweep"} == {0}

    def result(job, method, bpb, seed=0, **extra):
        return {"job": job, "method": method, "seed": seed, "bpb": bpb, "wall_seconds": 60.0,
                "tokens_per_second": 1000.0, "params": 1e6, "best_step": 5, "steps": 9,
                "diverged": False, **extra}

    stages = {"evolve": 30.0, "pretrain": 30.0}
    rows = e2e.table_rows([
        result("chimera", "chimera", 1.8, genome_summary="d64", stage_seconds=stages),
        result("chimera", "chimera", 2.2, seed=1, genome_summary="d96", stage_seconds=stages),
        result("nanogpt", "nanogpt", 2.0), result("nanogpt-d96-drop0", "nanogpt-sweep", 2.5)])
    chimera, nanogpt, best = rows[0], rows[1], rows[2]
    assert chimera[2] == "2.0000 ± 0.2828" and chimera[3] == "1.000"
    assert "evolve 50%" in chimera[8] and "d64 / d96" in chimera[8]
    assert nanogpt[3] == "1.000" and best[0] == "nanogpt-sweep (best: nanogpt)"
    assert json.dumps(rows)  # plain strings, for summary.md
