"""Preference pairs (DPO): the supported reply over the same reply naming a wrong answer, from
the built-in stories and from plain-text documents, and their JSONL files."""

import itertools
import json
import random
import re
from pathlib import Path

import pytest

from trainers.answers import answer_is_right, names_answer
from trainers.chat_data import Question
from trainers.doc_instructions import document_qa_items
from trainers.instructions import qa_items
from trainers.preferences import (
    KEYS,
    PreferenceDataError,
    document_preferences,
    read_preferences,
    rejected_reply,
    story_preferences,
    substituted,
    write_preferences,
)

TRAIN_PARAGRAPHS = [
    "GLOUCESTER:\nNow is the winter of our discontent made glorious summer.\nWhat news, "
    "Brakenbury? Speak to me of Clarence.",
    "BRAKENBURY:\nGood day, my lord. The king has sent for Clarence. He waits in the tower "
    "and we keep watch in the tower tonight.",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?",
    "LADY ANNE:\nSet down your honourable load. I curse the hand that made these holes.\n\n"
    "GLOUCESTER:\nSweet saint, for charity, be not so curst.",
    "Mara walked to the old mill by the river. She carried the brass lantern in her hand. "
    "At the mill she met Otto, who laughed at Mara. Otto held the brass lantern high and Otto "
    "sang. They went in the mill together.",
    "Pell the baker lived in the valley. Every day Pell baked bread for the valley and sold it "
    "at the market. One day the flour ran out. Pell found a copper key in the market and "
    "kept the copper key in his coat.",
    "The rain fell all night. In the morning the village was quiet. Nobody came out until "
    "noon, when the bell rang twice.",
    "Greta sailed across the bay with Hollis. They slept near the harbour wall, and at dawn "
    "Greta woke near the harbour wall again. Hollis lost a silver whistle in the sand.",
]
HELDOUT_PARAGRAPHS = [
    "ZEBULON:\nThe storm is coming, and the boats are out.\n\nMIRABEL:\nThen light the lamp. "
    "Light it now.",
    "Quentina climbed to the lighthouse with Barnaby. Quentina held a glass prism, and Barnaby "
    "held the glass prism too. They waited inside the lighthouse until the ships came home.",
    "Ottoline kept goats in the orchard. At night she sang to them in the orchard, and Ottoline "
    "found a wooden flute beside the gate.",
]
HELDOUT_ONLY = {"zebulon", "mirabel", "quentina", "barnaby", "ottoline", "lighthouse", "orchard",
                "prism", "flute", "storm", "goats"}
TRAIN_ONLY = {"gloucester", "brakenbury", "clarence", "mara", "otto", "pell", "greta", "hollis",
              "mill", "market", "harbour", "lantern", "whistle", "key"}


def _documents(paragraphs):
    """Each paragraph, and each ordered pair of them: many passages from a few texts."""
    return ["\n\n".join(pair) for pair in itertools.permutations(paragraphs, 2)] + paragraphs


TRAIN_DOCUMENTS = _documents(TRAIN_PARAGRAPHS)
HELDOUT_DOCUMENTS = _documents(HELDOUT_PARAGRAPHS)
STORY_KINDS = {  # question -> kind, as trainers.instructions.questions_about asks them
    r"Who is the story about\?": "hero", r"Where does the story happen\?": "place",
    r"Who is \w+'s friend\?": "friend", r"What object is in the story\?": "object",
    r"What was the problem\?": "problem", r"How was the problem solved\?": "resolution",
    r"Where was the [\w ]+ found\?": "found_at", r"What was \w+ afraid of\?": "fear",
    r"What animal needed help\?": "animal", r"What did \w+ want to do\?": "activity"}


@pytest.fixture(scope="module")
def stories():
    return {"train": story_preferences(300, seed=3, with_answers=True),
            "heldout": story_preferences(200, seed=3, heldout=True, with_answers=True)}


@pytest.fixture(scope="module")
def documents():
    return {"train": document_preferences(TRAIN_DOCUMENTS, 300, seed=1, with_answers=True),
            "heldout": document_preferences(HELDOUT_DOCUMENTS, 100, seed=1,
                                             with_answers=True)}


def _text(record, key):
    (message,) = record[key]
    assert message["role"] == ("user" if key == "prompt" else "assistant")
    return message["content"]


def _question(record):
    return _text(record, "prompt").split("\n\n", 1)[0].removeprefix("Question: ")


def _passage(record):
    after = _text(record, "prompt").split("Read this ", 1)[1].split("\n\n", 1)[1]
    return after.rsplit("\n\nQuestion: ", 1)[0]


def _words(records):
    return {w for r in records for key in KEYS for w in re.findall(r"\w+", _text(r, key).lower())}


def _check_pair(record):
    chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    expected, others = record["expected"], record["others"]
    assert answer_is_right(expected, chosen, others), record
    assert not answer_is_right(expected, rejected, others), record
    assert not names_answer(rejected, expected), record
    assert chosen != rejected


def test_story_pairs_reject_a_plausible_wrong_answer(stories):
    for split in ("train", "heldout"):
        assert len(stories[split]) == (300 if split == "train" else 200)
        for record in stories[split]:
            _check_pair(record)
            if _question(record) == "Who is the story about?":  # the friend is in the story
                assert any(names_answer(_text(record, "rejected"), o) for o in record["others"])
    # Worded alike: a lost thing for a lost thing, a place for a place.
    for record in stories["train"]:
        chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
        if chosen.startswith(("The story is about", "It happens near the", "It was found")):
            assert rejected.split()[:3] == chosen.split()[:3]


def test_story_pairs_cover_kinds_and_held_out_ones_are_the_qa_items(stories):
    kinds = [next(k for q, k in STORY_KINDS.items() if re.fullmatch(q, _question(r)))
             for r in stories["train"]]
    assert set(kinds) == set(STORY_KINDS.values())
    # The held-out pairs are qa_items's questions, in order: the two accuracies compare.
    items = qa_items(200, seed=3)
    assert [r["prompt"] for r in stories["heldout"]] == [i["messages"] for i in items]
    assert [r["expected"] for r in stories["heldout"]] == [i["expected"] for i in items]
    train = {_passage(r) for r in stories["train"]}
    assert len(train) == 300 and not train & {_passage(r) for r in stories["heldout"]}


def test_records_are_trl_conversational_exactly():
    for record in story_preferences(5) + document_preferences(TRAIN_DOCUMENTS, 5):
        assert list(record) == list(KEYS)
        assert [len(record[key]) for key in KEYS] == [1, 1, 1]
        assert all(set(record[key][0]) == {"role", "content"} for key in KEYS)


def test_story_pairs_are_deterministic_and_prefix_stable():
    for heldout in (False, True):
        longer = story_preferences(90, seed=7, heldout=heldout)
        assert longer == story_preferences(90, seed=7, heldout=heldout)
        assert longer[:30] == story_preferences(30, seed=7, heldout=heldout)
        assert longer != story_preferences(90, seed=8, heldout=heldout)


def test_document_pairs_reject_a_plausible_wrong_answer(documents):
    # As many as the documents hold distinct questions, less a few that cannot be made wrong.
    assert len(documents["train"]) > 250 and len(documents["heldout"]) > 20
    for record in documents["train"] + documents["heldout"]:
        _check_pair(record)
        if _question(record) == "Who speaks first in this passage?":
            assert any(names_answer(_text(record, "rejected"), o) for o in record["others"])
    asked = {_question(r).split('"')[0] for r in documents["train"]}
    assert {"Who speaks first in this passage?", "Who is the passage about?",
            "Where does the passage happen?", "What object is in the passage?",
            "In the passage, what comes after "} <= asked


def test_document_pairs_are_the_qa_items_and_never_mix_train_and_heldout(documents):
    for split, docs, n in (("train", TRAIN_DOCUMENTS, 300), ("heldout", HELDOUT_DOCUMENTS, 100)):
        prompts = iter(i["messages"] for i in document_qa_items(docs, n, seed=1))
        # In document_qa_items's order, less none or a few that could not be made wrong.
        assert all(any(r["prompt"] == p for p in prompts) for r in documents[split])
        assert all(any(_passage(r) in d for d in docs) for r in documents[split])
    # Wrong answers from other documents come from the same set only.
    assert not _words(documents["train"]) & HELDOUT_ONLY
    assert not _words(documents["heldout"]) & TRAIN_ONLY
    assert _words(documents["heldout"]) >= {"zebulon", "quentina", "ottoline"}


def test_document_pairs_are_deterministic_and_prefix_stable():
    longer = document_preferences(TRAIN_DOCUMENTS, 60, seed=4, max_chars=120)
    assert longer == document_preferences(TRAIN_DOCUMENTS, 60, seed=4, max_chars=120)
    assert longer[:20] == document_preferences(TRAIN_DOCUMENTS, 20, seed=4, max_chars=120)
    assert all(len(_passage(r)) <= 120 for r in longer)
    with pytest.raises(ValueError, match="no documents"):
        document_preferences([], 3)


def test_rejected_reply_substitutes_the_expected_answer():
    question = Question("Who is the story about?", "The story is about Tom.", "Tom",
                        ("Ben", "Ann"))
    # The same candidates in any order (a set's order changes between runs): the same pick.
    picks = {rejected_reply(question, others, [], random.Random(5))
             for others in (["Ben", "Ann"], ["Ann", "Ben"], {"Ann", "Ben"})}
    assert len(picks) == 1 and picks <= {"The story is about Ben.", "The story is about Ann."}
    assert rejected_reply(question, ["Tom", "tom"], ["Tom"], random.Random(0)) is None
    assert rejected_reply(question, [], ["Ben"], random.Random(0)) == "The story is about Ben."
    assert substituted("They took turns.", "they took turns", "lily helped the duck") == \
        "Lily helped the duck."
    assert substituted("Tommy met Tom.", "Tom", "Ben") == "Tommy met Ben."
    assert substituted("It was found in the\n tall grass.", "in the tall grass", "under a bush") \
        == "It was found under a bush."
    assert substituted("The story is about Lily.", "Tom", "Ben") is None


def test_files_round_trip_in_both_trl_formats(tmp_path):
    records = story_preferences(4) + document_preferences(TRAIN_DOCUMENTS, 4)
    path = write_preferences(records, tmp_path / "deeper" / "pairs.jsonl")
    assert read_preferences(path) == records
    assert sorted(p.name for p in path.parent.iterdir()) == ["pairs.jsonl"]  # no temp file
    standard = tmp_path / "standard.jsonl"
    standard.write_text(json.dumps({"prompt": "Who?", "chosen": "Tom.", "rejected": "Ben.",
                                    "score": 3}) + "\n\n" + json.dumps({
        "prompt": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Where?"}],
        "chosen": [{"role": "assistant", "content": "Home.", "weight": 1}],
        "rejected": "Away."}) + "\n")
    assert read_preferences(standard) == [
        {"prompt": [{"role": "user", "content": "Who?"}],
         "chosen": [{"role": "assistant", "content": "Tom."}],
         "rejected": [{"role": "assistant", "content": "Ben."}]},
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Where?"}],
         "chosen": [{"role": "assistant", "content": "Home."}],
         "rejected": [{"role": "assistant", "content": "Away."}]}]


GOOD = {"prompt": "Who?", "chosen": "Tom.", "rejected": "Ben."}


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"prompt": "Who?", "chosen": "Tom."}), "missing key 'rejected'"),
    (json.dumps({**GOOD, "chosen": "  "}), "empty text in 'chosen'"),
    (json.dumps({**GOOD, "chosen": [{"role": "user", "content": "Tom."}]}), "role 'user'"),
    (json.dumps({**GOOD, "prompt": [{"role": "assistant", "content": "Hi"}]}),
     "does not end with a user message"),
    (json.dumps({**GOOD, "rejected": [{"role": "assistant", "content": "Tom."}]}),
     "chosen and rejected are the same"),
    (json.dumps({**GOOD, "rejected": 3}), "neither text nor"),
])
def test_reader_names_the_file_the_line_and_the_problem(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(PreferenceDataError) as caught:
        read_preferences(path)
    message = str(caught.value)
    assert f"{path}, line 3: " in message and problem in message and "\n" not in message


def test_reader_refuses_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(PreferenceDataError, match=r"empty\.jsonl, line 1: empty file"):
        read_preferences(empty)
    with pytest.raises(PreferenceDataError, match="missing.jsonl: cannot read"):
        read_preferences(tmp_path / "missing.jsonl")


def test_a_refused_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = write_preferences([GOOD], tmp_path / "pairs.jsonl")
    before = path.read_text()
    real_write_text = Path.write_text

    def interrupted(self, text, **kwargs):
        real_write_text(self, text[:10], **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_preferences([GOOD, GOOD], path)
    monkeypatch.undo()
    with pytest.raises(PreferenceDataError, match=r"pairs\.jsonl, record 2: missing key"):
        write_preferences([GOOD, {"prompt": "Who?"}], path)
    with pytest.raises(PreferenceDataError, match="no preference pairs"):
        write_preferences([], path)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]
