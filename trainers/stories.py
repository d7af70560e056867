"""The built-in story corpus: simple children's stories in the style of TinyStories.

Deterministic from a seed: story ``i`` depends only on ``(seed, i)``, so a larger corpus extends
a smaller one instead of reshuffling it. Each story keeps its facts (who, where, what happened)
so later stages can ask questions whose answers are in the text.

Variety comes from a few hundred names, animals, places, objects, feelings and actions, five story
arcs, and episodes that nest (a story can contain a detour with its own small problem) so that
bigger models keep finding structure to learn.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

GENERATOR_VERSION = 1


def _phrases(text: str) -> list[str]:
    """'|'-separated phrases, whitespace (including line breaks) folded to single spaces."""
    return [" ".join(p.split()) for p in text.split("|") if p.strip()]


NAMES = """
Lily Tom Mia Ben Anna Max Lucy Sam Ella Jack Zoe Leo Ruby Finn Ivy Noah Rosa Eli Nina Owen
Maya Jude Clara Hugo Alice Felix Daisy Oscar Grace Theo Hazel Milo Iris Jonah Nora Toby Ada Luca
Stella Henry Poppy Kai Willow Arlo Mabel Ezra Olive Rory Pearl Silas June Abel Wren Otis Bella
Gus Freya Ari Lena Jasper Cora Reed Elsie Dean Tessa Louis Vera Caleb Fern Ivan Greta Nico Lola
Bruno Ines Cyrus Dora Emil Fay Gideon Hana Isaac Jill Karl Lara Moses Nell Omar Pia Quinn Rhea
Saul Tara Umar Uma Victor Wanda Xavier Yara Zane Amara Basil Celia Dario Edie Ferris Gemma Hal
Ilse Joel Kira Linus Mira Ned Opal Perry Rita Seth Tilly Ulla Vince Wes Yuki Zelda Asha Bodhi
Cleo Duncan Esme Flynn Gwen Harvey Isla Jamie Kit Lorna Mack Nadia Orla Pablo Remy Sadie Tobias
""".split()
ANIMALS = """
bunny fox bear owl mouse duck frog kitten puppy squirrel hedgehog turtle robin deer goat lamb
pony piglet otter badger raccoon beaver hen goose swan crab snail bee ladybug butterfly chick
""".split()
ANIMAL_NAMES = """
Pip Bramble Mopsy Tuck Sunny Biscuit Pebble Clover Nutmeg Button Whiskers Puddle Thistle Maple
Acorn Bubbles Cocoa Dot Fluff Ginger Honey Juniper Kiwi Muffin Noodle Pickle Ripple Sprout Tango
""".split()
PLACES = _phrases("""
park|garden|forest|beach|farm|meadow|school|library|kitchen|attic|pond|river bank|hill|village
square|market|zoo|playground|orchard|barn|bakery|lighthouse|cave|castle|treehouse|field of
flowers|snowy hill|old bridge|little shop|train station|museum|backyard|harbor|wood|valley|island
""")
OBJECTS = _phrases("""
red ball|blue kite|teddy bear|shiny key|toy boat|kite string|yellow hat|music box|picture book
|little drum|paper crown|green umbrella|wooden train|glass marble|toy robot|pink scarf|magic
wand|star sticker|silver bell|paint brush|lunch box|soft blanket|toy car|bird whistle|puzzle
piece|jar of honey|basket of apples|balloon|sand bucket|map|lantern|feather|seashell|snow globe
|spinning top|rubber duck|crayon box|flower pot|pair of boots|birthday card
""")
FEELINGS_BAD = "sad worried scared lonely upset grumpy nervous cross confused tired".split()
FEELINGS_GOOD = "happy proud glad calm brave cheerful thankful excited warm joyful".split()
ADJECTIVES = """
big small kind shy clever funny quiet curious gentle brave busy sleepy tiny cheerful friendly
careful silly wise bright playful
""".split()
WEATHER = ["the sun was shining", "it was a windy day", "soft rain was falling",
           "the sky was grey", "snow covered the ground", "the birds were singing",
           "the air was warm", "clouds raced across the sky"]
HIDING_SPOTS = ["under a bush", "behind a big rock", "in a hollow log", "under the bed",
                "inside a box", "next to the pond", "on top of a shelf", "in a pile of leaves",
                "behind the door", "under a blanket", "in the tall grass", "beside the tree"]
ACTIVITIES = ["build a sandcastle", "bake a cake", "climb the tall tree", "fly a kite",
              "paint a picture", "plant some seeds", "sing a song", "make a card",
              "build a tower of blocks", "catch a butterfly", "find a rainbow",
              "learn to swim", "ride a bike", "make a necklace", "write a poem"]
FEARS = ["the dark", "the thunder", "a big dog", "the deep water", "a loud noise",
         "the tall slide", "a strange shadow", "the wind howling"]
# Speech verbs by how the line ends.
SAY = {".": ["said", "whispered", "answered", "laughed", "replied"],
       "?": ["asked", "wondered", "asked softly"],
       "!": ["shouted", "called", "cried", "said loudly"]}
MORALS = ["Sharing makes everyone happy.", "It is good to ask for help.",
          "Being brave does not mean you are never scared.", "Friends help each other.",
          "Trying again is how you learn.", "Kind words can fix many things.",
          "Every problem is smaller with a friend."]


@dataclass(frozen=True)
class Character:
    name: str
    kind: str  # "girl", "boy", or an animal

    @property
    def intro(self) -> str:
        return f"a little {self.kind} named {self.name}"


@dataclass
class Story:
    """One generated story and the facts a reader could answer questions about."""

    text: str
    facts: dict[str, str] = field(default_factory=dict)


def _character(rng: random.Random, exclude: set[str]) -> Character:
    while True:
        if rng.random() < 0.35:
            char = Character(rng.choice(ANIMAL_NAMES), rng.choice(ANIMALS))
        else:
            char = Character(rng.choice(NAMES), rng.choice(["girl", "boy"]))
        if char.name not in exclude:
            exclude.add(char.name)
            return char


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


class _Writer:
    """Builds one story sentence by sentence while recording its facts."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.sentences: list[str] = []
        self.facts: dict[str, str] = {}
        self.names: set[str] = set()

    def say(self, speaker: Character, line: str) -> None:
        verb = self.rng.choice(SAY[line[-1]])
        quoted = line[:-1] + "," if line.endswith(".") else line
        self.sentences.append(f'"{quoted}" {verb} {speaker.name}.')

    def add(self, *sentences: str) -> None:
        self.sentences.extend(sentences)

    def opening(self, hero: Character, place: str) -> None:
        rng = self.rng
        start = rng.choice(["Once upon a time", "One day", "Long ago", "One morning",
                            "On a sunny afternoon", "Not long ago"])
        first, second = rng.sample(ADJECTIVES, 2)
        self.add(f"{start}, there was {hero.intro} who lived near the {place}.",
                 f"{hero.name} was {first} and {second}, and {rng.choice(WEATHER)}.")

    def detour(self, hero: Character, depth: int) -> None:
        """A small nested episode: someone met on the way with a little problem of their own."""
        rng = self.rng
        other = _character(rng, self.names)
        need = rng.choice(OBJECTS)
        self.add(f"On the way, {hero.name} met {other.intro}.",
                 f"{other.name} looked {rng.choice(FEELINGS_BAD)}.")
        self.say(other, f"I cannot find my {need}.")
        if depth > 0 and rng.random() < 0.4:
            self.detour(other, depth - 1)
        self.add(f"{hero.name} looked {rng.choice(HIDING_SPOTS)} and found the {need}.",
                 f"{other.name} smiled and said thank you.")
        self.facts.setdefault("met", other.name)

    def lost_object(self, hero: Character, friend: Character, place: str) -> None:
        rng = self.rng
        obj, spot = rng.choice(OBJECTS), rng.choice(HIDING_SPOTS)
        self.add(f"{hero.name} had {_a(obj)} that {hero.name} loved very much.",
                 f"One day, {hero.name} went to the {place} to play, but the {obj} was gone!",
                 f"{hero.name} felt {rng.choice(FEELINGS_BAD)}.")
        self.say(hero, f"Where is my {obj}?")
        if rng.random() < 0.5:
            self.detour(hero, depth=2)
        self.add(f"Then {hero.name}'s friend {friend.name} came by.")
        self.say(friend, "Do not worry. I will help you look.")
        self.add(f"They looked everywhere. At last {friend.name} found the {obj} {spot}.",
                 f"{hero.name} hugged {friend.name} and felt {rng.choice(FEELINGS_GOOD)}.")
        self.facts.update(object=obj, problem=f"lost the {obj}",
                          resolution=f"{friend.name} found the {obj} {spot}", found_at=spot)

    def wants_activity(self, hero: Character, friend: Character, place: str) -> None:
        rng = self.rng
        activity = rng.choice(ACTIVITIES)
        obj = rng.choice(OBJECTS)
        self.add(f"{hero.name} wanted to {activity} at the {place}.",
                 f"{hero.name} tried once, but it did not work.",
                 f"{hero.name} felt {rng.choice(FEELINGS_BAD)} and sat down.")
        self.say(friend, "Let us try together!")
        if rng.random() < 0.4:
            self.detour(friend, depth=1)
        self.add(f"{friend.name} brought {_a(obj)} to help.",
                 "They tried again, and this time they did it!",
                 f"{hero.name} felt {rng.choice(FEELINGS_GOOD)}.")
        self.facts.update(object=obj, problem=f"could not {activity}",
                          resolution=f"{hero.name} and {friend.name} did it together",
                          activity=activity)

    def sharing(self, hero: Character, friend: Character, place: str) -> None:
        rng = self.rng
        obj = rng.choice(OBJECTS)
        self.add(f"{hero.name} and {friend.name} were playing at the {place}.",
                 f"They both wanted the same {obj}.")
        self.say(hero, f"The {obj} is mine!")
        self.say(friend, "No, I want it!")
        self.add(f"They both felt {rng.choice(FEELINGS_BAD)}.",
                 f"Then {hero.name} had an idea.")
        self.say(hero, f"Let us take turns with the {obj}.")
        self.add("They took turns and played all day.",
                 f"{friend.name} felt {rng.choice(FEELINGS_GOOD)}.")
        self.facts.update(object=obj, problem=f"both wanted the {obj}",
                          resolution="they took turns")

    def fear(self, hero: Character, friend: Character, place: str) -> None:
        rng = self.rng
        fear = rng.choice(FEARS)
        obj = rng.choice(OBJECTS)
        self.add(f"One night at the {place}, {hero.name} was afraid of {fear}.")
        self.say(hero, f"I do not like {fear}.")
        self.add(f"{friend.name} sat next to {hero.name} and held out {_a(obj)}.")
        self.say(friend, f"When I am scared, I hold my {obj}. You can hold it too.")
        self.add(f"{hero.name} held the {obj} and took a deep breath.",
                 f"Soon {hero.name} was not afraid anymore.")
        self.facts.update(object=obj, problem=f"was afraid of {fear}",
                          resolution=f"{friend.name} shared the {obj}", fear=fear)

    def helping_animal(self, hero: Character, friend: Character, place: str) -> None:
        rng = self.rng
        animal = rng.choice(ANIMALS)
        gift = rng.choice(OBJECTS)
        self.add(f"{hero.name} went to the {place} with {friend.name}.",
                 f"There they saw a little {animal} stuck {rng.choice(HIDING_SPOTS)}.")
        self.say(friend, f"The {animal} needs help!")
        if rng.random() < 0.3:
            self.detour(hero, depth=1)
        self.add(f"{hero.name} gently helped the {animal} get free.",
                 f"The next day, the {animal} came back with {_a(gift)} for {hero.name}.",
                 f"{hero.name} felt {rng.choice(FEELINGS_GOOD)}.")
        self.facts.update(object=gift, problem=f"a {animal} was stuck",
                          resolution=f"{hero.name} helped the {animal}", animal=animal)

    ARCS = ("lost_object", "wants_activity", "sharing", "fear", "helping_animal")


def generate_story(seed: int, index: int) -> Story:
    """Story number ``index`` of the corpus with this seed."""
    rng = random.Random(f"chimera-stories:{GENERATOR_VERSION}:{seed}:{index}")
    writer = _Writer(rng)
    hero = _character(rng, writer.names)
    friend = _character(rng, writer.names)
    place = rng.choice(PLACES)
    arc = rng.choice(_Writer.ARCS)
    writer.opening(hero, place)
    getattr(writer, arc)(hero, friend, place)
    ending = rng.random()
    if ending < 0.4:
        writer.add(rng.choice(MORALS))
    elif ending < 0.7:
        writer.add(f"From that day on, {hero.name} and {friend.name} were best friends.")
    else:
        writer.add(f"That night, {hero.name} went to sleep with a smile.")
    writer.facts.update(hero=hero.name, hero_kind=hero.kind, friend=friend.name,
                        friend_kind=friend.kind, place=place, arc=arc)
    return Story(" ".join(writer.sentences), writer.facts)


def generate_stories(n_stories: int, seed: int = 0) -> Iterator[Story]:
    for index in range(n_stories):
        yield generate_story(seed, index)


def stories_of_size(n_bytes: int, seed: int = 0) -> Iterator[Story]:
    """Stories in order until their UTF-8 text reaches ``n_bytes`` in total."""
    total, index = 0, 0
    while total < n_bytes:
        story = generate_story(seed, index)
        total += len(story.text.encode()) + 1
        index += 1
        yield story
