"""Is a reply the right answer? A check that needs only the expected answer, not the facts of
whatever made the question.

A reply is right when it holds every key word of the expected answer (its words less articles,
prepositions and other glue) and names no other candidate answer. Words are compared after
folding case, punctuation, spacing and possessives, so "It happens in the garden." answers
"the garden" and "Lily's friend was Tom" answers "Tom", while "Tom or Ben" does not when Ben
is one of the other candidates: a reply that lists every name would otherwise always be right.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Glue words: an answer is right without them ("garden" for "the garden", "near the park").
GLUE_WORDS = frozenset("""
a an the of to in at on near by into onto inside under behind beside with from for and or
it its is was were be been it's this that there here they he she his her their them
""".split())
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def words(text: str) -> list[str]:
    """Lower-case words of ``text``, punctuation dropped, a possessive ``'s`` cut off."""
    found = []
    for word in _WORD.findall(text.lower()):
        word = word.replace("’", "'")
        found.append(word[:-2] if word.endswith("'s") else word)
    return found


def key_words(answer: str) -> list[str]:
    """The words a reply must contain to give ``answer``: all but the glue words (all of them
    when the answer is nothing but glue)."""
    every = words(answer)
    return [w for w in every if w not in GLUE_WORDS] or every


def names_answer(reply: str, answer: str) -> bool:
    """Whether every key word of ``answer`` is a word of ``reply``."""
    keys = key_words(answer)
    said = set(words(reply))
    return bool(keys) and all(key in said for key in keys)


def answer_is_right(expected: str, reply: str, others: Iterable[str] = ()) -> bool:
    """Whether ``reply`` gives ``expected`` and none of the ``others`` (the other candidate
    answers to the same question). A candidate whose key words are all in the expected answer
    ("Anne" beside "Lady Anne") is part of it, not another answer."""
    if not key_words(expected):
        raise ValueError(f"expected answer {expected!r} has no words to look for")
    if not names_answer(reply, expected):
        return False
    expected_keys = set(key_words(expected))
    return not any(names_answer(reply, other) for other in others
                   if not set(key_words(other)) <= expected_keys)
