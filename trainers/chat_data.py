"""The one builder of chat fine-tuning data: documents with questions about them become
conversations and held-out questions.

Both sources go through it: the story generator's stories, whose questions come from the facts
it drew (``trainers.instructions``), and the user's own documents, whose questions are found in
the text (``trainers.doc_instructions``). Conversations mix four kinds:

- questions about a document given in the first message, with follow-up questions;
- continuing a document from its opening;
- writing one on request (the request names who is in it);
- greetings and small talk, worded for the corpus's kind of text (stories, or passages).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

# The kinds of conversation, by cumulative share: questions, continuation, request, greeting.
KIND_SHARES = ((0.6, "questions"), (0.75, "continue"), (0.9, "request"), (1.0, "greeting"))


@dataclass(frozen=True)
class Register:
    """What the corpus's documents are called, in questions and greetings."""

    noun: str
    plural: str


STORIES = Register("story", "stories")
PASSAGES = Register("passage", "passages")  # neutral: fits prose and plays alike

GREETINGS = [
    ("Hello!", "Hello! I am Chimera. I know many {plural}. Ask me about one, or ask me for a "
               "{noun}."),
    ("Hi", "Hi! I can answer questions about a {noun} or write you a new one."),
    ("Good morning!", "Good morning! Would you like a {noun}?"),
    ("Who are you?", "I am Chimera, a small language model that has read many {plural}."),
    ("What can you do?", "I can write short {plural}, continue a {noun} you start, and answer "
                         "questions about a {noun} you give me."),
    ("Thank you!", "You are welcome!"),
    ("Thanks, bye!", "Goodbye! Come back for another {noun}."),
]


@dataclass(frozen=True)
class Question:
    question: str
    answer: str  # the reply taught
    expected: str  # what a correct reply names
    # Other candidate answers from the same document (other names, other places): a reply that
    # names one of them is wrong (see trainers.answers).
    others: tuple[str, ...] = ()
    # What is asked ("hero", "place", "speaker"...): a wrong reply of the same kind from another
    # document is a plausible one (trainers.preferences).
    kind: str = ""


@dataclass(frozen=True)
class Document:
    """A text with the questions it answers and the requests it fulfils."""

    text: str
    questions: tuple[Question, ...]
    requests: tuple[str, ...]  # user turns whose reply is the whole text


def question_prompt(document: Document, question: str, register: Register) -> str:
    """The question before the document and after it: a recurrent layer reads the document
    knowing what to keep (as in "Just read twice", Arora et al. 2024). On tinyshakespeare it
    took a 1.5M-parameter chat model's held-out accuracy from 16% to 30% (BENCHMARKS.md)."""
    return (f"Question: {question}\n\nRead this {register.noun}.\n\n{document.text}\n\n"
            f"Question: {question}")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence: runs of text ending at . ! or ? (and a closing quote)."""
    return [m.span() for m in re.finditer(r"\S.*?(?:[.!?]+[\"”’']?(?=\s|$)|$)", text, re.S)]


def _questions(document: Document, register: Register, rng: random.Random) -> list[dict]:
    asked = rng.sample(document.questions, k=min(len(document.questions),
                                                 rng.choice([1, 1, 2, 3])))
    messages = [{"role": "user", "content": question_prompt(document, asked[0].question,
                                                            register)},
                {"role": "assistant", "content": asked[0].answer}]
    for follow_up in asked[1:]:
        messages += [{"role": "user", "content": follow_up.question},
                     {"role": "assistant", "content": follow_up.answer}]
    return messages


def _continuation(document: Document, register: Register, rng: random.Random
                  ) -> list[dict] | None:
    """The opening sentences (one to three) and the rest; None for a one-sentence text."""
    spans = sentence_spans(document.text)
    if len(spans) < 2:
        return None
    cut = spans[rng.randint(1, min(3, len(spans) - 1)) - 1][1]
    opening, rest = document.text[:cut].strip(), document.text[cut:].strip()
    return [{"role": "user", "content": f"Continue this {register.noun}: {opening}"},
            {"role": "assistant", "content": rest}]


def _request(document: Document, register: Register, rng: random.Random) -> list[dict]:
    ask = rng.choice(document.requests) if document.requests else \
        f"Write a short {register.noun}."
    return [{"role": "user", "content": ask}, {"role": "assistant", "content": document.text}]


def greeting(register: Register, rng: random.Random) -> list[dict]:
    said, answer = rng.choice(GREETINGS)
    return [{"role": "user", "content": said},
            {"role": "assistant", "content": answer.format(noun=register.noun,
                                                           plural=register.plural)}]


def conversation(document: Document, register: Register, rng: random.Random) -> list[dict]:
    """One conversation about ``document``, of a kind drawn from ``KIND_SHARES``; a kind the
    document cannot give (no questions, a single sentence) falls to a request for it."""
    draw = rng.random()
    kind = next(name for share, name in KIND_SHARES if draw < share)
    if kind == "questions" and document.questions:
        return _questions(document, register, rng)
    if kind == "continue":
        messages = _continuation(document, register, rng)
        if messages is not None:
            return messages
    if kind == "greeting":
        return greeting(register, rng)
    return _request(document, register, rng)


def qa_item(document: Document, question: Question, register: Register) -> dict:
    """A held-out question: the first turn of a conversation, what a correct reply names, and
    the other candidates a reply must not name."""
    return {"messages": [{"role": "user", "content": question_prompt(
                document, question.question, register)}],
            "expected": question.expected, "others": list(question.others)}


def without_asked(others: Sequence[str], question: str) -> tuple[str, ...]:
    """The candidates a reply must not name, less those the question itself names (the reply
    to "Who is Lily's friend?" may well say Lily)."""
    return tuple(o for o in others if o.lower() not in question.lower())
