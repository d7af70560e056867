"""Chat fine-tuning data built from the story corpus, deterministic from a seed.

Every generated story carries its facts (hero, friend, place, the object, what went wrong), so
questions about it have known answers. Conversations mix four kinds:

- questions about a story given in the first message, with follow-up questions in later turns;
- continuing a story from its opening;
- telling a story on request (about a named hero at a place);
- greetings and small talk.

Training and held-out conversations come from disjoint story seeds, and both differ from the
pretraining corpus (seed 0 by default), so held-out accuracy measures reading, not recall.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from trainers.stories import Story, generate_story

# Story seeds far from the pretraining corpus's (which users pick small).
TRAIN_SEED_OFFSET = 1_000_000
HELDOUT_SEED_OFFSET = 2_000_000

GREETINGS = [
    ("Hello!", "Hello! I am Chimera. I know many stories. Ask me about one, or ask me for a "
               "story."),
    ("Hi", "Hi! I can answer questions about a story or tell you a new one."),
    ("Good morning!", "Good morning! Would you like a story?"),
    ("Who are you?", "I am Chimera, a small language model that loves simple stories."),
    ("What can you do?", "I can tell short stories, continue a story you start, and answer "
                         "questions about a story you give me."),
    ("Thank you!", "You are welcome!"),
    ("Thanks, bye!", "Goodbye! Come back for another story."),
]


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    expected: str  # the fact a correct answer contains


def questions_about(story: Story) -> list[Question]:
    """Questions whose answers are facts of the story."""
    f = story.facts
    hero, friend = f["hero"], f["friend"]
    found = [
        Question("Who is the story about?", f"The story is about {hero}.", hero),
        Question("Where does the story happen?", f"It happens near the {f['place']}.",
                 f["place"]),
        Question(f"Who is {hero}'s friend?", f"{hero}'s friend is {friend}.", friend),
        Question("What object is in the story?", f"The {f['object']}.", f["object"]),
        Question("What was the problem?", f"The problem was that {_problem(f)}.", f["problem"]),
        Question("How was the problem solved?", f"{f['resolution'][0].upper()}"
                                                f"{f['resolution'][1:]}.", f["resolution"]),
    ]
    if "found_at" in f:
        found.append(Question(f"Where was the {f['object']} found?",
                              f"It was found {f['found_at']}.", f["found_at"]))
    if "fear" in f:
        found.append(Question(f"What was {hero} afraid of?", f"{hero} was afraid of {f['fear']}.",
                              f["fear"]))
    if "animal" in f:
        found.append(Question("What animal needed help?", f"A little {f['animal']}.",
                              f["animal"]))
    if "activity" in f:
        found.append(Question(f"What did {hero} want to do?",
                              f"{hero} wanted to {f['activity']}.", f["activity"]))
    return found


def _problem(facts: dict) -> str:
    problem = facts["problem"]
    if problem.startswith(("lost", "could not", "was afraid")):
        return f"{facts['hero']} {problem}"
    if problem.startswith("both wanted"):
        return f"{facts['hero']} and {facts['friend']} {problem}"
    return problem  # "a duck was stuck"


def question_prompt(story: Story, question: str) -> str:
    return f"Read this story.\n\n{story.text}\n\nQuestion: {question}"


def _qa_conversation(story: Story, rng: random.Random) -> list[dict]:
    asked = rng.sample(questions_about(story), k=rng.choice([1, 1, 2, 3]))
    messages = [{"role": "user", "content": question_prompt(story, asked[0].question)},
                {"role": "assistant", "content": asked[0].answer}]
    for follow_up in asked[1:]:
        messages += [{"role": "user", "content": follow_up.question},
                     {"role": "assistant", "content": follow_up.answer}]
    return messages


def _continuation(story: Story, rng: random.Random) -> list[dict]:
    sentences = story.text.split(". ")
    cut = rng.randint(1, max(1, min(3, len(sentences) - 1)))
    opening = ". ".join(sentences[:cut]) + "."
    rest = ". ".join(sentences[cut:])
    return [{"role": "user", "content": f"Continue this story: {opening}"},
            {"role": "assistant", "content": rest}]


def _tell(story: Story, rng: random.Random) -> list[dict]:
    f = story.facts
    ask = rng.choice([f"Tell me a story about {f['hero']} at the {f['place']}.",
                      f"Please write a short story about {f['hero']}.",
                      f"Can you tell me a story with {f['hero']} and {f['friend']}?"])
    return [{"role": "user", "content": ask}, {"role": "assistant", "content": story.text}]


def _greeting(rng: random.Random) -> list[dict]:
    said, answer = rng.choice(GREETINGS)
    return [{"role": "user", "content": said}, {"role": "assistant", "content": answer}]


def conversations(n: int, seed: int = 0, heldout: bool = False) -> list[dict]:
    """``n`` conversations as ``{"messages": [...]}`` records (the JSONL format of
    ``chimera sft``). ``heldout`` draws them from the held-out stories."""
    offset = HELDOUT_SEED_OFFSET if heldout else TRAIN_SEED_OFFSET
    rng = random.Random(f"chimera-instructions:{seed}:{heldout}")
    records = []
    for index in range(n):
        story = generate_story(seed + offset, index)
        kind = rng.random()
        if kind < 0.6:
            messages = _qa_conversation(story, rng)
        elif kind < 0.75:
            messages = _continuation(story, rng)
        elif kind < 0.9:
            messages = _tell(story, rng)
        else:
            messages = _greeting(rng)
        records.append({"messages": messages})
    return records


def qa_items(n: int, seed: int = 0) -> list[dict]:
    """Held-out reading questions for accuracy: one question per story, the first turn of a
    conversation, with the fact a correct reply contains."""
    rng = random.Random(f"chimera-qa:{seed}")
    items = []
    for index in range(n):
        story = generate_story(seed + HELDOUT_SEED_OFFSET, 100_000 + index)
        q = rng.choice(questions_about(story)[:4])  # hero, place, friend, object
        items.append({"messages": [{"role": "user",
                                    "content": question_prompt(story, q.question)}],
                      "expected": q.expected})
    return items
