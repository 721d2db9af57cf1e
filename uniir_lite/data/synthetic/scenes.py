"""Procedural images: the visual primitives, scenes and garments built from them, and their drawing.

Taught in notebook 00. Every image of the synthetic benchmark is built from a few visual
primitives (shape, colour, size, pattern, position, count, background), laid out as a `Scene`,
and drawn by `render` / `jpeg_bytes` with fixed settings, so the same scene gives the same bytes.
Nothing here owns random state: each function that draws takes a `numpy.random.Generator`.
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
