"""Preference tuning: TRL's DPO on the transformers class raises the chosen-over-rejected margin;
``chimera dpo`` and ``chimera preferences`` write what they say, resume, and refuse bad input."""

import json
import random

import pytest
from transformers import AutoModelForCausalLM

from chimera.chat import reply
from chimera.generation import SamplingConfig
from chimera.inference import load_pretrained
from chimera.tokenizer import train_char
from cluster.cli import main
from trainers.answers import words
from trainers.dpo import (
    SECONDS_FILE,
    DpoSettings,
    preference_accuracy,
    preference_tune,
    training_pairs,
    with_own_mistakes,
)
from trainers.preferences import read_preferences, write_preferences

NAMES = ["Lily", "Tom", "Mia", "Sam", "Ava", "Max"]
PLACES = ["park", "lake", "barn", "hill"]


def _pairs(n: int, seed: int) -> list[dict]:
    """Short reading questions: who went to the place? (the other name is the wrong answer)"""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        hero, other = rng.sample(NAMES, 2)
        place = rng.choice(PLACES)
        text = f"{hero} went to the {place}. {other} stayed home."
        records.append({"prompt": [{"role": "user", "content": f"{text} Who went to the "
                                                               f"{place}?"}],
                        "chosen": [{"role": "assistant", "content": f"{hero} went."}],
                        "rejected": [{"role": "assistant", "content": f"{other} went."}]})
    return records


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_model_dir):
    tokenizer = train_char([json.dumps(_pairs(50, 0))])
    return make_model_dir(tmp_path_factory.mktemp("chat"), tokenizer, 128)


def test_dpo_raises_the_margin_of_chosen_over_rejected(model_dir, tmp_path, no_network,
                                                       caplog, recwarn):
    model, tokenizer = load_pretrained(model_dir)
    train = _pairs(32, 1)
    before = preference_accuracy(model, tokenizer, train)
    settings = DpoSettings(steps=30, batch_size=8, learning_rate=3e-3, max_length=128,
                           warmup_steps=2, checkpoint_every=100, sft_weight=0.0)  # plain DPO
    tuned, result = preference_tune(model, tokenizer, train, settings, tmp_path / "ck")
    after = preference_accuracy(tuned, tokenizer, train)
    assert result.steps == 30 and result.history
    assert after["margin"] > before["margin"] + 1.0, (before, after)
    assert after["accuracy"] > before["accuracy"]
    # Nothing for the user to act on: no token alignment notice, no deprecated argument.
    assert "PAD/BOS/EOS" not in caplog.text
    assert not [w for w in recwarn if "deprecated" in str(w.message)], \
        [f"{w.filename}:{w.lineno}: {w.message}" for w in recwarn]


def test_a_resumed_dpo_counts_the_time_of_the_attempt_it_resumed(model_dir, tmp_path):
    model, tokenizer = load_pretrained(model_dir)
    settings = DpoSettings(steps=4, batch_size=4, max_length=128, warmup_steps=1,
                           checkpoint_every=2)

    def stop(step, total, logs):
        if step == 3:
            raise KeyboardInterrupt  # after checkpoint-2, as Ctrl+C would

    with pytest.raises(KeyboardInterrupt):
        preference_tune(model, tokenizer, _pairs(16, 4), settings, tmp_path / "ck",
                        on_progress=stop)
    held = json.loads((tmp_path / "ck" / "checkpoint-2" / SECONDS_FILE).read_text())["seconds"]
    assert held > 0
    _, result = preference_tune(model, tokenizer, _pairs(16, 4), settings, tmp_path / "ck")
    assert (result.steps, result.resumed_from, result.earlier_seconds) == (4, 2, held)
    assert result.seconds > held


def test_own_mistakes_replace_the_rejected_reply_only_where_the_model_is_wrong(model_dir,
                                                                              tmp_path):
    model, tokenizer = load_pretrained(model_dir)
    # A random model ends its turn at once; DPO with the chosen reply's NLL (RPO) teaches it
    # to answer in the pairs' form.
    settings = DpoSettings(steps=30, batch_size=8, learning_rate=3e-3, max_length=128,
                           warmup_steps=2, checkpoint_every=100, sft_weight=1.0)
    model, _ = preference_tune(model, tokenizer, _pairs(32, 1), settings, tmp_path / "ck")
    pairs = _pairs(6, 3)
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    replies = [reply(model, tokenizer, pair["prompt"], greedy).strip() for pair in pairs]
    assert all(replies), replies  # an untrained model still says something
    wrong, right = pairs[:3], pairs[3:]
    records = [{**p, "expected": "Zebulon", "others": []} for p in wrong]  # never said
    # Right: the expected answer is a word of what the model says.
    records += [{**p, "expected": words(said)[0], "others": []}
                for p, said in zip(right, replies[3:])]
    mined, replaced = with_own_mistakes(model, tokenizer, records, max_new_tokens=8)
    assert replaced == 3
    assert [m["rejected"][0]["content"] for m in mined[:3]] == replies[:3]
    assert [m["rejected"] for m in mined[3:]] == [p["rejected"] for p in right]
    assert [m["chosen"] for m in mined] == [p["chosen"] for p in pairs]
    with pytest.raises(ValueError, match="expected answer"):
        with_own_mistakes(model, tokenizer, pairs[:1])
    # A prompt that leaves no room for an answer keeps its constructed rejection.
    assert with_own_mistakes(model, tokenizer, records[:3], context=16) == (records[:3], 0)


def test_chimera_dpo_writes_a_model_report_and_resumes_nothing_when_done(model_dir, tmp_path,
                                                                         capsys, no_network):
    write_preferences(_pairs(40, 2), tmp_path / "prefs.jsonl")
    out = tmp_path / "tuned"
    argv = ["dpo", str(model_dir), "--data", str(tmp_path / "prefs.jsonl"), "--out", str(out),
            "--steps", "4", "--batch-size", "4", "--max-length", "128",
            "--checkpoint-every", "2"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "held-out preference accuracy" in said and "done" in said
    metrics = json.loads((out / "dpo.json").read_text())
    assert metrics["steps"] == 4 and metrics["train_pairs"] == 38  # 1 in 20 held out
    assert metrics["own_mistakes"] is None  # --data's pairs carry no answers to judge by
    assert metrics["heldout"]["after"]["pairs"] == 2
    for name in ("model.safetensors", "config.json", "tokenizer/tokenizer.json", "dpo.md",
                 "dpo_curves.png"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()  # TRL's optimizer states go when done
    load_pretrained(out)  # chimera generate / serve / chat read it
    AutoModelForCausalLM.from_pretrained(out)
    assert main(argv) == 0  # the same command again: nothing to do
    assert "done already" in capsys.readouterr().out
    other = [*argv[:-1], "3"]  # other settings into the same --out
    assert main(other) == 2
    assert "other settings" in capsys.readouterr().err


def test_bad_input_is_one_line_naming_the_file(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_pairs(1, 3)[0]) + "\n{not json\n")
    assert main(["dpo", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line 2" in err and err.count("\n") == 1
    assert main(["dpo", str(model_dir), "--out", str(model_dir), "--pairs", "8"]) == 2
    assert "never replaces the one it starts from" in capsys.readouterr().err
    assert main(["dpo", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"),
                 "--pairs", "8"]) == 2
    assert not (tmp_path / "o").exists()


def test_chimera_preferences_writes_trl_pairs_of_the_built_in_stories(tmp_path, capsys):
    out = tmp_path / "prefs" / "train.jsonl"
    assert main(["preferences", "--out", str(out), "--pairs", "12"]) == 0
    assert "12" in capsys.readouterr().out
    records = read_preferences(out)
    assert len(records) == 12
    assert all(r["chosen"] != r["rejected"] and r["prompt"][-1]["role"] == "user"
               for r in records)
    assert main(["preferences", "--out", str(tmp_path / "h.jsonl"), "--pairs", "5",
                 "--heldout"]) == 0
    heldout = {r["prompt"][0]["content"] for r in read_preferences(tmp_path / "h.jsonl")}
    assert not heldout & {r["prompt"][0]["content"] for r in records}


def test_training_pairs_are_mined_once_and_read_back_by_a_rerun(model_dir, tmp_path,
                                                                 monkeypatch):
    import trainers.dpo

    model, tokenizer = load_pretrained(model_dir)
    pairs = [{**p, "expected": "Zebulon", "others": []} for p in _pairs(4, 5)]
    own = DpoSettings(own_mistakes=True, max_length=128)
    saved = tmp_path / "dpo-data" / "train.jsonl"
    calls = []
    real = trainers.dpo.with_own_mistakes

    def counted(*args, **kwargs):
        calls.append(1)
        mined, replaced = real(*args, **kwargs)
        # the untrained model says nothing: pretend its first reply was a wrong answer
        mined[0] = {**mined[0], "rejected": [{"role": "assistant", "content": "Zed went."}]}
        return mined, replaced + 1

    monkeypatch.setattr(trainers.dpo, "with_own_mistakes", counted)
    first, mistakes = training_pairs(model, tokenizer, pairs, own, saved)
    assert mistakes == 1 and first[0]["rejected"][0]["content"] == "Zed went."
    assert [p["rejected"] for p in first[1:]] == [p["rejected"] for p in pairs[1:]]
    assert "own_mistake" not in pairs[1]  # the caller's records are left as they were
    again, mistakes = training_pairs(model, tokenizer, pairs, own, saved)
    assert (again, mistakes, len(calls)) == (first, 1, 1)  # read back, not answered again
    assert [r["rejected"] for r in read_preferences(saved)] == [p["rejected"] for p in first]
    # Other pairs, or constructed ones asked for, replace the file.
    plain, mistakes = training_pairs(model, tokenizer, pairs, DpoSettings(own_mistakes=False),
                                     saved)
    assert (plain, mistakes, len(calls)) == (pairs, None, 1)
    assert [r["rejected"] for r in read_preferences(saved)] == [p["rejected"] for p in pairs]


def test_own_mistakes_need_pairs_with_their_answers(model_dir, tmp_path, capsys):
    write_preferences(_pairs(40, 2), tmp_path / "prefs.jsonl")
    assert main(["dpo", str(model_dir), "--data", str(tmp_path / "prefs.jsonl"), "--out",
                 str(tmp_path / "tuned"), "--own-mistakes"]) == 2
    err = capsys.readouterr().err
    assert "--own-mistakes" in err and "prefs.jsonl" in err and "Traceback" not in err
    assert not (tmp_path / "tuned").exists()
