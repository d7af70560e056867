"""Chat fine-tuning data from the built-in story generator, deterministic from a seed.

Every generated story carries its facts (hero, friend, place, the object, what went wrong), so
questions about it have known answers; the conversations are made by the builder the user's own
documents go through too (``trainers.chat_data``).

Training and held-out conversations come from disjoint story seeds, and both differ from the
pretraining corpus (seed 0 by default), so held-out accuracy measures reading, not recall.
"""

from __future__ import annotations

import random

from trainers.chat_data import STORIES, Document, Question, conversation, qa_item
from trainers.stories import Story, generate_story

# Story seeds far from the pretraining corpus's (which users pick small).
TRAIN_SEED_OFFSET = 1_000_000
HELDOUT_SEED_OFFSET = 2_000_000


def questions_about(story: Story) -> list[Question]:
    """Questions whose answers are facts of the story."""
    f = story.facts
    hero, friend = f["hero"], f["friend"]
    characters = [name for name in (hero, friend, f.get("met")) if name]
    found = [
        Question("Who is the story about?", f"The story is about {hero}.", hero,
                 tuple(c for c in characters if c != hero), kind="hero"),
        Question("Where does the story happen?", f"It happens near the {f['place']}.",
                 f["place"], kind="place"),
        Question(f"Who is {hero}'s friend?", f"{hero}'s friend is {friend}.", friend,
                 tuple(c for c in characters if c not in (hero, friend)), kind="friend"),
        Question("What object is in the story?", f"The {f['object']}.", f["object"],
                 kind="object"),
        Question("What was the problem?", f"The problem was that {_problem(f)}.", f["problem"],
                 kind="problem"),
        Question("How was the problem solved?", f"{f['resolution'][0].upper()}"
                                                f"{f['resolution'][1:]}.", f["resolution"],
                 kind="resolution"),
    ]
    if "found_at" in f:
        found.append(Question(f"Where was the {f['object']} found?",
                              f"It was found {f['found_at']}.", f["found_at"], kind="found_at"))
    if "fear" in f:
        found.append(Question(f"What was {hero} afraid of?", f"{hero} was afraid of {f['fear']}.",
                              f["fear"], kind="fear"))
    if "animal" in f:
        found.append(Question("What animal needed help?", f"A little {f['animal']}.",
                              f["animal"], kind="animal"))
    if "activity" in f:
        found.append(Question(f"What did {hero} want to do?",
                              f"{hero} wanted to {f['activity']}.", f["activity"],
                              kind="activity"))
    return found


def _problem(facts: dict) -> str:
    problem = facts["problem"]
    if problem.startswith(("lost", "could not", "was afraid")):
        return f"{facts['hero']} {problem}"
    if problem.startswith("both wanted"):
        return f"{facts['hero']} and {facts['friend']} {problem}"
    return problem  # "a duck was stuck"


def story_document(story: Story) -> Document:
    f = story.facts
    requests = (f"Tell me a story about {f['hero']} at the {f['place']}.",
                f"Please write a short story about {f['hero']}.",
                f"Can you tell me a story with {f['hero']} and {f['friend']}?")
    return Document(story.text, tuple(questions_about(story)), requests)


def conversations(n: int, seed: int = 0, heldout: bool = False) -> list[dict]:
    """``n`` conversations as ``{"messages": [...]}`` records (the JSONL format of
    ``chimera sft``). ``heldout`` draws them from the held-out stories."""
    offset = HELDOUT_SEED_OFFSET if heldout else TRAIN_SEED_OFFSET
    rng = random.Random(f"chimera-instructions:{seed}:{heldout}")
    return [{"messages": conversation(story_document(generate_story(seed + offset, index)),
                                      STORIES, rng)} for index in range(n)]


def qa_items(n: int, seed: int = 0) -> list[dict]:
    """Held-out reading questions for accuracy: one question per story, the first turn of a
    conversation, with the fact a correct reply contains."""
    rng = random.Random(f"chimera-qa:{seed}")
    items = []
    for index in range(n):
        document = story_document(generate_story(seed + HELDOUT_SEED_OFFSET, 100_000 + index))
        question = rng.choice(document.questions[:4])  # hero, place, friend, object
        items.append(qa_item(document, question, STORIES))
    return items
