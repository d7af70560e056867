"""Chat fine-tuning data from the user's own documents: questions found in the text itself.

No generator facts: each heuristic is simple, and each answer is an exact piece of the text.

- speakers: a line holding only a label such as ``GLOUCESTER:`` or ``First Citizen:`` (plays,
  transcripts; also ``HAMLET: To be...``) -> who speaks (first, when several do);
- names: capitalised words seen at least once after another word of their sentence (not at its
  start nor at a line's) and never in lower case in the document or in a sample of the corpus
  ("Come", "God" are words); neighbours join ("Caius Marcius") -> who the text is about (the
  name named most) or who is mentioned (the only one);
- places: "the X" after in, at, near, inside... -> where it happens;
- objects: "a/the X" after held, found, brought, lost... -> what object is in it;
- sequence: a sentence quoted -> the sentence that follows it (a short one).

A question is asked only when its answer is the single most frequent candidate of its kind (a
place or an object named twice at least), and it carries the other candidates, so a reply
naming one of those is scored wrong. Long documents
are cut, at paragraph, line or sentence ends, into passages that fit the fine-tuning window; the
conversations and questions are then made by the builder the story generator uses too.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np

from trainers.chat_data import (
    PASSAGES,
    Document,
    Question,
    Register,
    conversation,
    qa_item,
    sentence_spans,
    without_asked,
)
from trainers.store import TokenStore

_LABEL_LINE = re.compile(r"^[ \t]*([A-Z][\w'.-]*(?:[ \t]+[A-Z][\w'.-]*){0,3}):[ \t]*$", re.M)
_LABEL_INLINE = re.compile(r"^[ \t]*([A-Z][A-Z'.-]+(?:[ \t]+[A-Z][A-Z'.-]+){0,3}):[ \t]+(?=\S)",
                           re.M)
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?")
_PLACE = re.compile(r"\b((?i:in|at|near|inside|into|under|behind|beside|within|across|through|"
                    r"around))\s+the[ ]([^\W\d_]+(?:[ ][^\W\d_]+){0,2})")
_OBJECT = re.compile(r"\b(?:held|holds|hold|found|finds|find|brought|brings|bring|lost|lose|"
                     r"carried|carries|carry|wore|wears|wear|dropped|picked up|grabbed|threw|"
                     r"caught|hid|bought|shared)(?:\s+(?:out|up|down))?\s+(?:a|an|the|his|her|"
                     r"my|their|our|your|its)\s+([^\W\d_]+(?:[ ][^\W\d_]+){0,2})")
# Where a place or an object phrase ends: the word before one of these is its last.
_PHRASE_STOPS = frozenset("""
a an the of to in at on near by into with from for and or but so as if when while then than
that which who whom what where is was were be been are am has had have did do does not no too
again now today tonight yesterday together all every each one very there here he she it they
we you i his her its their our your my me him them us up down out off over back away under
behind beside inside below above between across through around onto upon
""".split())
# Nouns after a place preposition that are times, body parts or states, not places.
_NOT_PLACES = frozenset("""
end way world time same rest first last night day morning evening afternoon middle air name
hand hands heart sight mind face eyes head dark light sun moon
""".split())
_LONGEST_NEXT_SENTENCE = 12  # words: the answer has to fit a short reply
_LONGEST_QUOTE = 30  # words of the sentence quoted in the question


# ----------------------------------------------------------------------------- candidates
def speakers(text: str) -> list[str]:
    """Speaker labels in order of their turns (``NAME:`` lines, or all-caps ``NAME: words``)."""
    found = [(m.start(), m.group(1)) for m in _LABEL_LINE.finditer(text)]
    found += [(m.start(), m.group(1)) for m in _LABEL_INLINE.finditer(text)]
    return [name for _, name in sorted(found)]


def _without_labels(text: str) -> str:
    """The text with speaker labels blanked (same length: offsets still hold)."""
    for pattern in (_LABEL_LINE, _LABEL_INLINE):
        text = pattern.sub(lambda m: " " * len(m.group(0)), text)
    return text


def _inside_sentence(text: str, start: int) -> bool:
    """Whether a word follows another word of its sentence, or its comma, on the same line: a
    capital there is a name's ("said Tom", "What news, Brakenbury?"), not the sentence's or a
    verse line's."""
    i = start - 1
    while i >= 0 and text[i] in " \t\"'“‘":
        i -= 1
    return i >= 0 and (text[i].isalnum() or text[i] == ",")


def _titled_words(text: str) -> list[tuple[int, int, str]]:
    """(start, end, word) of capitalised words ("Lily", "Marcius"), a possessive 's cut off;
    contractions ("I'll", "'Tis") are not names."""
    found = []
    for match in _WORD.finditer(text):
        word = re.sub(r"['’]s$", "", match.group(0))
        if len(word) > 1 and word[0].isupper() and word[1:].islower() and word.isalpha():
            found.append((match.start(), match.start() + len(word), word))
    return found


def lower_case_words(texts) -> frozenset[str]:
    """Words seen starting with a lower-case letter: a capitalised one of these ("Let",
    "Come") is an ordinary word at a clause's start, not a name."""
    return frozenset(w for text in texts for w in _WORD.findall(text) if w[0].islower())


def names(text: str, ordinary: frozenset[str] = frozenset()) -> Counter:
    """Names and how often each is named (see the module docstring); ``ordinary``: lower-case
    words of the corpus beyond this text (``lower_case_words``)."""
    body = _without_labels(text)
    ordinary = ordinary | lower_case_words([body])
    titled = [w for w in _titled_words(body) if w[2].lower() not in ordinary]
    inside = {word for start, _, word in titled if _inside_sentence(body, start)}
    counts: Counter = Counter()
    run: list[tuple[int, int, str]] = []
    for word in [w for w in titled if w[2] in inside] + [None]:
        if run and (word is None or body[run[-1][1]:word[0]] != " "):
            counts[body[run[0][0]:run[-1][1]]] += 1
            run = []
        if word is not None:
            run.append(word)
    return counts


def _phrase(words: str) -> str:
    """The phrase's words up to the first that cannot belong to it ("of" can, before a word
    that can: "jar of honey")."""
    kept, split = [], words.split(" ")
    for i, word in enumerate(split):
        joins = word == "of" and 0 < i < len(split) - 1 and split[i + 1].lower() not in \
            _PHRASE_STOPS
        if word.lower() in _PHRASE_STOPS and not joins:
            break
        kept.append(word)
    return " ".join(kept)


def places(text: str) -> tuple[Counter, dict[str, str]]:
    """Place phrases ("the garden") after a locative preposition, their counts, and the first
    preposition each came with."""
    counts: Counter = Counter()
    preposition: dict[str, str] = {}
    for match in _PLACE.finditer(text):
        phrase = "the " + _phrase(match.group(2))
        if phrase == "the " or phrase.split()[-1].lower() in _NOT_PLACES:
            continue
        counts[phrase] += 1
        preposition.setdefault(phrase, match.group(1).lower())
    return counts, preposition


def objects(text: str) -> Counter:
    """Object phrases ("glass marble") after a verb of holding or finding, counted by how often
    the phrase occurs anywhere in the text."""
    found = {_phrase(m.group(1)) for m in _OBJECT.finditer(text)} - {""}
    return Counter({p: len(re.findall(rf"\b{re.escape(p)}\b", text)) for p in found})


def _single_most(counts: Counter) -> str | None:
    """The most frequent candidate, if no other is as frequent."""
    ranked = counts.most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def _question(question: str, answer: str, expected: str, candidates, kind: str) -> Question:
    others = [c for c in candidates if c != expected]
    return Question(question, answer, expected, without_asked(others, question), kind)


# ----------------------------------------------------------------------------- questions
def document_questions(text: str, register: Register = PASSAGES,
                       rng: random.Random | None = None,
                       ordinary: frozenset[str] = frozenset()) -> list[Question]:
    """Questions about ``text`` whose expected answers are exact pieces of it. ``rng`` picks
    the sentence quoted (default: the first that can be); ``ordinary``: see ``names``."""
    noun, found = register.noun, []
    labels = speakers(text)
    if labels:
        first = labels[0]
        asked = f"Who speaks in this {noun}?" if len(set(labels)) == 1 else \
            f"Who speaks first in this {noun}?"
        found.append(_question(asked, f"{first} speaks.", first, set(labels), "speaker"))
    named = names(text, ordinary)
    main = _single_most(named)
    if main is not None and (len(named) == 1 or named[main] > 1):
        asked = f"Who is the {noun} about?" if len(named) > 1 else \
            f"Who is mentioned in the {noun}?"
        found.append(_question(asked, f"It is about {main}." if len(named) > 1 else
                               f"{main} is mentioned.", main, named, "name"))
    place_counts, preposition = places(text)
    place = _single_most(place_counts)
    # Places and objects named twice at least: a phrase after "in the" once is as often a state
    # ("in the business") as a place, one after "bring the" an idea as a thing.
    if place is not None and place_counts[place] > 1:
        found.append(_question(f"Where does the {noun} happen?",
                               f"It happens {preposition[place]} {place}.", place, place_counts,
                               "place"))
    things = objects(text)
    thing = _single_most(things)
    if thing is not None and things[thing] > 1:
        found.append(_question(f"What object is in the {noun}?", f"The {thing}.", thing,
                               things, "object"))
    sequence = _sequence_question(text, register, rng)
    if sequence is not None:
        found.append(sequence)
    return found


def _sequence_question(text: str, register: Register, rng: random.Random | None
                       ) -> Question | None:
    """'What comes after "<a sentence>"?' -> the next sentence, when that is short and the
    quoted one occurs once."""
    body = _without_labels(text)
    spans = sentence_spans(body)
    pairs = []
    for (a, b), (c, d) in zip(spans, spans[1:]):
        if body[a:d] != text[a:d]:
            continue  # a speaker's label inside: the two are not one speech's sentences
        quoted, following = " ".join(text[a:b].split()), text[c:d].strip()
        if 3 <= len(quoted.split()) <= _LONGEST_QUOTE \
                and 2 <= len(following.split()) <= _LONGEST_NEXT_SENTENCE \
                and " ".join(body.split()).count(quoted) == 1:
            pairs.append((quoted, following))
    if not pairs:
        return None
    quoted, following = rng.choice(pairs) if rng is not None else pairs[0]
    return Question(f'In the {register.noun}, what comes after "{quoted}"?',
                    " ".join(following.split()), following, kind="sequence")


def requests_for(text: str, register: Register = PASSAGES,
                 ordinary: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """What a user might ask for to get this text: it names the speaker or the main name."""
    noun, labels = register.noun, speakers(text)
    if labels:
        return (f"Write a {noun} in which {labels[0]} speaks.",
                f"What might {labels[0]} say? Write it as a {noun}.")
    main = _single_most(names(text, ordinary))
    if main is not None:
        return (f"Tell me a {noun} about {main}.", f"Write a short {noun} with {main} in it.")
    return (f"Write a short {noun}.", f"Tell me a {noun}, please.")


def document_from_text(text: str, register: Register = PASSAGES,
                       rng: random.Random | None = None,
                       ordinary: frozenset[str] = frozenset()) -> Document:
    return Document(text, tuple(document_questions(text, register, rng, ordinary)),
                    requests_for(text, register, ordinary))


# ----------------------------------------------------------------------------- passages
_CUTS = (r"\n[ \t]*\n\s*", r"\n", r"(?<=[.!?])\s+", r"\s+")  # coarsest first


def passages(text: str, max_chars: int | None = None) -> list[str]:
    """``text`` cut into consecutive passages of at most ``max_chars`` characters, at paragraph
    ends where it can, else at line ends, sentence ends, spaces (each an exact slice)."""
    if max_chars is None or len(text) <= max_chars:
        return [text]
    pieces = _pieces(text, 0, len(text), max_chars, 0)
    packed, start, end = [], pieces[0][0], pieces[0][0]
    for a, b in pieces:
        if b - start > max_chars and end > start:
            packed.append(text[start:end].strip())
            start = a
        end = b
    packed.append(text[start:end].strip())
    return [p for p in packed if p]


def _pieces(text: str, start: int, end: int, max_chars: int, level: int
            ) -> list[tuple[int, int]]:
    if end - start <= max_chars:
        return [(start, end)]
    if level == len(_CUTS):  # one word longer than a passage: cut it
        return [(i, min(i + max_chars, end)) for i in range(start, end, max_chars)]
    bounds = [start] + [m.end() for m in re.compile(_CUTS[level]).finditer(text, start, end)
                        ] + [end]
    spans = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    return [piece for a, b in spans for piece in _pieces(text, a, b, max_chars, level + 1)]


# ----------------------------------------------------------------------------- datasets
class StoreDocuments(Sequence):
    """A token store split's documents as text, each decoded when it is read (a corpus may
    hold far more documents than instructions need)."""

    def __init__(self, store: TokenStore, split: str, tokenizer=None) -> None:
        self.store, self.split = store, split
        self.tokenizer = tokenizer if tokenizer is not None else store.load_tokenizer()

    def __len__(self) -> int:
        return self.store.info(self.split).documents

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} of {len(self)}")
        return self.store.document_text(self.split, index, self.tokenizer)


VOCABULARY_SAMPLE = 1000  # documents read for the corpus's ordinary words (see names)


def _order(documents: Sequence[str], seed: int) -> tuple[np.ndarray, frozenset[str]]:
    """A seeded order of the documents, and the ordinary words of the first ones in it."""
    if not len(documents):
        raise ValueError("no documents to make instructions from")
    order = np.random.default_rng(seed).permutation(len(documents))
    return order, lower_case_words(documents[int(i)] for i in order[:VOCABULARY_SAMPLE])


def document_conversations(documents: Sequence[str], n: int, seed: int = 0,
                           max_chars: int | None = None, register: Register = PASSAGES
                           ) -> list[dict]:
    """``n`` conversations (``{"messages": [...]}`` records) about passages of ``documents``,
    each document used in turn in a seeded order. The first k of n are the k a smaller n
    gives."""
    rng = random.Random(f"chimera-doc-instructions:{seed}")
    order, ordinary = _order(documents, seed)
    records = []
    for index in range(n):
        text = rng.choice(passages(documents[int(order[index % len(order)])], max_chars))
        document = document_from_text(text, register, rng, ordinary)
        records.append({"messages": conversation(document, register, rng)})
    return records


def drawn_questions(documents: Sequence[str], n: int, seed: int = 0,
                    max_chars: int | None = None, register: Register = PASSAGES,
                    ordered: tuple[np.ndarray, frozenset[str]] | None = None
                    ) -> Iterator[tuple[Document, Question]]:
    """Distinct (passage, question) draws about ``documents`` in a seeded order, enough for
    ``n`` of them; what ``document_qa_items`` (and the preference pairs) take from.
    ``ordered``: ``_order(documents, seed)`` when the caller has it already."""
    rng = random.Random(f"chimera-doc-qa:{seed}")
    order, ordinary = ordered if ordered is not None else _order(documents, seed)
    asked = set()
    for index in range(min(3 * max(n, len(order)), 50 * n + 1000)):
        text = rng.choice(passages(documents[int(order[index % len(order)])], max_chars))
        document = document_from_text(text, register, rng, ordinary)
        if not document.questions:
            continue
        question = rng.choice(document.questions)
        if (text, question.question) not in asked:
            asked.add((text, question.question))
            yield document, question


def document_qa_items(documents: Sequence[str], n: int, seed: int = 0,
                      max_chars: int | None = None, register: Register = PASSAGES
                      ) -> list[dict]:
    """Up to ``n`` distinct reading questions (``trainers.chat_data.qa_item``) about passages
    of ``documents``; fewer when the documents do not hold that many."""
    draws = drawn_questions(documents, n, seed, max_chars, register)
    return [qa_item(document, question, register)
            for document, question in itertools.islice(draws, n)]
