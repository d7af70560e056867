"""The answer checker: right and wrong replies, paraphrases, other candidates."""

import pytest

from trainers.answers import answer_is_right, key_words, words


@pytest.mark.parametrize("expected, reply", [
    ("the garden", "It happens in the garden."),
    ("the garden", "THE GARDEN!"),
    ("the garden", "  garden  "),
    ("Tom", "Lily's friend was Tom."),
    ("Tom", "tom"),
    ("GLOUCESTER", "Gloucester speaks."),
    ("First Citizen", "It is the first citizen, I think."),
    ("glass marble", "The glass marble."),
    ("O Jupiter, no blood!", "o jupiter no blood"),
    ("Lady Anne", "Lady Anne"),  # "Anne", another candidate, is part of the answer
    ("Lily", "The story is about Lily's dog."),  # possessive folded
])
def test_right_answers_and_paraphrases(expected, reply):
    assert answer_is_right(expected, reply, others=("Anne", "Ben"))


@pytest.mark.parametrize("expected, reply, others", [
    ("the garden", "It happens in the park.", ()),
    ("the garden", "", ()),
    ("Tom", "Tommy", ()),  # whole words only
    ("Tom", "Tom or Ben.", ("Ben",)),  # naming another candidate is no answer
    ("Tom", "Ben, Tom, Lily: all of them.", ("Ben", "Lily")),
    ("glass marble", "The marble.", ()),  # every key word is needed
    ("First Citizen", "Second Citizen", ("Second Citizen",)),
    ("the garden", "In the garden near the pond.", ("the pond",)),
])
def test_wrong_answers(expected, reply, others):
    assert not answer_is_right(expected, reply, others)


def test_words_and_key_words():
    assert words("Lily's  friend, TOM!") == ["lily", "friend", "tom"]
    assert key_words("near the old bridge") == ["old", "bridge"]
    assert key_words("The") == ["the"]  # nothing but glue: all of it is needed
    with pytest.raises(ValueError, match="no words"):
        answer_is_right("...", "anything")
