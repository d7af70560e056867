"""``chimera eval`` (cluster.app.harness): the exported tasks load in lm-evaluation-harness and
score what the native model scores, offline; a bad model directory is one line, status 2."""

import json
import math
import re

import numpy as np
import pytest
import torch

from chimera.checkpoint import load_model
from chimera.tokenizer import train_char
from cluster.app import harness
from cluster.cli import main
from trainers.stories import generate_story

CONTEXT = 2048  # characters: every prompt and text of a few held-out stories fits one window


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_model_dir):
    stories = [generate_story(0, i).text for i in range(40)]
    tokenizer = train_char(stories + ["Question: Who? Where? What?\"'"])
    return make_model_dir(tmp_path_factory.mktemp("eval") / "model", tokenizer, CONTEXT)


def log_probs(model, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i] | tokens[:i]) for i >= 1, from the native model."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0][0]
    return torch.log_softmax(logits.double(), -1)[:-1].gather(
        1, torch.tensor(tokens[1:])[:, None])[:, 0]


def test_the_harness_scores_what_the_native_model_scores(model_dir, tmp_path, no_network):
    tasks = tmp_path / "tasks"
    written = harness.write_tasks(model_dir, tasks, questions=4, texts=2,
                                  tasks=(harness.QA, harness.PPL))
    assert written["source"] == "generated stories" and written["tasks"][harness.PPL] == 2
    results = harness.run_harness(model_dir, (harness.QA, harness.PPL), tasks, batch_size=3,
                                  log_samples=True)
    assert json.loads((tmp_path / harness.RESULTS_FILE).read_text())["results"].keys() == \
        {harness.QA, harness.PPL}
    assert "| chimera_qa | acc |" in (tmp_path / harness.TABLE_FILE).read_text()
    model = load_model(model_dir).eval()
    tokenizer = harness.check_model_dir(model_dir)[1]
    eos = tokenizer.eos_token_id

    # Multiple choice: the sum of each choice's log-probs given the templated prompt.
    picks = []
    for sample in results["samples"][harness.QA]:
        doc = sample["doc"]
        context = tokenizer.encode(doc["context"])
        assert doc["context"].endswith("<|assistant|>\n") and len(doc["choices"]) >= 2
        # The harness moves the context's trailing "\n" into every continuation: its log-prob
        # is one more term, the same for every choice.
        newline = float(log_probs(model, context)[-1])
        scores = []
        for choice, (ll, _) in zip(doc["choices"], sample["filtered_resps"]):
            tokens = tokenizer.encode(doc["context"] + choice)
            assert len(tokens) <= CONTEXT
            scores.append(float(log_probs(model, tokens)[len(context) - 1:].sum()))
            assert ll == pytest.approx(scores[-1] + newline, rel=1e-4, abs=1e-4)
        picks.append(int(np.argmax(scores)) == doc["gold"])
    assert len(picks) >= 2
    assert results["results"][harness.QA]["acc,none"] == np.mean(picks)
    assert "acc_norm,none" in results["results"][harness.QA]

    # Rolling perplexity: each text after the end-of-text token, in one window.
    total_ll, total_bytes, total_words = 0.0, 0, 0
    for sample in results["samples"][harness.PPL]:
        text = sample["doc"]["text"]
        tokens = [eos] + tokenizer.encode(text)
        assert len(tokens) <= CONTEXT
        ll = float(log_probs(model, tokens).sum())
        assert sample["filtered_resps"][0] == pytest.approx(ll, rel=1e-4)
        total_ll, total_bytes = total_ll + ll, total_bytes + len(text.encode())
        total_words += len(re.split(r"\s+", text))
    ppl = results["results"][harness.PPL]
    assert ppl["bits_per_byte,none"] == pytest.approx(-total_ll / total_bytes / math.log(2),
                                                      rel=1e-4)
    assert ppl["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / total_words),
                                                        rel=1e-4)
    assert ppl["byte_perplexity,none"] == pytest.approx(math.exp(-total_ll / total_bytes),
                                                        rel=1e-4)


def test_chimera_eval_writes_the_tasks_and_prints_the_results(model_dir, tmp_path, capsys,
                                                               no_network):
    out = tmp_path / "out"
    assert main(["eval", str(model_dir), "--out", str(out), "--questions", "4", "--texts", "1",
                 "--limit", "1", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    for task in harness.OUR_TASKS:
        assert task in printed
        assert (out / "tasks" / f"{task}.yaml").is_file()
    readme = (out / "tasks" / "README.md").read_text()
    assert "--include_path" in readme and f"max_length={CONTEXT}" in readme
    metrics = json.loads((out / harness.RESULTS_FILE).read_text())["results"]
    assert {"acc,none", "acc_norm,none"} <= metrics[harness.QA].keys()
    assert {"acc,none", "acc_norm,none"} <= metrics[harness.PREFERENCE].keys()
    assert {"word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"} <= \
        metrics[harness.PPL].keys()


@pytest.mark.parametrize("case", ["missing", "empty", "unknown task"])
def test_bad_input_is_one_line_and_status_2(case, model_dir, tmp_path, capsys):
    model = {"missing": tmp_path / "nothing", "empty": tmp_path}.get(case, model_dir)
    extra = ["--tasks", "chimera_nope"] if case == "unknown task" else []
    assert main(["eval", str(model), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_a_users_corpus_gives_its_validation_documents(tmp_path, no_network):
    names, places = ["Anna", "Boris", "Clara", "Dmitri"], ["garden", "harbor", "mill", "tower"]
    book = "\n\n".join(
        f"{names[i % 4]} walked to the {places[i % 4]} at dawn. {names[i % 4]} found a lamp "
        f"in the {places[i % 4]}. \"It is late,\" said {names[(i + 1) % 4]}. {names[i % 4]} "
        f"went home from the {places[i % 4]} with the lamp, story {i}." for i in range(60))
    (tmp_path / "book.txt").write_text(book)
    assert main(["data", "prepare", "--corpus", str(tmp_path / "book.txt"), "--separator",
                 "blank", "--tokenizer", "char", "--val-fraction", "0.2", "--out",
                 str(tmp_path / "store")]) == 0
    from trainers.doc_instructions import StoreDocuments
    from trainers.store import TokenStore

    store = TokenStore.open(tmp_path / "store")
    val = set(StoreDocuments(store, "val", store.load_tokenizer()))
    heldout = harness.store_heldout(tmp_path, max_seq_len=1024)  # documents fit whole
    texts = heldout.texts(3, 0)
    assert len(texts) == 3 and all(any(t in doc for doc in val) for t in texts)
    pairs = heldout.pairs(4, 0)
    assert pairs and all(any(doc in p["prompt"][0]["content"] for doc in val) for p in pairs)
    records = harness.qa_records(pairs, store.load_tokenizer(), 0)
    assert all(r["choices"][r["gold"]] == p["chosen"][0]["content"]
               for r, p in zip(records, pairs))
