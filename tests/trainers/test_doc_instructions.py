"""Instruction data from plain-text documents: questions found in the text, passages, the
store's documents as text, and training data that never sees a held-out document."""

import json
import random
from collections import Counter

import pytest

from chimera.tokenizer import train_bpe, train_char
from trainers.chat_data import PASSAGES, STORIES, conversation, greeting, sentence_spans
from trainers.corpus import CorpusSpec, Separator, iter_documents
from trainers.doc_instructions import (
    StoreDocuments,
    document_conversations,
    document_qa_items,
    document_questions,
    names,
    passages,
    places,
    speakers,
)
from trainers.instructions import conversations, story_document
from trainers.store import SplitConfig, prepare_store
from trainers.stories import generate_story

PLAY = [
    "GLOUCESTER:\nNow is the winter of our discontent made glorious summer.\nWhat news, "
    "Brakenbury? Speak to me of Clarence.",
    "BRAKENBURY:\nGood day, my lord. The king has sent for Clarence. He waits in the tower "
    "and we keep watch in the tower tonight.",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "LADY ANNE:\nSet down your honourable load. I curse the hand that made these holes.",
]
PROSE = [
    "Mara walked to the old mill by the river. She carried the brass lantern in her hand. "
    "At the mill she met Otto, who laughed at Mara. Otto held the brass lantern high and Otto "
    "sang. They went in the mill together.",
    "The rain fell all night. In the morning the village was quiet. Nobody came out until "
    "noon, when the bell rang twice.",
    "Pell the baker lived in the valley. Every day Pell baked bread for the valley and sold it "
    "at the market. One day the flour ran out.",
]
CORPUS = PLAY + PROSE


def _passage(item):
    """The document of a question's prompt (asked before it and after it)."""
    after = item["messages"][0]["content"].split("Read this ", 1)[1].split("\n\n", 1)[1]
    return after.rsplit("\n\nQuestion: ", 1)[0]


def test_heuristics_on_a_play_and_on_prose():
    assert speakers(PLAY[0]) == ["GLOUCESTER"]
    assert speakers(PLAY[2]) == ["First Citizen"]
    assert speakers(PLAY[3]) == ["LADY ANNE"] and speakers(PROSE[0]) == []
    assert speakers("HAMLET: To be, or not to be.\nHORATIO: My lord?") == ["HAMLET", "HORATIO"]
    assert names(PLAY[0]) == Counter({"Brakenbury": 1, "Clarence": 1})
    # Named inside a sentence once, so a name wherever it stands ("Mara" opens the text).
    assert names(PROSE[0]) == Counter({"Mara": 2, "Otto": 3})
    assert names("Mara walked. She sang.") == Counter()  # never inside a sentence
    assert names(PROSE[1]) == Counter()  # capitals at sentence starts are not names
    assert places(PLAY[1])[0] == Counter({"the tower": 2})
    asked = {q.question: q for q in document_questions(PROSE[0])}
    assert asked["Who is the passage about?"].expected == "Otto"
    assert asked["Who is the passage about?"].others == ("Mara",)
    assert asked["Where does the passage happen?"].expected == "the mill"
    assert asked["What object is in the passage?"].expected == "brass lantern"
    speaker = document_questions(PLAY[1])[0]
    assert (speaker.question, speaker.expected) == ("Who speaks in this passage?", "BRAKENBURY")


def test_every_expected_answer_is_in_its_document():
    rng = random.Random(0)
    texts = CORPUS + [generate_story(7, i).text for i in range(40)]
    kinds = Counter()
    for text in texts:
        for q in document_questions(text, rng=rng):
            assert q.expected in text, (q, text)
            assert q.expected not in q.others
            kinds[q.question.split(" the ")[0].split(" this ")[0]] += 1
    assert len(kinds) >= 5, kinds  # speakers, names, places, objects, what comes next
    for item in document_qa_items(CORPUS, 30, seed=2):
        passage = _passage(item)
        assert item["expected"] in passage and any(passage in doc for doc in CORPUS)


def test_the_heuristics_find_the_generator_facts():
    """The built-in corpus checks the heuristics: the generator knows the answers."""
    hero = place = asked_place = 0
    for index in range(60):
        story = generate_story(11, index)
        found = {q.question: q.expected for q in document_questions(story.text, STORIES)}
        hero += found.get("Who is the story about?") == story.facts["hero"]
        if "Where does the story happen?" in found:
            asked_place += 1
            place += found["Where does the story happen?"] == f"the {story.facts['place']}"
    assert hero >= 57 and asked_place >= 30 and place >= 0.9 * asked_place


def test_generator_and_documents_share_one_builder():
    rng = random.Random(0)
    story = generate_story(0, 1)
    messages = [conversation(story_document(story), STORIES, rng) for _ in range(40)]
    assert any(m[0]["content"].startswith("Continue this story:") for m in messages)
    assert any("Read this story." in m[0]["content"] for m in messages)
    said = {greeting(register, random.Random(3))[1]["content"] for register in (STORIES,
                                                                                PASSAGES)}
    assert len(said) == 2  # the same greeting, worded for stories or for passages
    documents = document_conversations(CORPUS, 60, seed=1)
    firsts = [record["messages"][0]["content"] for record in documents]
    assert any(f.startswith("Continue this passage:") for f in firsts)
    assert any("Read this passage." in f for f in firsts)
    assert any(f.startswith(("Write a", "Tell me a")) for f in firsts)
    assert conversations(3, 0) == conversations(3, 0)
    assert documents == document_conversations(CORPUS, 60, seed=1)  # deterministic
    assert document_conversations(CORPUS, 20, seed=1) == documents[:20]  # extends, same start
    assert document_conversations(CORPUS, 60, seed=2) != documents


def test_passages_are_exact_slices_that_fit():
    text = "\n\n".join(CORPUS)
    cut = passages(text, 120)
    assert all(len(p) <= 120 and p in text for p in cut)
    assert "".join(cut).replace(" ", "").replace("\n", "") == \
        text.replace(" ", "").replace("\n", "")
    assert passages("short", 120) == ["short"] and passages(text) == [text]
    assert all(len(p) <= 10 for p in passages("x" * 35, 10))
    three = "One. Two!  \"Three?\" and four"
    assert [three[a:b] for a, b in sentence_spans(three)] == ["One.", "Two!", '"Three?"',
                                                             "and four"]


@pytest.mark.parametrize("make_tokenizer", [train_char, lambda docs: train_bpe(docs, 300)])
def test_held_out_documents_never_reach_training(tmp_path, make_tokenizer):
    corpus = tmp_path / "plays.txt"
    corpus.write_text("\n\n".join(CORPUS * 2 + [f"Note {i}: the tide came in at the harbour "
                                                f"at hour {i}." for i in range(12)]) + "\n")
    spec = CorpusSpec(str(corpus), separator=Separator.BLANK_LINE)
    documents = list(iter_documents(spec))
    store, _ = prepare_store(spec, make_tokenizer(documents), tmp_path / "store",
                             SplitConfig(val_fraction=0.3, seed=4))
    train, val = StoreDocuments(store, "train"), StoreDocuments(store, "val")
    # Decoded per document, exactly the text that went in, split as the store split it.
    assert sorted([*train, *val]) == sorted(documents)
    assert len(val) == store.info("val").documents >= 1
    train_text = json.dumps(document_conversations(train, 80, seed=0), ensure_ascii=False)
    held = [doc for doc in val if doc not in list(train)]  # CORPUS * 2: some docs are in both
    assert held and not any(json.dumps(doc, ensure_ascii=False)[1:-1] in train_text
                            for doc in held)
    for item in document_qa_items(val, 10, seed=0):
        assert any(_passage(item) in doc for doc in val)
    with pytest.raises(IndexError):
        val[len(val)]
