"""The encyclopedia behind WebQA, OVEN and InfoSeek: named landmarks, their pictures and texts.

Taught in notebook 00. Each entity has a visual signature no other entity shares (so it can be
recognised from a photo) and five facts that only its texts tell: article chunks, OVEN passages,
WebQA snippets and captions, and the questions asked about them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from uniir_lite.data.synthetic.scenes import (
    BACKGROUNDS, COLOURS, PATTERNS, SHAPES, Group, Scene, jitter, pick, place,
)
from uniir_lite.data.synthetic.texts import BACKGROUND_PHRASES, NUMBER_WORDS, article, capitalise, plural

KINDS = ("tower", "bridge", "statue", "temple", "gate", "fountain")
REGIONS = ("north", "south", "east", "west", "coast", "hills")
BUILDERS = ("monks", "sailors", "farmers", "miners", "kings", "traders")
CENTURIES = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth")
MATERIALS = ("stone", "wood", "glass", "iron", "marble", "brick")
FAMOUS = ("bells", "gardens", "markets", "festivals", "lanterns", "songs")
# Names are built from shared syllables, so a subword tokenizer sees the same pieces again.
_FIRST = ("Kal", "Mor", "Ten", "Vas", "Bri", "Lun", "Dar", "Sel", "Or", "Fen", "Gal", "Rho", "Tam",
          "Wen", "Zir", "Hal")
_MIDDLE = ("a", "e", "i", "o", "u", "ar", "en", "il", "on", "ur")
_LAST = ("dor", "mere", "ston", "vik", "ara", "eth", "und", "wyn", "os", "ine", "ric", "bel", "gar", "lin")
MAX_ENTITIES = len(_FIRST) * len(_LAST) * (1 + len(_MIDDLE))


@dataclass(frozen=True)
class Entity:
    """A named landmark: a visual signature (unique per entity) and five facts only texts tell."""

    entity_id: str  # Wikidata-like, e.g. "Q1001"
    title: str      # e.g. "Kaldor Tower"
    kind: str
    shape: str
    colour: str
    pattern: str
    background: str
    count: int
    region: str
    builders: str
    century: str
    material: str
    famous: str

    def answer(self, slot: str) -> str:
        """The answer to a question about `slot`: a fact, a visual attribute, or "look" (the title)."""
        if slot == "count":
            return NUMBER_WORDS[self.count]
        return self.title if slot == "look" else getattr(self, slot)

    def look(self) -> str:
        """The signature in words: "two red striped circles against a grey wall"."""
        return (f"{NUMBER_WORDS[self.count]} {self.colour} {self.pattern} {plural(self.shape, self.count)} "
                f"{BACKGROUND_PHRASES[self.background][0]}")

    def attrs(self) -> dict:
        return {"entity_id": self.entity_id, "entity": self.title, "kind": self.kind, "shape": self.shape,
                "colour": self.colour, "pattern": self.pattern, "background": self.background,
                "count": self.count}


def make_encyclopedia(n: int, rng: np.random.Generator) -> list[Entity]:
    """`n` entities with unique names and unique visual signatures."""
    if n > MAX_ENTITIES:
        raise ValueError(f"at most {MAX_ENTITIES} entities can be named, asked for {n}")
    names = [f + last for f in _FIRST for last in _LAST]
    names += [f + m + last for f in _FIRST for m in _MIDDLE for last in _LAST]
    names = [names[i] for i in rng.permutation(len(names))[:n]]
    signatures = [(s, c, p, b, k) for s in SHAPES for c in COLOURS for p in PATTERNS for b in BACKGROUNDS
                  for k in (1, 2, 3)]
    if n > len(signatures):
        raise ValueError(f"at most {len(signatures)} entities have distinct looks, asked for {n}")
    signatures = [signatures[i] for i in rng.permutation(len(signatures))[:n]]
    entities = []
    for i, (name, (shape, colour, pattern, background, count)) in enumerate(zip(names, signatures)):
        kind = pick(rng, KINDS)
        entities.append(Entity(
            f"Q{1001 + i}", f"{name} {kind.capitalize()}", kind, shape, colour, pattern, background, count,
            pick(rng, REGIONS), pick(rng, BUILDERS), pick(rng, CENTURIES), pick(rng, MATERIALS),
            pick(rng, FAMOUS),
        ))
    return entities


def entity_scene(e: Entity, rng: np.random.Generator | None) -> Scene:
    """The entity's canonical picture (rng None) or a noisy photo of it (another layout and light)."""
    group = Group(e.shape, e.colour, e.count, "large" if e.count == 1 else "medium", e.pattern)
    scene = place([group], e.background, rng, move=0.06)
    return scene if rng is None else jitter(scene, rng, move=0.03, tint=25, scale=0.12)


def wiki_chunks(e: Entity) -> list[str]:
    """InfoSeek-style article chunks (each follows "<title>. " in the pool); answers recur across chunks."""
    return [
        f"The {e.title} is a {e.kind} showing {e.look()}.",
        f"It was built by {e.builders} in the {e.century} century.",
        f"The {e.kind} stands in the {e.region} and is famous for its {e.famous}.",
        f"{capitalise(article(e.material))} {e.material} {e.kind} of the {e.region}, raised by {e.builders}.",
    ]


def oven_passage(e: Entity) -> str:
    """OVEN's entity text, "<title>. <summary>", worded unlike the InfoSeek chunks."""
    a = capitalise(article(e.material))
    return f"{e.title}. {a} {e.material} {e.kind} in the {e.region}, known by {e.look()}."


def webqa_snippets(e: Entity) -> list[str]:
    """WebQA-style web snippets, one fact pair each, in a travel-guide voice."""
    return [
        f"Visitors to the {e.title} in the {e.region} come for its {e.famous}.",
        f"Guides say {e.builders} raised the {e.title} during the {e.century} century.",
        f"The {e.title} is made of {e.material} and shows {NUMBER_WORDS[e.count]} {e.colour} "
        f"{plural(e.shape, e.count)}.",
    ]


def webqa_caption(e: Entity) -> str:
    return f"The {e.title}, a {e.kind} in the {e.region}."


FACT_SLOTS = ("region", "builders", "century", "material", "famous")
INFOSEEK_SLOTS = (*FACT_SLOTS, "colour", "count")
_INFOSEEK_QUESTIONS: dict[str, tuple[str, ...]] = {
    "region": ("Which region is this {k} in?", "Where does this {k} stand?"),
    "builders": ("Who built this {k}?", "Which people built this {k}?"),
    "century": ("In which century was this {k} built?", "When was this {k} built?"),
    "material": ("What is this {k} made of?", "Which material was used for this {k}?"),
    "famous": ("What is this {k} famous for?", "What is this {k} known for?"),
    "colour": ("What colour is this {k}?", "Which colour are the shapes of this {k}?"),
    "count": ("How many shapes does this {k} show?", "How many shapes make up this {k}?"),
}
_WEBQA_QUESTIONS: dict[str, tuple[str, ...]] = {
    "region": ("Where is the {t}?", "In which region is the {t}?"),
    "famous": ("What is the {t} known for?", "Why do people visit the {t}?"),
    "builders": ("Who raised the {t}?", "Which people built the {t}?"),
    "century": ("When was the {t} built?", "In which century was the {t} raised?"),
    "material": ("What is the {t} made of?", "Which material is the {t} built from?"),
    "colour": ("What colour are the shapes on the {t}?",),
    "count": ("How many shapes does the {t} show?",),
}
WEBQA_TEXT_SLOTS = tuple(_WEBQA_QUESTIONS)
WEBQA_IMAGE_SLOTS = ("colour", "count", "shape", "pattern", "look")
OVEN_QUESTIONS = ("What is this {k}?", "Which {k} is this?", "What is the name of this {k}?",
                  "Which landmark is shown here?")


def infoseek_question(e: Entity, slot: str, rng: np.random.Generator) -> str:
    return pick(rng, _INFOSEEK_QUESTIONS[slot]).format(k=e.kind)


def webqa_text_question(e: Entity, slot: str, rng: np.random.Generator) -> str:
    return pick(rng, _WEBQA_QUESTIONS[slot]).format(t=e.title)


def webqa_image_question(e: Entity, slot: str) -> str:
    """A question whose answer the entity's picture shows; "look" describes it instead of naming it."""
    if slot == "look":
        return f"Which {e.kind} shows {e.look()}?"
    return {"colour": f"What colour is the {e.title}?", "count": f"How many shapes make up the {e.title}?",
            "shape": f"Which shape appears on the {e.title}?",
            "pattern": f"Is the {e.title} plain, striped or dotted?"}[slot]


def contains_word(text: str, word: str) -> bool:
    """Whole-word match, as InfoSeek marks a chunk positive when it contains the answer."""
    return word in text.replace(",", " ").replace(".", " ").split()
