"""What promote fine-tunes on and asks, by corpus: a user's plain-text corpus gives both from
its own documents (training conversations from the training split, questions from the held-out
one); the built-in stories keep the generator's."""

import json
from types import SimpleNamespace

import pytest

from chimera.tokenizer import train_bpe
from cluster.app.promote import PromoteSettings
from cluster.app.promote.instruction_data import (
    from_stories,
    question_source,
    run_store,
    sft_conversations,
)
from cluster.app.promote.preflight import plan_evaluation
from cluster.app.rundir import STORE_DIR
from trainers.corpus import CorpusSpec, Separator, iter_documents
from trainers.doc_instructions import StoreDocuments
from trainers.instructions import qa_items
from trainers.store import SplitConfig, prepare_store

SPEAKERS = ["GLOUCESTER", "BRAKENBURY", "LADY ANNE", "First Citizen", "MENENIUS", "VOLUMNIA"]
PLACES = ["tower", "garden", "market", "harbour", "chapel", "orchard"]


def _speech(i: int) -> str:
    speaker, place, other = SPEAKERS[i % 6], PLACES[i % 5], SPEAKERS[(i + 1) % 6].title()
    return (f"{speaker}:\nGood morrow, {other}. We met in the {place} at hour {i}. Then we "
            f"walked in the {place} again. Speak, for the day is short.")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("userrun")
    corpus = root / "play.txt"
    corpus.write_text("\n\n".join(_speech(i) for i in range(60)) + "\n")
    spec = CorpusSpec(str(corpus), separator=Separator.BLANK_LINE)
    prepare_store(spec, train_bpe(iter_documents(spec), 300), root / "run" / STORE_DIR,
                  SplitConfig(val_fraction=0.2, seed=5))
    settings = PromoteSettings(run_dir=str(root / "run"), qa_questions=5, max_seq_len=512,
                               sft_conversations=40)
    return settings, SimpleNamespace(corpus=spec)


def test_user_corpus_data_comes_from_its_own_splits(run):
    settings, evolve = run
    assert not from_stories(evolve)
    store = run_store(settings)
    tokenizer = store.load_tokenizer()
    train_docs = list(StoreDocuments(store, "train", tokenizer))
    val_docs = list(StoreDocuments(store, "val", tokenizer))
    train = sft_conversations(settings, evolve, store, tokenizer, 40)
    text = json.dumps(train)
    assert "Read this passage." in text and "Who speaks in this passage?" in text
    assert "Once upon a time" not in text  # no generator stories on a user's corpus
    # Every hour number names its document: no held-out one reaches the training data.
    assert not any(f"at hour {doc.split('at hour ')[1].split('.')[0]}." in text
                   for doc in val_docs)
    items = question_source(settings, evolve, store, tokenizer)(10, settings.seed)
    assert len(items) == 10
    for item in items:
        prompt = item["messages"][0]["content"]
        assert item["expected"] in prompt
        assert any(doc in prompt for doc in val_docs)
        assert not any(doc in prompt for doc in train_docs)
    plan = plan_evaluation(settings, tokenizer, question_source(settings, evolve, store,
                                                                tokenizer))
    assert len(plan.qa_items) == 5 and plan.sample_item is not None


def test_built_in_stories_keep_the_generator_data(run):
    settings, _ = run
    stories = SimpleNamespace(corpus=CorpusSpec("stories"))
    assert from_stories(stories)
    assert question_source(settings, stories, None, None) is qa_items
    first = sft_conversations(settings, stories, None, None, 3)[0]["messages"]
    assert first[-1]["role"] == "assistant"


def test_documents_with_nothing_to_ask_skip_question_answering_with_a_note(run):
    settings, _ = run
    tokenizer = run_store(settings).load_tokenizer()
    plan = plan_evaluation(settings, tokenizer, lambda n, seed: [])
    assert plan.qa_items == [] and plan.sample_item is None
    assert any("question answering not measured" in note for note in plan.notes)
    assert plan.questions  # the samples of the report are still made


def test_a_corpus_with_nothing_to_ask_is_promoted_without_question_answering(tmp_path,
                                                                              monkeypatch):
    from cluster.cli import main

    # Lower-case word lists: no speaker, name, place, object or sentence to ask about.
    words = "apple river stone cloud bread lamp field wind".split()
    corpus = tmp_path / "lists.txt"
    corpus.write_text("\n\n".join(" ".join(words[(i + k) % 8] for k in range(12))
                                  for i in range(80)) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["evolve", "--run-dir", "run", "--corpus", str(corpus), "--separator", "blank",
                 "--tokenizer", "char", "--batch-size", "4", "--seq-len", "32", "--in-process",
                 "--candidate-steps", "3", "--no-live", "--no-warm-start",
                 "--max-candidates", "1"]) == 0
    assert main(["promote", "run", "--in-process", "--trials", "2", "--rungs", "2",
                 "--refine-tokens", "2K", "--pretrain-tokens", "3K", "--max-seq-len", "512",
                 "--sft-steps", "2", "--sft-conversations", "16", "--sft-seq-len", "320",
                 "--sft-batch-size", "2", "--qa-questions", "2"]) == 0
    metrics = json.loads((tmp_path / "run" / "promoted" / "metrics.json").read_text())
    assert metrics["qa_accuracy"]["base"] is None and metrics["qa_accuracy"]["chat"] is None
    assert metrics["heldout_bpb"]["chat"] > 0  # the rest of the evaluation was done
    report = (tmp_path / "run" / "promoted" / "report.md").read_text()
    assert "not measured" in report and "give no question" in report
