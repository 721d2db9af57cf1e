"""The composed-retrieval builders: FashionIQ and CIRR, (reference image, modification text) -> target.

Taught in notebook 00. Each query needs both its image and its text: the pool holds a near copy
of the reference (the image-only answer) and a candidate that carries the requested change on
something else (the text-only answer), next to the true target.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from uniir_lite.data.synthetic.scenes import (
    BACKGROUNDS, COLOURS, GARMENT_ATTRIBUTES, GARMENTS, MAX_OBJECTS, OBJECT_SIZES, PATTERNS, SHAPES, Garment,
    Group, Obj, Scene, free_cell, garment_scene, groups_of, jitter, pick, place, random_garment, random_groups,
    random_scene, scene_attrs, scene_key,
)
from uniir_lite.data.synthetic.texts import garment_edit_text, scene_edit_text
from uniir_lite.data.synthetic.writer import _eval_splits, _in_random_order, _Writer

_GarmentEdit = tuple[Garment, list[tuple[str, str]], Garment, Garment]


def _garment_edit(rng: np.random.Generator, used: set) -> _GarmentEdit:
    """Reference, changes, target, and a lure that carries the same changes on another kind of garment."""
    for _ in range(50):
        ref = random_garment(rng)
        attrs = rng.choice(["colour", "pattern", "shade", "length"], size=int(rng.integers(1, 3)),
                           replace=False)
        changes = [(str(a), pick(rng, [v for v in GARMENT_ATTRIBUTES[a] if v != getattr(ref, a)]))
                   for a in attrs]
        target = replace(ref, **dict(changes))
        lure = replace(random_garment(rng), **dict(changes))
        if lure.kind == ref.kind:
            lure = replace(lure, kind=pick(rng, [k for k in GARMENTS if k != ref.kind]))
        if not {ref, target, lure} & used:
            break
    used |= {ref, target, lure}
    return ref, changes, target, lure


def _fashioniq(b: _Writer) -> None:
    """(reference garment, "make it red with stripes") -> target. The pool holds a near copy of the
    reference (the image-only answer) and the same changes on another garment (the text-only answer)."""
    ds, t7 = "FashionIQ", "fashioniq_task7"
    q = b.size.eval_queries
    by_garment: dict[Garment, list[str]] = defaultdict(list)

    def add(g: Garment, pool: Path, split: str, rng: np.random.Generator) -> str:
        did = b.candidate(ds, [pool], img=b.image(garment_scene(g, rng), ds, split), src=g.attrs())
        by_garment[g].append(did)
        return did

    rng, used = b.rng(ds, "pool"), set()
    edits = []
    for _ in range(2 * q):
        ref, changes, target, lure = _garment_edit(rng, used)
        _in_random_order(rng, [ref, target, lure], lambda g: add(g, b.local(t7), "pool", rng))
        edits.append((ref, changes, target))
    for _ in range(max(0, b.size.pool_size - 6 * q)):
        add(random_garment(rng), b.local(t7), "pool", rng)
    for split, (ref, changes, target) in _eval_splits(edits, q):
        qrng = b.rng(ds, split)
        b.query(ds, split, t7, 7, by_garment[target], txt=garment_edit_text(changes, qrng),
                img=b.image(garment_scene(ref, qrng), ds, split),
                src={"reference": ref.attrs(), "changes": dict(changes), "target": target.attrs()})
    rng, used = b.rng(ds, "train"), set()
    for _ in range(b.size.train_small):
        ref, changes, target, lure = _garment_edit(rng, used)
        near, target_did, lure_did = _in_random_order(rng, [ref, target, lure],
                                                      lambda g: add(g, b.train_pool, "train", rng))
        b.query(ds, "train", t7, 7, [target_did], txt=garment_edit_text(changes, rng),
                img=b.image(garment_scene(ref, rng), ds, "train"),
                src={"reference": ref.attrs(), "changes": dict(changes), "target": target.attrs()},
                neg=[near, lure_did])


def _group_attrs(g: Group | None) -> dict | None:
    return None if g is None else {"shape": g.shape, "colour": g.colour}


def _scene_edit(rng: np.random.Generator) -> tuple[Scene, dict, Scene, Scene, str]:
    """Reference, edit, target (the reference edited, same layout), a lure that matches the text
    but not the image, and the modification text."""
    ref = random_scene(rng, min_groups=2, max_groups=3, max_count=1)
    groups = groups_of(ref)
    kinds = {(g.shape, g.colour) for g in groups}
    ops = ["remove", "recolour", "reshape", "background"]
    if len(ref.objects) < MAX_OBJECTS:
        ops.append("add")
    op, old, new, bg = pick(rng, ops), pick(rng, groups), None, ref.background
    objects = list(ref.objects)
    if op == "add":
        old = None
        new = pick(rng, [Group(s, col, 1, pick(rng, list(OBJECT_SIZES)), pick(rng, PATTERNS))
                           for s in SHAPES for col in COLOURS if (s, col) not in kinds])
        x, y = free_cell(ref, rng)
        objects.append(Obj(new.shape, new.colour, new.size, new.pattern, x, y))
    elif op == "remove":
        objects = [o for o in objects if (o.shape, o.colour) != (old.shape, old.colour)]
    elif op in ("recolour", "reshape"):
        if op == "recolour":
            options = [Group(old.shape, col) for col in COLOURS if (old.shape, col) not in kinds]
        else:
            options = [Group(s, old.colour) for s in SHAPES if (s, old.colour) not in kinds]
        new = pick(rng, options)
        edited = (old.shape, old.colour)
        objects = [replace(o, shape=new.shape, colour=new.colour) if (o.shape, o.colour) == edited else o
                   for o in objects]
    else:
        bg = pick(rng, [x for x in BACKGROUNDS if x != ref.background])
    target = Scene(bg, tuple(objects))
    if op == "remove":  # the same remaining shapes elsewhere: only the image tells them apart
        lure = place(groups_of(target), pick(rng, [x for x in BACKGROUNDS if x != bg]), rng)
    else:  # another scene that also has what the text asks for
        lure_groups = [g for g in random_groups(rng, 1, 2, 1)
                       if new is None or (g.shape, g.colour) != (new.shape, new.colour)]
        if new is not None:
            lure_groups.append(replace(new, size=pick(rng, list(OBJECT_SIZES))))
        lure = place(lure_groups, bg if op == "background" else pick(rng, list(BACKGROUNDS)), rng)
    edit = {"op": op, "old": _group_attrs(old), "new": _group_attrs(new), "background": bg}
    return ref, edit, target, lure, scene_edit_text(op, old, new, bg, rng)


def _fresh_scene_edit(rng: np.random.Generator, used: set) -> tuple[Scene, dict, Scene, Scene, str]:
    """A scene edit whose reference, target and lure are new to the pool (so positives are exact)."""
    for _ in range(50):
        edit = _scene_edit(rng)
        keys = {scene_key(s) for s in (edit[0], edit[2], edit[3])}
        if len(keys) == 3 and not keys & used:
            break
    used |= keys
    return edit


def _cirr(b: _Writer) -> None:
    """(reference scene, "add a blue triangle") -> target. A near copy of the reference is the
    image-only answer, another scene with a blue triangle the text-only answer."""
    ds, t7 = "CIRR", "cirr_task7"
    q = b.size.eval_queries
    by_key: dict[tuple, list[str]] = defaultdict(list)

    def add(scene: Scene, pool: Path, split: str) -> str:
        did = b.candidate(ds, [pool], img=b.image(scene, ds, split), src=scene_attrs(scene))
        by_key[scene_key(scene)].append(did)
        return did

    rng, used = b.rng(ds, "pool"), set()
    edits = []
    for _ in range(2 * q):
        ref, edit, target, lure, text = _fresh_scene_edit(rng, used)
        near_copy = jitter(ref, rng, move=0.02, tint=4)
        _in_random_order(rng, [near_copy, target, lure], lambda s: add(s, b.local(t7), "pool"))
        edits.append((ref, edit, target, text))
    for _ in range(max(0, b.size.pool_size - 6 * q)):
        add(random_scene(rng, max_count=1), b.local(t7), "pool")
    for split, (ref, edit, target, text) in _eval_splits(edits, q):
        b.query(ds, split, t7, 7, by_key[scene_key(target)], txt=text, img=b.image(ref, ds, split),
                src={"reference": scene_attrs(ref), "edit": edit, "target": scene_attrs(target)})
    rng, used = b.rng(ds, "train"), set()
    for _ in range(b.size.train_small):
        ref, edit, target, lure, text = _fresh_scene_edit(rng, used)
        near_copy = jitter(ref, rng, move=0.02, tint=4)
        near, target_did, lure_did = _in_random_order(rng, [near_copy, target, lure],
                                                      lambda s: add(s, b.train_pool, "train"))
        b.query(ds, "train", t7, 7, [target_did], txt=text, img=b.image(ref, ds, "train"),
                src={"reference": scene_attrs(ref), "edit": edit, "target": scene_attrs(target)},
                neg=[near, lure_did])
