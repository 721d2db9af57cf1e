"""What the synthetic benchmark says: the word vocabulary, captions, headlines, modification texts
and the task instructions.

Taught in notebook 00. Every text is built from a vocabulary of a few hundred words shared by all
ten datasets (the shapes and colours of `scenes`, their synonyms, background phrases, news
agents and verbs), so a tiny model trained on some datasets partly transfers to the others.
Nothing here owns random state: each function that draws takes a `numpy.random.Generator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from uniir_lite.data.synthetic.scenes import Group, Scene, groups_of, pick

# ---------------------------------------------------------------------------------------------
# Words
# ---------------------------------------------------------------------------------------------

NUMBER_WORDS = ("zero", "one", "two", "three", "four")
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"), "square": ("square", "block"), "triangle": ("triangle", "wedge"),
    "diamond": ("diamond", "rhombus"), "star": ("star",), "cross": ("cross", "plus"),
}
# Everyday (MSCOCO-like) and news (VisualNews/EDIS-like) ways of saying where a scene is.
BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "snow": ("in the snow", "on white snow", "on a snowy field"),
    "wall": ("against a grey wall", "on a grey wall", "by a grey wall"),
    "sky": ("against a blue sky", "in the sky", "under a clear sky"),
    "grass": ("on the grass", "in a green field", "on a lawn"),
    "sand": ("on the sand", "on a sandy beach", "at the beach"),
    "night": ("at night", "in the dark", "under a night sky"),
}
NEWS_PLACES: dict[str, tuple[str, ...]] = {
    "snow": ("in the snowy square", "after heavy snow"),
    "wall": ("by the grey wall", "outside the grey hall"),
    "sky": ("under clear skies", "beneath a blue sky"),
    "grass": ("in the city park", "on the village green"),
    "sand": ("on the beach", "at the seaside"),
    "night": ("late at night", "after dark"),
}
NEWS_AGENTS = ("officials", "residents", "fans", "workers", "students", "visitors", "police", "artists")
NEWS_VERBS = ("gather around", "inspect", "photograph", "unveil", "celebrate", "paint", "guard", "admire")


def plural(noun: str, n: int) -> str:
    if n == 1:
        return noun
    return noun + "es" if noun.endswith(("s", "sh", "ch", "x")) else noun + "s"  # crosses, pluses


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def and_list(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def group_phrase(g: Group, noun: str | None = None, pattern: bool = True, size: bool = False,
                 number: bool = False) -> str:
    """ "two striped red circles"; `noun` replaces the shape's name (a synonym)."""
    words = ([g.size] if size else []) + ([g.pattern] if pattern and g.pattern != "plain" else [])
    words += [g.colour, plural(noun or g.shape, g.count)]
    head = NUMBER_WORDS[g.count] if number or g.count > 1 else article(words[0])
    return " ".join([head, *words])


def coco_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Five paraphrases of one everyday scene: different templates, word orders and synonyms."""
    groups = groups_of(scene)

    def phrases(**kw) -> list[str]:
        # One name per shape within a caption, so "a cross and a plus" never means one kind.
        names = {shape: pick(rng, SHAPE_SYNONYMS[shape]) for shape in dict.fromkeys(g.shape for g in groups)}
        return [group_phrase(g, names[g.shape], **kw) for g in groups]

    def where() -> str:
        return pick(rng, BACKGROUND_PHRASES[scene.background])

    many = len(scene.objects) > 1
    return [
        f"{capitalise(and_list(phrases(pattern=False)))} {where()}.",
        f"A photo of {and_list(phrases(pattern=False))} {where()}.",
        f"{capitalise(where())} there {'are' if many else 'is'} {and_list(phrases(pattern=False))}.",
        f"{capitalise(and_list(phrases(pattern=False)[::-1]))} seen {where()}.",
        f"An image with {and_list(phrases(pattern=True, number=True))} {where()}.",
    ]


@dataclass(frozen=True)
class NewsEvent:
    """Who did what where: the part of a news text that no image shows."""

    agents: str
    verb: str
    place: str


def random_event(rng: np.random.Generator, background: str) -> NewsEvent:
    return NewsEvent(pick(rng, NEWS_AGENTS), pick(rng, NEWS_VERBS), pick(rng, NEWS_PLACES[background]))


def news_caption(scene: Scene, event: NewsEvent) -> str:
    """VisualNews-style caption: the event and every group of the photo."""
    groups = and_list([group_phrase(g) for g in groups_of(scene)])
    return f"{capitalise(event.agents)} {event.verb} {groups} {event.place}."


def edis_headline(scene: Scene, event: NewsEvent) -> str:
    """EDIS candidate headline: the event and only the kind of the first group, not its colour."""
    main = groups_of(scene)[0].shape
    return f"{capitalise(event.agents)} {event.verb} {plural(main, 2)} {event.place}."


def edis_query(scene: Scene, event: NewsEvent, rng: np.random.Generator) -> str:
    """EDIS query: the same event reworded, with the colours and counts only the image shows."""
    groups = and_list([group_phrase(g, number=True) for g in groups_of(scene)])
    if rng.integers(2):
        return f"{capitalise(event.place)}, {event.agents} {event.verb} {groups}."
    return f"{capitalise(groups)} draw {event.agents} {event.place}."


# ---------------------------------------------------------------------------------------------
# Modification texts (FashionIQ, CIRR)
# ---------------------------------------------------------------------------------------------

_GARMENT_EDITS: dict[str, dict[str, tuple[str, ...]]] = {
    "pattern": {"striped": ("add stripes", "has stripes", "make it striped"),
                "dotted": ("add dots", "has dots", "make it dotted"),
                "plain": ("remove the pattern", "make it plain", "has no pattern")},
    "shade": {"light": ("make it lighter", "is a lighter shade"),
              "dark": ("make it darker", "is a darker shade")},
    "length": {"long": ("make it longer", "is longer"), "short": ("make it shorter", "is shorter")},
}
_COLOUR_EDITS = ("make it {}", "is {}", "change the colour to {}", "in {} instead")


def garment_edit_text(changes: Sequence[tuple[str, str]], rng: np.random.Generator) -> str:
    """FashionIQ-style relative caption for (attribute, new value) changes: "is red and has stripes"."""
    parts = [pick(rng, _COLOUR_EDITS).format(value) if attr == "colour"
             else pick(rng, _GARMENT_EDITS[attr][value]) for attr, value in changes]
    return " and ".join(parts)


def scene_edit_text(op: str, old: Group | None, new: Group | None, background: str,
                    rng: np.random.Generator) -> str:
    """CIRR-style modification text for one edit: add `new`, remove `old`, turn `old` into `new`
    (recolour, reshape) or move everything to `background`."""
    if op == "add" and new is not None:
        return pick(rng, (f"add {group_phrase(new)}", f"put {group_phrase(new)} in the picture",
                          f"same scene with an extra {new.colour} {new.shape}"))
    if op == "remove" and old is not None:
        return pick(rng, (f"remove the {old.colour} {old.shape}", f"take away the {old.colour} {old.shape}",
                          f"same scene without the {old.colour} {old.shape}"))
    if op == "recolour" and old is not None and new is not None:
        c1, s, c2 = old.colour, old.shape, new.colour
        return pick(rng, (f"make the {c1} {s} {c2}", f"turn the {c1} {s} {c2}",
                          f"the {c1} {s} should be {c2}"))
    if op == "reshape" and old is not None and new is not None:
        c, s1, s2 = old.colour, old.shape, new.shape
        return pick(rng, (f"replace the {c} {s1} with {article(c)} {c} {s2}",
                          f"change the {c} {s1} into {article(s2)} {s2}"))
    if op == "background":
        where = pick(rng, BACKGROUND_PHRASES[background])
        return pick(rng, (f"move the shapes {where}", f"same shapes but {where}", f"put everything {where}"))
    raise ValueError(f"unknown scene edit {op!r} or missing group")


# ---------------------------------------------------------------------------------------------
# Instructions: four per (dataset, task), in the spirit of M-BEIR's query_instructions.tsv
# ---------------------------------------------------------------------------------------------

INSTRUCTIONS: dict[str, tuple[str, str, str, str]] = {
    "visualnews_task0": ("Identify the news photo that matches this caption.",
                         "Find a news image that fits the description.",
                         "Retrieve the press photo described by this caption.",
                         "Show me the news picture this caption belongs to."),
    "mscoco_task0": ("Find an everyday image that matches the caption.",
                     "Retrieve a common scene described by this sentence.",
                     "Show me an everyday photo of what the caption says.",
                     "Find the picture this everyday caption describes."),
    "fashion200k_task0": ("Find a product photo of the clothing item described.",
                          "Retrieve the garment image matching this product description.",
                          "Show me the fashion item described here.",
                          "Find an image of a piece of clothing that fits this description."),
    "webqa_task1": ("Find a passage from the encyclopedia that answers the question.",
                    "Retrieve a paragraph that answers this question.",
                    "Which web snippet answers the question?",
                    "Find a text passage with the answer to this question."),
    "edis_task2": ("Find a news image and headline matching this text.",
                   "Retrieve a news photo with its headline for this story.",
                   "Which news picture and headline match the description?",
                   "Find the news image, with its headline, that fits this text."),
    "webqa_task2": ("Find an encyclopedia image with a caption that answers the question.",
                    "Retrieve an image and its caption to answer this question.",
                    "Which picture with a caption answers the question?",
                    "Find an image-caption pair that helps answer the question."),
    "visualnews_task3": ("Find the news caption for this photo.",
                         "Retrieve a news caption that describes the image.",
                         "Which news caption goes with this picture?",
                         "Find the caption a news site would print under this image."),
    "mscoco_task3": ("Find a caption describing this everyday image.",
                     "Retrieve a sentence that describes the scene in the image.",
                     "Which everyday caption fits this picture?",
                     "Find a short description of this common scene."),
    "fashion200k_task3": ("Find the product description of this garment.",
                          "Retrieve a description of the clothing item in the image.",
                          "Which product text describes this fashion item?",
                          "Find the catalogue description for this piece of clothing."),
    "nights_task4": ("Find an image that is identical to the given image.",
                     "Retrieve the picture that looks most like this one.",
                     "Find a near-duplicate of this image.",
                     "Which image is almost the same as the given image?"),
    "oven_task6": ("Retrieve an encyclopedia article that answers the question about the image.",
                   "Find the encyclopedia entry naming the landmark in the photo.",
                   "Which article identifies what the image shows?",
                   "Find a passage about the landmark shown, to answer the question."),
    "infoseek_task6": ("Find a passage that answers the question about this image.",
                       "Retrieve an encyclopedia paragraph answering this question about the picture.",
                       "Which article chunk answers the question regarding the image?",
                       "Find text from the encyclopedia that answers what is asked about the photo."),
    "fashioniq_task7": ("Find a garment image that matches the reference item with the described changes.",
                        "Retrieve the clothing item that looks like this one but changed as described.",
                        "Show me this garment modified as the text says.",
                        "Find a similar fashion item with the requested changes."),
    "cirr_task7": ("I'm looking for a similar everyday image with the described changes.",
                   "Find the scene that matches this image after the described edit.",
                   "Retrieve an image like this one, changed as the text describes.",
                   "Show me this scene modified as described."),
    "oven_task8": ("Find an encyclopedia image and passage that identify the landmark in the photo.",
                   "Retrieve an image-text entry naming what the image shows.",
                   "Which encyclopedia picture and article match this image and question?",
                   "Find an image-text pair from the encyclopedia to answer a question about an image."),
    "infoseek_task8": ("Find an encyclopedia image with a passage answering the question about this photo.",
                       "Retrieve an image-text pair holding the answer to the question about the image.",
                       "Which encyclopedia picture and paragraph answer this question about the image?",
                       "Find an image and article chunk that answer what is asked about the picture."),
}
