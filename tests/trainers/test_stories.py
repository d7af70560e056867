"""The built-in story generator: deterministic, varied, and true to its facts."""

from collections import Counter

from trainers.stories import _Writer, generate_stories, stories_of_size


def test_same_seed_same_stories_and_other_seed_other_stories():
    first = [s.text for s in generate_stories(50, seed=7)]
    assert first == [s.text for s in generate_stories(50, seed=7)]
    assert first != [s.text for s in generate_stories(50, seed=8)]


def test_a_larger_corpus_extends_a_smaller_one():
    small = [s.text for s in stories_of_size(20_000, seed=1)]
    large = [s.text for s in stories_of_size(60_000, seed=1)]
    assert large[:len(small)] == small and len(large) > len(small)
    assert sum(len(t.encode()) + 1 for t in small) >= 20_000


def test_stories_are_varied():
    stories = list(generate_stories(2000, seed=0))
    heroes = Counter(s.facts["hero"] for s in stories)
    assert len(heroes) > 150  # hundreds of names
    assert {s.facts["arc"] for s in stories} == set(_Writer.ARCS)
    assert len({s.facts["object"] for s in stories}) >= 35
    assert len({s.facts["place"] for s in stories}) >= 30
    assert len({s.text for s in stories}) == len(stories)
    assert sum('"' in s.text for s in stories) == len(stories)  # every story has dialogue
    assert any("On the way" in s.text for s in stories)  # nested episodes occur


def test_facts_are_stated_in_the_story():
    for story in generate_stories(300, seed=3):
        for key in ("hero", "friend", "place", "object"):
            assert story.facts[key] in story.text, (key, story.facts, story.text)
        assert f"named {story.facts['hero']}" in story.text
