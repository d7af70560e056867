"""One source for every default: each command's options, left at their defaults, describe exactly
the library's default settings (the options read them from the dataclasses; this holds them to
it, so a default changed in one place cannot leave the command line behind)."""

import dataclasses

from cluster.app.evolve import EvolveSettings
from cluster.app.promote import PromoteSettings
from cluster.cli.data import corpus_spec
from cluster.cli.main import build_parser
from cluster.cli.models import promote_settings, train_fit_settings, train_hparams
from cluster.cli.runs import evolve_settings
from cluster.serve import Limits
from trainers.corpus import CorpusSpec
from trainers.fit import FitSettings
from trainers.recipe import TrainHparams
from trainers.store import DEFAULT_VOCAB_SIZE, SplitConfig


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_evolve_defaults_are_the_library_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run directory is made from the clock, here
    settings = evolve_settings(parse("evolve"))
    assert settings == EvolveSettings(run_dir=settings.run_dir)


def test_promote_defaults_are_the_library_defaults():
    assert promote_settings(parse("promote", "RUN")) == PromoteSettings(run_dir="RUN")


def test_train_and_sft_defaults_are_the_library_defaults():
    args = parse("train", "--preset", "tiny", "--out", "m")
    assert train_hparams(args) == TrainHparams()
    assert (args.grad_accum, args.keep_checkpoints) == (FitSettings.grad_accum,
                                                         FitSettings.keep_checkpoints)
    assert args.max_seq_len == PromoteSettings.max_seq_len
    fit = train_fit_settings(args, steps=100)
    assert (fit.plateau_patience, fit.keep_best) == (FitSettings.plateau_patience, False)
    decayed = train_fit_settings(parse("train", "--preset", "tiny", "--out", "m",
                                       "--plateau-decay", "2"), steps=100)
    assert (decayed.plateau_patience, decayed.keep_best) == (2, True)  # it needs the best kept
    sft = parse("sft", "MODEL", "--out", "m")
    assert (sft.lr, sft.batch_size, sft.seq_len, sft.steps, sft.conversations) == (
        PromoteSettings.sft_hparams.learning_rate, PromoteSettings.sft_hparams.batch_size,
        PromoteSettings.sft_hparams.seq_len, PromoteSettings.sft_steps,
        PromoteSettings.sft_conversations)


def test_data_and_serve_defaults_are_the_library_defaults():
    args = parse("data", "prepare", "--corpus", "book.txt", "--tokenizer", "bpe", "--out", "s")
    assert corpus_spec(args, SplitConfig.seed) == CorpusSpec("book.txt")
    assert (args.vocab_size, args.val_fraction, args.seed) == (
        DEFAULT_VOCAB_SIZE, SplitConfig.val_fraction, SplitConfig.seed)
    assert parse("evolve").vocab_size == DEFAULT_VOCAB_SIZE == EvolveSettings.vocab_size
    serve = parse("serve", "MODEL")
    assert Limits(max_message_chars=serve.max_message_chars, max_messages=serve.max_messages,
                  max_new_tokens=serve.max_tokens_limit) == Limits()


def test_every_option_of_evolve_reaches_the_settings(tmp_path, monkeypatch):
    """An option the settings ignore would be a default in two places again: changing each
    changes the settings."""
    monkeypatch.chdir(tmp_path)
    base = evolve_settings(parse("evolve"))
    options = [(["--population", "5"], "evolution"), (["--tournament", "3"], "evolution"),
               (["--lr", "0.01"], "hparams"), (["--seq-len", "64"], "hparams"),
               (["--vocab-size", "512"], "vocab_size"), (["--strategy", "tpe"], "strategy"),
               (["--space", "published"], "space"), (["--store-transfer", "copy"],
                                                      "store_transfer")]
    for argv, field in options:
        changed = evolve_settings(parse("evolve", *argv))
        assert getattr(changed, field) != getattr(base, field), argv
        assert dataclasses.replace(changed, **{field: getattr(base, field)},
                                   run_dir=base.run_dir) == base, argv


def test_a_search_on_a_wall_clock_ranks_candidates_at_equal_time(tmp_path, monkeypatch):
    from cluster.app.candidate_budget import (
        CANDIDATE_SECONDS_RANGE,
        TOKENS_PER_CANDIDATE,
        candidate_seconds_for,
    )
    from trainers.candidate import BudgetKind, TrainBudget

    monkeypatch.chdir(tmp_path)
    budgeted = evolve_settings(parse("evolve", "--budget", "10m", "--workers", "2"))
    assert budgeted.candidate_budget == TrainBudget(BudgetKind.SECONDS,
                                                    round(candidate_seconds_for(600, 2), 1))
    # Longer searches train longer candidates, within bounds.
    times = [candidate_seconds_for(wall, 2) for wall in (10, 180, 600, 3600, 10**6)]
    assert times == sorted(times) and times[1] == 20.0
    assert (times[0], times[-1]) == CANDIDATE_SECONDS_RANGE
    # No wall clock, hurdles or a FLOPs budget: a step count is needed, tokens it is.
    tokens = TrainBudget(BudgetKind.TOKENS, TOKENS_PER_CANDIDATE)
    for argv in (["--max-candidates", "3"], ["--budget", "1m", "--hurdles", "3"],
                 ["--budget", "1m", "--flops", "1e12"]):
        assert evolve_settings(parse("evolve", *argv)).candidate_budget == tokens, argv
    # A flag wins.
    given = evolve_settings(parse("evolve", "--budget", "1m", "--candidate-tokens", "5000"))
    assert given.candidate_budget == TrainBudget(BudgetKind.TOKENS, 5000)
