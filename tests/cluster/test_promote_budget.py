"""``chimera promote --budget``: the stages sized to a wall clock, the plan kept for a rerun."""

import json

import pytest

import cluster.app.promote.budget as budget_module
from chimera.config import ChimeraConfig
from chimera.model import param_counts_analytic
from cluster.app.promote.budget import (
    EVALUATE_SHARE,
    LARGE_MODEL_DROPOUT,
    PRETRAIN_DROPOUT,
    REPEATED_EPOCHS,
    SFT_SHARE,
    STEP_CAP,
    plan_stages,
    pretrain_dropout,
)
from cluster.app.promote.settings import PromoteSettings
from cluster.cli import main
from trainers.recipe import TrainHparams

TINY_RUN = ["--corpus-size", "60KB", "--tokenizer", "bpe", "--vocab-size", "400",
            "--batch-size", "4", "--seq-len", "32", "--population", "4", "--tournament", "2",
            "--in-process", "--max-candidates", "2", "--candidate-steps", "5", "--no-live"]
TINY_SFT = ["--max-seq-len", "512", "--sft-steps", "4", "--sft-conversations", "40",
            "--sft-seq-len", "256", "--sft-batch-size", "4", "--qa-questions", "3"]
CONFIG = ChimeraConfig(vocab_size=400, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                       window_size=16, max_seq_len=64)
HPARAMS = TrainHparams(batch_size=16, seq_len=128)
RATE = 10_000.0  # tokens per second, measured
LOOP_RATE = RATE * budget_module.LOOP_EFFICIENCY


@pytest.fixture
def measured(monkeypatch):
    monkeypatch.setattr(budget_module, "measure_tokens_per_second", lambda *a, **k: RATE)


def test_pretraining_gets_what_fine_tuning_evaluation_and_the_setup_leave(measured):
    settings = PromoteSettings(run_dir="run", budget_seconds=600)
    plan = plan_stages(settings, CONFIG, HPARAMS, None, spent_seconds=10)
    assert plan.pretrain_seconds == pytest.approx(600 * (1 - SFT_SHARE - EVALUATE_SHARE) - 10)
    assert plan.pretrain_tokens == int(plan.pretrain_seconds * LOOP_RATE)
    assert plan.refine_tokens is None  # refinement has no share by default
    # SFT: its share of the budget on the clock, at most --sft-steps or 3x the steps expected.
    assert plan.sft_seconds == pytest.approx(SFT_SHARE * 600)
    expected = int(SFT_SHARE * 600 * LOOP_RATE / (16 * 320))
    assert plan.sft_steps == min(settings.sft_steps, STEP_CAP * expected)
    applied = plan.applied(settings)
    assert applied.pretrain_tokens == plan.pretrain_tokens and applied.skips_refinement
    assert applied.pretrain_seconds == plan.pretrain_seconds  # pretraining runs on the clock


def test_fine_tuning_that_needs_less_than_its_share_leaves_the_rest_to_pretraining(monkeypatch):
    fast = 100 * RATE  # a model whose --sft-steps train in well under SFT_SHARE of the budget
    monkeypatch.setattr(budget_module, "measure_tokens_per_second", lambda *a, **k: fast)
    settings = PromoteSettings(run_dir="run", budget_seconds=600)
    plan = plan_stages(settings, CONFIG, HPARAMS, None, spent_seconds=10)
    needs = settings.sft_steps * 16 * 320 / (fast * budget_module.LOOP_EFFICIENCY)
    assert plan.sft_seconds == pytest.approx(budget_module.SFT_HEADROOM * needs)
    assert plan.sft_seconds < SFT_SHARE * 600
    assert plan.pretrain_seconds == pytest.approx(600 * (1 - EVALUATE_SHARE) - plan.sft_seconds
                                                  - 10)
    assert plan.sft_steps == settings.sft_steps  # its steps end it, not the cap


def test_a_refinement_share_comes_out_of_pretraining(measured):
    settings = PromoteSettings(run_dir="run", budget_seconds=600, refine_share=0.2)
    plan = plan_stages(settings, CONFIG, HPARAMS, None, spent_seconds=0)
    assert plan.pretrain_seconds == pytest.approx(600 * (1 - SFT_SHARE - EVALUATE_SHARE - 0.2))
    trials = settings.refine.trials
    assert plan.refine_tokens == int(0.2 * 600 * LOOP_RATE / (trials * budget_module.
                                                              REFINE_COST_PER_TRIAL))
    assert not plan.applied(settings).skips_refinement


def test_a_budget_too_small_to_pretrain_is_refused_naming_the_flag(measured):
    settings = PromoteSettings(run_dir="run", budget_seconds=5)
    with pytest.raises(ValueError, match="--budget 5s leaves"):
        plan_stages(settings, CONFIG, HPARAMS, None, spent_seconds=3)


def test_pretraining_that_repeats_the_corpus_gets_dropout_by_the_models_size():
    low = ChimeraConfig(vocab_size=400, dropout=0.05)
    params = param_counts_analytic(low).total
    # A corpus of more tokens than the model has parameters, then one of as many.
    for train_tokens, rate in ((params + 1, PRETRAIN_DROPOUT), (params, LARGE_MODEL_DROPOUT)):
        below = REPEATED_EPOCHS * train_tokens - 1
        assert pretrain_dropout(low, below, train_tokens) == 0.05  # the genome's, unrepeated
        assert pretrain_dropout(low, below + 1, train_tokens) == rate
    assert PRETRAIN_DROPOUT < LARGE_MODEL_DROPOUT
    high = ChimeraConfig(vocab_size=400, dropout=LARGE_MODEL_DROPOUT + 0.1)
    assert pretrain_dropout(high, 100 * params, params) == high.dropout  # never lower


def test_a_budgeted_promote_runs_records_its_plan_and_a_rerun_keeps_it(tmp_path, monkeypatch,
                                                                       capsys):
    run = tmp_path / "run"
    assert main(["evolve", "--run-dir", str(run), *TINY_RUN]) == 0
    # A fixed speed: the measurement's seconds count against the budget, and on a busy machine
    # (CI beside other work) they can eat a 40-second one.
    monkeypatch.setattr(budget_module, "measure_tokens_per_second", lambda *a, **k: 20_000.0)
    # Fine-tuning gets its whole share, as a slow model's would: at this made-up speed its 4
    # steps' estimate would be a fraction of a second, far under what they take here.
    monkeypatch.setattr(budget_module, "SFT_HEADROOM", 1e6)
    for rate in ("PRETRAIN_DROPOUT", "LARGE_MODEL_DROPOUT"):  # a rate no genome has
        monkeypatch.setattr(budget_module, rate, 0.37)
    command = ["promote", str(run), "--budget", "40s", *TINY_SFT]
    assert main(command) == 0
    out = run / "promoted"
    metrics = json.loads((out / "metrics.json").read_text())
    plan = metrics["budget_plan"]
    # 30 s at 20,000 tokens/s is many times the 60 KB corpus: pretrained with the dropout.
    assert json.loads((out / "base" / "config.json").read_text())["dropout"] == 0.37
    assert "-> 0.37: pretraining will see the corpus" in capsys.readouterr().out
    assert plan["budget_seconds"] == 40 and plan["tokens_per_second"] > 0
    # Pretraining ran on the clock: its planned seconds, whatever the tokens came to.
    assert plan["pretrain_seconds"] <= metrics["seconds"]["pretrain"] \
        <= plan["pretrain_seconds"] + 15
    assert metrics["pretrain"]["tokens"] <= STEP_CAP * plan["pretrain_tokens"]
    assert metrics["refine"]["skipped"] and metrics["refine"]["complete"] == 0
    # Fine-tuning on the clock too, at most --sft-steps (4: the cap ends it here).
    assert plan["sft_seconds"] == pytest.approx(SFT_SHARE * 40)
    assert metrics["sft"]["steps"] == min(4, plan["sft_steps"])
    assert "Not refined" in (out / "report.md").read_text()
    state = json.loads((out / "promote-state.json").read_text())
    assert state["budget_plan"] == plan

    # A rerun of the same command keeps the recorded plan: it does not measure again.
    def no_measuring(*args, **kwargs):
        raise AssertionError("the rerun measured again")

    monkeypatch.setattr(budget_module, "measure_tokens_per_second", no_measuring)
    capsys.readouterr()
    assert main(command) == 0
    assert "nothing left to do" in capsys.readouterr().out
    # Evaluated again under another rule, the report keeps the dropout the base trained with,
    # and the skipped pretraining says nothing about a change it did not make.
    for rate in ("PRETRAIN_DROPOUT", "LARGE_MODEL_DROPOUT"):
        monkeypatch.setattr(budget_module, rate, 0.5)
    (out / "metrics.json").unlink()
    assert main(command) == 0
    assert json.loads((out / "metrics.json").read_text())["dropout"] == 0.37
    assert "pretraining will see" not in capsys.readouterr().out
    # Another budget is another promote: refused, naming the flag.
    monkeypatch.undo()
    assert main(["promote", str(run), "--budget", "50s", *TINY_SFT]) == 2
    assert "--budget" in capsys.readouterr().err
