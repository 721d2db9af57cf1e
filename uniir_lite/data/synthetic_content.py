"""What the synthetic benchmark shows and says: drawn scenes, garments, entities and their texts.

Taught in notebook 00. Every image is built from a few visual primitives (shape, colour, size,
pattern, position, count, background) and every text from a vocabulary of a few hundred words
shared by all ten datasets, so a tiny model trained on some datasets partly transfers to the
others. Nothing here owns random state: each function that draws takes a `numpy.random.Generator`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TypeVar

import numpy as np
from PIL import Image, ImageChops, ImageDraw

# ---------------------------------------------------------------------------------------------
# Visual primitives
# ---------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
# Saturated colours, none of them close to a background, so colour survives a 32 px resize.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35), "orange": (245, 135, 20), "yellow": (240, 215, 30), "green": (25, 135, 45),
    "blue": (35, 75, 215), "purple": (135, 50, 185), "pink": (240, 110, 185), "brown": (115, 65, 25),
}
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted")
OBJECT_SIZES: dict[str, float] = {"small": 0.11, "medium": 0.15, "large": 0.19}  # radius / width
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "snow": (242, 242, 246), "wall": (150, 150, 155), "sky": (160, 200, 240),
    "grass": (150, 205, 120), "sand": (225, 200, 150), "night": (35, 35, 75),
}
STUDIO = "studio"  # the plain backdrop of garment product photos; never named in a text
_STUDIO_RGB = (205, 205, 212)
# A 2x2 grid keeps objects big enough to tell apart at 32 px; a lone object sits in the centre.
CELLS: dict[str, tuple[float, float]] = {
    "top left": (0.28, 0.28), "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72), "bottom right": (0.72, 0.72), "centre": (0.5, 0.5),
}
_QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
MAX_OBJECTS = len(_QUADRANTS)

GARMENTS: tuple[str, ...] = ("shirt", "dress", "skirt", "trousers", "jacket")
SHADES: tuple[str, ...] = ("light", "dark")
LENGTHS: tuple[str, ...] = ("short", "long")
_GARMENT_RADIUS = 0.42
JPEG_QUALITY = 85
T = TypeVar("T")


@dataclass(frozen=True)
class Obj:
    """One drawn object; `x`, `y` are its centre as fractions of the image side."""

    shape: str
    colour: str
    size: str
    pattern: str
    x: float
    y: float
    scale: float = 1.0
    shade: str = ""   # garments only: "light" or "dark"
    length: str = ""  # garments only: "short" or "long"


@dataclass(frozen=True)
class Scene:
    """Everything an image shows; `tint` is a small RGB shift (lighting) added to every colour."""

    background: str
    objects: tuple[Obj, ...]
    tint: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True)
class Group:
    """`count` equal objects, as a caption names them ("two red circles")."""

    shape: str
    colour: str
    count: int = 1
    size: str = "medium"
    pattern: str = "plain"


def pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    """One element of `options`, uniformly."""
    return options[int(rng.integers(len(options)))]


def position_name(obj: Obj) -> str:
    """The grid cell nearest to the object's centre."""
    return min(CELLS, key=lambda c: (CELLS[c][0] - obj.x) ** 2 + (CELLS[c][1] - obj.y) ** 2)


def place(groups: Sequence[Group], background: str, rng: np.random.Generator | None,
          move: float = 0.04) -> Scene:
    """Lay groups out on the grid: random cells and a small jitter, or fixed cells when rng is None."""
    n = sum(g.count for g in groups)
    if n > MAX_OBJECTS:
        raise ValueError(f"a scene holds at most {MAX_OBJECTS} objects, got {n}")
    if n == 1:
        cells: Sequence[str] = ("centre",)
    elif rng is None:
        cells = _QUADRANTS[:n]
    else:
        cells = [_QUADRANTS[i] for i in rng.permutation(len(_QUADRANTS))[:n]]
    objects, i = [], 0
    for g in groups:
        for _ in range(g.count):
            x, y = CELLS[cells[i]]
            if rng is not None:
                x, y = x + rng.uniform(-move, move), y + rng.uniform(-move, move)
            objects.append(Obj(g.shape, g.colour, g.size, g.pattern, float(x), float(y)))
            i += 1
    return Scene(background, tuple(objects))


def random_groups(rng: np.random.Generator, min_groups: int = 1, max_groups: int = 3,
                  max_count: int = 2) -> tuple[Group, ...]:
    """Groups of distinct (shape, colour), at most MAX_OBJECTS objects in all."""
    n_groups = int(rng.integers(min_groups, max_groups + 1))
    kinds: list[tuple[str, str]] = []
    while len(kinds) < n_groups:
        kind = (pick(rng, SHAPES), pick(rng, list(COLOURS)))
        if kind not in kinds:
            kinds.append(kind)
    groups, left = [], MAX_OBJECTS
    for i, (shape, colour) in enumerate(kinds):
        # Leave room for one object per remaining group.
        count = min(int(rng.integers(1, max_count + 1)), left - (n_groups - i - 1))
        left -= count
        groups.append(Group(shape, colour, count, pick(rng, list(OBJECT_SIZES)), pick(rng, PATTERNS)))
    return tuple(groups)


def random_scene(rng: np.random.Generator, min_groups: int = 1, max_groups: int = 3,
                 max_count: int = 2) -> Scene:
    """A random scene: a few groups of shapes on one of the backgrounds."""
    groups = random_groups(rng, min_groups, max_groups, max_count)
    return place(groups, pick(rng, list(BACKGROUNDS)), rng)


def groups_of(scene: Scene) -> tuple[Group, ...]:
    """The scene's objects grouped by (shape, colour), in drawing order."""
    found: dict[tuple[str, str], Group] = {}
    for o in scene.objects:
        key = (o.shape, o.colour)
        g = found.get(key)
        found[key] = replace(g, count=g.count + 1) if g else Group(o.shape, o.colour, 1, o.size, o.pattern)
    return tuple(found.values())


def scene_key(scene: Scene) -> tuple:
    """What a caption pins down: the background and how many of each (shape, colour)."""
    return (scene.background, tuple(sorted((g.shape, g.colour, g.count) for g in groups_of(scene))))


def scene_attrs(scene: Scene) -> dict:
    """The generating attributes stored in src_content: background, object count and each group
    with its grid positions (no coordinates: only what a text could say)."""
    return {
        "background": scene.background,
        "count": len(scene.objects),
        "groups": [{"shape": g.shape, "colour": g.colour, "count": g.count, "size": g.size,
                    "pattern": g.pattern, "positions": [position_name(o) for o in scene.objects
                                  if (o.shape, o.colour) == (g.shape, g.colour)]}
                   for g in groups_of(scene)],
    }


def jitter(scene: Scene, rng: np.random.Generator, move: float, tint: int, scale: float = 0.0) -> Scene:
    """Another view of the same scene: objects nudged and resized a little, lighting shifted."""
    objects = tuple(
        replace(o, x=float(np.clip(o.x + rng.uniform(-move, move), 0.12, 0.88)),
                y=float(np.clip(o.y + rng.uniform(-move, move), 0.12, 0.88)),
                scale=float(o.scale * (1 + rng.uniform(-scale, scale))))
        for o in scene.objects
    )
    shift = tuple(int(v) for v in rng.integers(-tint, tint + 1, size=3))
    return Scene(scene.background, objects, shift)  # type: ignore[arg-type]


def free_cell(scene: Scene, rng: np.random.Generator) -> tuple[float, float]:
    """The centre of a random quadrant that no object occupies."""
    taken = {position_name(o) for o in scene.objects}
    free = [c for c in _QUADRANTS if c not in taken]
    return CELLS[pick(rng, free)]


# ---------------------------------------------------------------------------------------------
# Garments (Fashion200K, FashionIQ)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Garment:
    """A product: near-identical garments differ in one of these fine-grained attributes."""

    kind: str
    colour: str
    shade: str
    pattern: str
    length: str

    def description(self) -> str:
        """Fashion200K-style product text, e.g. "dark blue striped long dress"."""
        return f"{self.shade} {self.colour} {self.pattern} {self.length} {self.kind}"

    def attrs(self) -> dict:
        return {"kind": self.kind, "colour": self.colour, "shade": self.shade,
                "pattern": self.pattern, "length": self.length}


GARMENT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "kind": GARMENTS, "colour": tuple(COLOURS), "shade": SHADES, "pattern": PATTERNS, "length": LENGTHS,
}


def random_garment(rng: np.random.Generator) -> Garment:
    return Garment(*(pick(rng, values) for values in GARMENT_ATTRIBUTES.values()))


def garment_scene(g: Garment, rng: np.random.Generator, move: float = 0.03) -> Scene:
    """A product photo: the garment centred on the studio backdrop, slightly off-centre and resized."""
    obj = Obj(g.kind, g.colour, "large", g.pattern, 0.5 + rng.uniform(-move, move),
              0.5 + rng.uniform(-move, move), float(1 + rng.uniform(-0.06, 0.06)), g.shade, g.length)
    return Scene(STUDIO, (obj,))


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

# Five points: the vertices alternate between the outer radius and 0.45 of it.
_STAR = tuple((float(np.sin(a) * r), float(-np.cos(a) * r))
              for a, r in zip(np.linspace(0, 2 * np.pi, 10, endpoint=False), (1.0, 0.45) * 5))
_POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)),
    "triangle": ((0.0, -1.0), (0.98, 0.8), (-0.98, 0.8)),
    "diamond": ((0.0, -1.0), (0.8, 0.0), (0.0, 1.0), (-0.8, 0.0)),
    "star": _STAR,
    "cross": ((-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1),
              (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)),
}


def _garment_polygon(kind: str, length: str) -> tuple[tuple[float, float], ...]:
    hem = 0.35 if length == "short" else 0.9  # where the garment ends, in [-1, 1]
    if kind == "shirt":
        return ((-0.3, -0.8), (0.3, -0.8), (0.8, -0.45), (0.62, -0.15), (0.42, -0.3), (0.42, hem),
                (-0.42, hem), (-0.42, -0.3), (-0.62, -0.15), (-0.8, -0.45))
    if kind == "dress":
        return ((-0.22, -0.85), (0.22, -0.85), (0.3, -0.3), (0.65, hem), (-0.65, hem), (-0.3, -0.3))
    if kind == "skirt":
        return ((-0.38, -0.55), (0.38, -0.55), (0.72, hem), (-0.72, hem))
    if kind == "trousers":
        return ((-0.45, -0.85), (0.45, -0.85), (0.5, hem), (0.08, hem), (0.0, -0.2), (-0.08, hem),
                (-0.5, hem))
    # jacket: long sleeves either way; length moves the hem
    return ((-0.3, -0.85), (0.3, -0.85), (0.9, -0.35), (0.9, 0.35), (0.64, 0.35), (0.5, -0.15),
            (0.5, hem), (-0.5, hem), (-0.5, -0.15), (-0.64, 0.35), (-0.9, 0.35), (-0.9, -0.35))


def _shift(rgb: tuple[int, int, int], tint: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + t)) for c, t in zip(rgb, tint))
    return (r, g, b)


def _object_rgb(obj: Obj) -> tuple[int, int, int]:
    r, g, b = COLOURS[obj.colour]
    if obj.shade == "light":  # mix with white
        return (r + (255 - r) * 45 // 100, g + (255 - g) * 45 // 100, b + (255 - b) * 45 // 100)
    if obj.shade == "dark":  # mix with black
        return (r * 55 // 100, g * 55 // 100, b * 55 // 100)
    return (r, g, b)


@lru_cache(maxsize=8)
def _pattern_mask(pattern: str, side: int) -> Image.Image:
    """Where a pattern paints its second colour: horizontal stripes or a grid of dots."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    period = side / 7  # still a few pixels per stripe at 32 px
    if pattern == "striped":
        for k in range(8):
            y0 = k * period
            draw.rectangle((0, y0, side, y0 + period * 0.4 - 1), fill=255)
    elif pattern == "dotted":
        r = side / 22
        for i in range(8):
            for j in range(8):
                cx, cy = (i + 0.5) * period, (j + 0.5) * period
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    return mask


@lru_cache(maxsize=4)
def _shading_mask(side: int) -> Image.Image:
    # A vertical ramp: the lower part of every background is a little darker (a ground).
    return Image.linear_gradient("L").resize((side, side)).point(lambda v: v * 70 // 255)


def _outline(obj: Obj, side: int) -> tuple[float, list[tuple[float, float]] | None]:
    """(radius, polygon in pixels); the polygon is None for a circle."""
    cx, cy = obj.x * side, obj.y * side
    if obj.shape in GARMENTS:
        r = _GARMENT_RADIUS * obj.scale * side
        return r, [(cx + u * r, cy + v * r) for u, v in _garment_polygon(obj.shape, obj.length)]
    r = OBJECT_SIZES[obj.size] * obj.scale * side
    return r, None if obj.shape == "circle" else [(cx + u * r, cy + v * r) for u, v in _POLYGONS[obj.shape]]


def _object_mask(obj: Obj, side: int) -> tuple[tuple[int, int, int, int], Image.Image]:
    """The object's bounding box on the canvas and its mask inside that box (pasting only the
    box is what keeps drawing fast)."""
    r, polygon = _outline(obj, side)
    cx, cy = obj.x * side, obj.y * side
    box = (max(0, int(cx - r) - 1), max(0, int(cy - r) - 1),
           min(side, int(cx + r) + 2), min(side, int(cy + r) + 2))
    mask = Image.new("L", (box[2] - box[0], box[3] - box[1]), 0)
    draw = ImageDraw.Draw(mask)
    if polygon is None:
        draw.ellipse((cx - r - box[0], cy - r - box[1], cx + r - box[0], cy + r - box[1]), fill=255)
    else:
        draw.polygon([(x - box[0], y - box[1]) for x, y in polygon], fill=255)
    return box, mask


def render(scene: Scene, px: int) -> Image.Image:
    """Draw a scene as a px x px RGB image (drawn at twice the size, then averaged down to anti-alias)."""
    side = px * 2 if px < 128 else px
    base = _STUDIO_RGB if scene.background == STUDIO else BACKGROUNDS[scene.background]
    canvas = Image.new("RGB", (side, side), _shift(base, scene.tint))
    ground = (base[0] * 3 // 5, base[1] * 3 // 5, base[2] * 3 // 5)
    canvas.paste(_shift(ground, scene.tint), mask=_shading_mask(side))
    for obj in scene.objects:
        box, mask = _object_mask(obj, side)
        rgb = _object_rgb(obj)
        canvas.paste(_shift(rgb, scene.tint), box=box, mask=mask)
        if obj.pattern != "plain":
            # Light marks on dark colours and dark marks on light ones.
            mark = (35, 35, 35) if sum(rgb) > 450 else (245, 245, 245)
            marks = ImageChops.multiply(mask, _pattern_mask(obj.pattern, side).crop(box))
            canvas.paste(_shift(mark, scene.tint), box=box, mask=marks)
        if obj.shape == "jacket":  # the opening down the front
            r = _GARMENT_RADIUS * obj.scale * side
            hem = 0.35 if obj.length == "short" else 0.9
            ImageDraw.Draw(canvas).line((obj.x * side, obj.y * side - 0.85 * r, obj.x * side,
                                         obj.y * side + hem * r), fill=(30, 30, 30), width=max(1, side // 64))
    return canvas.reduce(side // px) if side != px else canvas


def jpeg_bytes(scene: Scene, px: int) -> bytes:
    """The scene as JPEG bytes; fixed encoder settings, so the same scene gives the same bytes.

    4:2:0 chroma subsampling keeps colour at half resolution, which is still the full
    resolution of the 32 px tiny profile; optimised Huffman tables save a fifth of the bytes.
    """
    buf = io.BytesIO()
    render(scene, px).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=2, optimize=True)
    return buf.getvalue()


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
# The encyclopedia (WebQA, OVEN, InfoSeek)
# ---------------------------------------------------------------------------------------------

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
