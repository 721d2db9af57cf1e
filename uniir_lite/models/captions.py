"""Grading generated captions of the synthetic images: which colours and shapes (or garment kinds)
a caption names, and how well they match the image's `src_content`. Shared by notebooks 02 (BLIP,
`attribute_f1`) and 03 (BLIP-2, `attribute_accuracy`).

Plurals follow the generator's own rule (`uniir_lite.data.synthetic.texts.plural`: "crosses",
"rhombuses", "dresses"); garment names already plural ("trousers") are kept as they are.
"""

from __future__ import annotations

import json
import re

from uniir_lite.data.synthetic.scenes import COLOURS, GARMENTS
from uniir_lite.data.synthetic.texts import SHAPE_SYNONYMS, plural


def _attribute_words() -> tuple[dict[str, str], dict[str, str]]:
    """(colour word -> colour, object word -> shape or garment kind), synonyms and plurals included."""
    colours = {c: c for c in COLOURS}
    objects: dict[str, str] = {}
    for shape, names in SHAPE_SYNONYMS.items():
        for name in names:
            objects[name] = objects[plural(name, 2)] = shape
    for g in GARMENTS:
        objects[g] = g
        if not g.endswith("s"):  # "trousers" is already plural
            objects[plural(g, 2)] = g
    return colours, objects


COLOUR_WORDS, OBJECT_WORDS = _attribute_words()
ATTRIBUTE_WORDS: dict[str, str] = {**COLOUR_WORDS, **OBJECT_WORDS}


def image_attributes(src_content: str) -> tuple[set[str], set[str]]:
    """(colours, object kinds) an image shows, from its `src_content` (a scene or a garment)."""
    attrs = json.loads(src_content)
    if "groups" in attrs:
        return {g["colour"] for g in attrs["groups"]}, {g["shape"] for g in attrs["groups"]}
    return {attrs["colour"]}, {attrs["kind"]}


def attributes_of(src_content: str) -> set[str]:
    """Colours and shapes (or garment kind) of an image, from its `src_content` JSON."""
    colours, objects = image_attributes(src_content)
    return colours | objects


def attributes_named(text: str) -> set[str]:
    """The colours and shapes a text names (synonyms mapped to the shape: "rhombuses" -> diamond)."""
    return {ATTRIBUTE_WORDS[w] for w in re.findall(r"[a-z]+", text.lower()) if w in ATTRIBUTE_WORDS}


def attribute_f1(text: str, src_content: str) -> float:
    """F1 between the attributes a caption names and those the image has (0 if it names none)."""
    named, true = attributes_named(text), attributes_of(src_content)
    hit = len(named & true)
    return 2 * hit / (len(named) + len(true)) if named else 0.0


def attribute_accuracy(caption: str, src_content: str) -> float:
    """Mean of two hits: the caption's first colour word is a colour of the image, and its first shape
    (or garment) word is an object of the image. A caption naming none scores 0 on that half."""
    words = caption.lower().replace(",", " ").replace(".", " ").split()
    colours, objects = image_attributes(src_content)
    first_colour = next((COLOUR_WORDS[w] for w in words if w in COLOUR_WORDS), None)
    first_object = next((OBJECT_WORDS[w] for w in words if w in OBJECT_WORDS), None)
    return ((first_colour in colours) + (first_object in objects)) / 2
