"""Preference pairs (DPO) from the reading questions: the reply the document supports, chosen,
over the same reply naming a plausible wrong answer, rejected.

The wrong answer is another candidate of the same document where it has one (the friend for
"who is the story about?", another place of the passage), so the pair can only be told apart by
reading; else a candidate of the same kind from another document of the same set, so training
pairs never borrow from held-out documents. Questions are chosen as the held-out questions are
(``qa_items``, ``document_qa_items``): a preference accuracy on held-out pairs is comparable to
the QA accuracy. Records are in TRL's conversational preference format, stored as JSONL.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from chimera.checkpoint import atomic_write
from trainers.answers import answer_is_right, key_words, names_answer
from trainers.chat_data import (
    PASSAGES,
    STORIES,
    Document,
    Question,
    Register,
    qa_item,
    sentence_spans,
)
from trainers.doc_instructions import (
    _order,
    _without_labels,
    document_questions,
    drawn_questions,
    passages,
)
from trainers.instructions import HELDOUT_SEED_OFFSET, TRAIN_SEED_OFFSET, story_document
from trainers.stories import generate_story

KEYS = ("prompt", "chosen", "rejected")
HELDOUT_FIRST_STORY = 100_000  # where qa_items's held-out stories start
STORY_POOL = 200  # stories whose answers are the wrong answers of other stories
DOCUMENT_POOL = 128  # passages likewise, for a user's documents
SHORT_SENTENCE = 12  # words: as long as the answer to "what comes after" may be


class PreferenceDataError(ValueError):
    """A preference file or record that is not a valid TRL preference pair."""


# ----------------------------------------------------------------------------- wrong replies
def _shape(text: str) -> str:
    """The first lower-case word: a wrong answer worded alike ("lost the kite" for "lost the
    ball") keeps the reply grammatical; names have none, so any name fits another."""
    return next((w for w in text.split() if w[:1].islower()), "")


def substituted(answer: str, expected: str, wrong: str) -> str | None:
    """``answer`` with every whole-word occurrence of ``expected`` (any case and spacing)
    replaced by ``wrong``; None when ``expected`` does not occur in it."""
    pattern = re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, expected.split())) + r"(?!\w)",
                         re.I)

    def put(match: re.Match) -> str:
        # At the reply's start it begins a sentence: "They took turns." for "they took turns".
        return wrong[:1].upper() + wrong[1:] if match.start() == 0 else wrong

    replaced, count = pattern.subn(put, answer)
    return replaced if count else None


def _rejected_with(question: Question, candidate: str) -> str | None:
    """The reply naming ``candidate`` instead, if that makes it wrong and not absurd."""
    keys = set(key_words(candidate))
    if not keys or keys <= set(key_words(question.expected)) \
            or candidate.lower() in question.question.lower():
        return None  # part of the right answer ("Anne" of "Lady Anne"), or what is asked about
    rejected = substituted(question.answer, question.expected, candidate)
    if rejected is None or rejected == question.answer \
            or names_answer(rejected, question.expected):
        return None
    return rejected


def rejected_reply(question: Question, same_document: Iterable[str], pool: Iterable[str],
                   rng: random.Random) -> str | None:
    """The question's answer with a wrong candidate for the expected one: one of the same
    document's where any fits, else one of ``pool``; worded alike first. None if none fits."""
    shape = _shape(question.expected)
    for tier in (same_document, pool):
        candidates = sorted(set(tier))  # others may come from a set: sorted, then seeded
        rng.shuffle(candidates)
        candidates.sort(key=lambda c: _shape(c) != shape)
        for candidate in candidates:
            rejected = _rejected_with(question, candidate)
            if rejected is not None:
                return rejected
    return None


def _sentences(text: str) -> list[str]:
    """The text's short sentences, speaker labels left out: wrong answers to "what comes
    after"."""
    body = _without_labels(text)
    sentences = (" ".join(body[start:end].split()) for start, end in sentence_spans(body))
    return [s for s in sentences if 2 <= len(s.split()) <= SHORT_SENTENCE]


def _pool(questions: Iterable[Question]) -> dict[str, list[str]]:
    """Expected answers by question kind. Not the others: a document's single most frequent
    candidate is a clean phrase, its rarer ones are as often heuristics' slips ("the
    lighthouse until")."""
    pool: dict[str, dict[str, None]] = {}
    for question in questions:
        pool.setdefault(question.kind, {})[question.expected] = None
    return {kind: list(found) for kind, found in pool.items()}


def _pair(document: Document, question: Question, register: Register,
          pool: dict[str, list[str]], rng: random.Random, with_answers: bool) -> dict | None:
    """One preference record, or None when the question's answer cannot be made wrong."""
    if not key_words(question.expected) or \
            not answer_is_right(question.expected, question.answer, question.others):
        return None
    same = question.others
    if question.kind == "sequence":
        same = (*same, *_sentences(document.text))
    rejected = rejected_reply(question, same, pool.get(question.kind, ()), rng)
    if rejected is None:
        return None
    record = {"prompt": qa_item(document, question, register)["messages"],
              "chosen": [{"role": "assistant", "content": question.answer}],
              "rejected": [{"role": "assistant", "content": rejected}]}
    if with_answers:
        record.update(expected=question.expected, others=list(question.others))
    return record


# ----------------------------------------------------------------------------- datasets
def story_preferences(n: int, seed: int = 0, heldout: bool = False,
                      with_answers: bool = False) -> list[dict]:
    """``n`` preference records about built-in stories: training ones ask any question, like
    ``conversations``; ``heldout`` ones are ``qa_items(n, seed)``'s questions, in order.
    ``with_answers`` adds each question's "expected" and "others" (``trainers.answers``)."""
    offset, first = (HELDOUT_SEED_OFFSET, HELDOUT_FIRST_STORY) if heldout else \
        (TRAIN_SEED_OFFSET, 0)
    pool = _pool(q for i in range(STORY_POOL)
                 for q in story_document(generate_story(seed + offset, first + i)).questions)
    # Held-out: qa_items's own draws, so its i-th question is the i-th pair's.
    choose = random.Random(f"chimera-qa:{seed}" if heldout else f"chimera-preferences:{seed}")
    wrong = random.Random(f"chimera-preferences-wrong:{seed}:{heldout}")
    records = []
    for index in range(2 * n + 100):  # a story whose question cannot be made wrong is skipped
        if len(records) == n:
            break
        document = story_document(generate_story(seed + offset, first + index))
        question = choose.choice(document.questions[:4] if heldout else document.questions)
        record = _pair(document, question, STORIES, pool, wrong, with_answers)
        if record is not None:
            records.append(record)
    return records


def _document_pool(documents: Sequence[str], order, ordinary: frozenset[str],
                   max_chars: int | None, register: Register) -> Iterator[Question]:
    texts = (text for i in order[:DOCUMENT_POOL] for text in passages(documents[int(i)],
                                                                       max_chars))
    for text in itertools.islice(texts, DOCUMENT_POOL):
        yield from document_questions(text, register, None, ordinary)


def document_preferences(documents: Sequence[str], n: int, seed: int = 0,
                         max_chars: int | None = None, register: Register = PASSAGES,
                         with_answers: bool = False) -> list[dict]:
    """Up to ``n`` distinct preference records about passages of ``documents``: the questions
    ``document_qa_items`` draws with the same arguments, in order, less any that cannot be made
    wrong; fewer when the documents do not hold that many. Wrong answers from other documents
    come from these ``documents`` only. ``with_answers``: see ``story_preferences``."""
    wrong = random.Random(f"chimera-doc-preferences-wrong:{seed}")
    ordered = _order(documents, seed)
    pool = _pool(_document_pool(documents, *ordered, max_chars, register))
    records = []
    for document, question in drawn_questions(documents, n, seed, max_chars, register,
                                              ordered):
        if len(records) == n:
            break
        record = _pair(document, question, register, pool, wrong, with_answers)
        if record is not None:
            records.append(record)
    return records


# ----------------------------------------------------------------------------- files
ROLES = {"prompt": ("system", "user", "assistant"), "chosen": ("assistant",),
         "rejected": ("assistant",)}


def _messages(value, key: str) -> list[dict]:
    """A field as a list of messages (text in TRL's standard format becomes one); ValueError
    says what is wrong."""
    if isinstance(value, str):
        value = [{"role": "user" if key == "prompt" else "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{key!r} is neither text nor a non-empty list of messages")
    messages = []
    for number, message in enumerate(value, 1):
        where = f"{key!r} message {number}"
        if not isinstance(message, dict):
            raise ValueError(f"{where} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES[key]:
            raise ValueError(f"{where} has role {role!r}, expected {' or '.join(ROLES[key])}")
        if not isinstance(content, str):
            raise ValueError(f"{where} has no text content")
        if not content.strip():
            raise ValueError(f"empty text in {where}")
        messages.append({"role": role, "content": content})
    if key == "prompt" and messages[-1]["role"] != "user":
        raise ValueError("'prompt' does not end with a user message")
    return messages


def preference_record(raw) -> dict:
    """``raw`` as a conversational preference record, extra keys dropped; ValueError says what
    is wrong with it."""
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    missing = [key for key in KEYS if key not in raw]
    if missing:
        raise ValueError(f"missing key {missing[0]!r}")
    record = {key: _messages(raw[key], key) for key in KEYS}
    if record["chosen"] == record["rejected"]:
        raise ValueError("chosen and rejected are the same")
    return record


def write_preferences(records: Iterable[dict], path: str | Path) -> Path:
    """Write ``records`` as JSONL, conversational, all at once: a reader never sees half."""
    path = Path(path)
    lines = []
    for number, raw in enumerate(records, 1):
        try:
            lines.append(json.dumps(preference_record(raw), ensure_ascii=False))
        except ValueError as err:
            raise PreferenceDataError(f"{path}, record {number}: {err}") from None
    if not lines:
        raise PreferenceDataError(f"{path}: no preference pairs to write")
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def read_preferences(path: str | Path) -> list[dict]:
    """The records of a JSONL file in either TRL format, as conversational ones."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PreferenceDataError(f"{path}: cannot read it: {err.strerror or err}") from None
    records = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError:
            raise PreferenceDataError(f"{path}, line {number}: not UTF-8 text") from None
        except json.JSONDecodeError as err:
            raise PreferenceDataError(f"{path}, line {number}: not JSON ({err.msg}, column "
                                      f"{err.colno})") from None
        try:
            records.append(preference_record(raw))
        except ValueError as err:
            raise PreferenceDataError(f"{path}, line {number}: {err}") from None
    if not records:
        raise PreferenceDataError(f"{path}, line 1: empty file, no preference pairs")
    return records
