"""The dataset builders: image <-> text, news, near-duplicates and knowledge.

Taught in notebook 00. One function per M-BEIR dataset (VisualNews, MSCOCO, Fashion200K, EDIS,
NIGHTS, WebQA, OVEN, InfoSeek; the composed ones are in `composed`) writes its pools, queries
and qrels for every split through the `_Writer`, each split from its own random stream. The
content is built to show the paper's phenomena with tiny models, e.g. text candidates that repeat
text queries (the modality lure of the global pool) and entities recognisable from their pictures.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from uniir_lite.data.synthetic.encyclopedia import (
    INFOSEEK_SLOTS, OVEN_QUESTIONS, WEBQA_IMAGE_SLOTS, WEBQA_TEXT_SLOTS, Entity, contains_word, entity_scene,
    infoseek_question, make_encyclopedia, oven_passage, webqa_caption, webqa_image_question, webqa_snippets,
    webqa_text_question, wiki_chunks,
)
from uniir_lite.data.synthetic.scenes import (
    COLOURS, GARMENT_ATTRIBUTES, Garment, Scene, garment_scene, jitter, pick, random_garment, random_scene,
    scene_attrs, scene_key,
)
from uniir_lite.data.synthetic.texts import (
    NewsEvent, coco_captions, edis_headline, edis_query, news_caption, random_event,
)
from uniir_lite.data.synthetic.writer import (
    _ENCYCLOPEDIA_STREAM, _EVAL_SPLITS, _distinct, _eval_splits, _in_random_order, _Writer,
)

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Image <-> text datasets: VisualNews, MSCOCO, Fashion200K
# ---------------------------------------------------------------------------------------------


def _visualnews(b: _Writer) -> None:
    """Tasks 0 and 3 over one set of news photos: the task-3 pool holds exactly the captions that
    task-0 queries use, so in the global pool a caption query meets itself as a text candidate."""
    ds, t0, t3 = "VisualNews", "visualnews_task0", "visualnews_task3"
    q, rng = b.size.eval_queries, b.rng(ds, "pool")
    items = []
    for scene in _distinct(max(b.size.pool_size, 4 * q), lambda: random_scene(rng), scene_key):
        caption = news_caption(scene, random_event(rng, scene.background))
        img = b.image(scene, ds, "pool")
        # Real VisualNews candidates carry no src_content key at all.
        items.append((caption, img, scene_attrs(scene),
                      b.candidate(ds, [b.local(t0)], img=img, src_key=False),
                      b.candidate(ds, [b.local(t3)], txt=caption, src_key=False)))
    q0 = list(_eval_splits(items, b.size.eval_queries))
    q3 = list(_eval_splits(items, b.size.eval_queries, offset=2 * q))
    for (split, (caption, _, src, img_did, _)), (_, (_, img, src3, _, txt_did)) in zip(q0, q3):
        b.query(ds, split, t0, 0, [img_did], txt=caption, src=src)
        b.query(ds, split, t3, 3, [txt_did], img=img, src=src3)
    rng = b.rng(ds, "train")
    for _ in range(b.size.train_large // 2):
        scene = random_scene(rng)
        caption, src = news_caption(scene, random_event(rng, scene.background)), scene_attrs(scene)
        img = b.image(scene, ds, "train")
        img_did = b.candidate(ds, [b.train_pool], img=img, src_key=False)
        txt_did = b.candidate(ds, [b.train_pool], txt=caption, src_key=False)
        b.query(ds, "train", t0, 0, [img_did], txt=caption, src=src)
        b.query(ds, "train", t3, 3, [txt_did], img=img, src=src)


def _mscoco(b: _Writer) -> None:
    """Five paraphrased captions per everyday scene; task-3 queries have all five as positives.
    Pools are split-specific, as MSCOCO's are in M-BEIR."""
    ds, t0, t3 = "MSCOCO", "mscoco_task0", "mscoco_task3"
    q = b.size.eval_queries
    for split in _EVAL_SPLITS:
        rng = b.rng(ds, split)
        images: dict[tuple, list[str]] = defaultdict(list)
        captions: dict[tuple, list[str]] = defaultdict(list)
        shots = []
        for scene in _distinct(max(b.size.pool_size // 2, 2 * q), lambda: random_scene(rng), scene_key):
            key, src, img = scene_key(scene), scene_attrs(scene), b.image(scene, ds, split)
            images[key].append(b.candidate(ds, [b.local(t0, split)], img=img, src=src))
            texts = coco_captions(scene, rng)
            captions[key] += [b.candidate(ds, [b.local(t3, split)], txt=t, src=src) for t in texts]
            shots.append((key, img, texts, src))
        for (key, _, texts, src), (key3, img, _, src3) in zip(shots[:q], shots[q:2 * q]):
            b.query(ds, split, t0, 0, images[key], txt=pick(rng, texts), src=src)
            b.query(ds, split, t3, 3, captions[key3], img=img, src=src3)
    rng = b.rng(ds, "train")
    for _ in range(b.size.train_large // 2):
        scene = random_scene(rng)
        src, img, texts = scene_attrs(scene), b.image(scene, ds, "train"), coco_captions(scene, rng)
        img_did = b.candidate(ds, [b.train_pool], img=img, src=src)
        txt_dids = [b.candidate(ds, [b.train_pool], txt=t, src=src) for t in texts]
        b.query(ds, "train", t0, 0, [img_did], txt=pick(rng, texts), src=src)
        b.query(ds, "train", t3, 3, txt_dids, img=img, src=src)


def _garment_families(rng: np.random.Generator, n: int) -> list[Garment]:
    """Products in families of near-identical items that differ in one attribute (fine-grained)."""
    out: list[Garment] = []
    seen: set[Garment] = set()
    while len(out) < n:
        family = _distinct(1, lambda: random_garment(rng), lambda g: g, seen)
        for _ in range(int(rng.integers(0, 3))):
            attr = pick(rng, ("colour", "shade", "pattern", "length"))
            value = pick(rng, [v for v in GARMENT_ATTRIBUTES[attr] if v != getattr(family[0], attr)])
            variant = replace(family[0], **{attr: value})
            if variant not in seen:
                seen.add(variant)
                family.append(variant)
        out += family
    return out[:n]


def _fashion200k(b: _Writer) -> None:
    """Product photos and descriptions; near-identical products differ in one attribute. As in
    Fashion200K, the text pool holds one description per distinct product."""
    ds, t0, t3 = "Fashion200K", "fashion200k_task0", "fashion200k_task3"
    q, rng = b.size.eval_queries, b.rng(ds, "pool")
    images: dict[Garment, list[str]] = defaultdict(list)
    texts: dict[Garment, str] = {}
    shots = []
    for g in _garment_families(rng, max(b.size.pool_size, 4 * q)):
        img = b.image(garment_scene(g, rng), ds, "pool")
        images[g].append(b.candidate(ds, [b.local(t0)], img=img, src=g.attrs()))
        if g not in texts:
            texts[g] = b.candidate(ds, [b.local(t3)], txt=g.description(), src=g.attrs())
        shots.append((g, img))
    # Queries draw from a shuffled pool, so a family's items do not all serve the same split.
    shots = [shots[i] for i in rng.permutation(len(shots))]
    for (split, (g, _)), (_, (g3, img)) in zip(_eval_splits(shots, q), _eval_splits(shots, q, offset=2 * q)):
        b.query(ds, split, t0, 0, images[g], txt=g.description(), src=g.attrs())
        b.query(ds, split, t3, 3, [texts[g3]], img=img, src=g3.attrs())
    rng = b.rng(ds, "train")
    for _ in range(b.size.train_small // 2):
        g = random_garment(rng)
        img = b.image(garment_scene(g, rng), ds, "train")
        img_did = b.candidate(ds, [b.train_pool], img=img, src=g.attrs())
        txt_did = b.candidate(ds, [b.train_pool], txt=g.description(), src=g.attrs())
        b.query(ds, "train", t0, 0, [img_did], txt=g.description(), src=g.attrs())
        b.query(ds, "train", t3, 3, [txt_did], img=img, src=g.attrs())


# ---------------------------------------------------------------------------------------------
# News and near-duplicates: EDIS, NIGHTS
# ---------------------------------------------------------------------------------------------


def _edis_story(rng: np.random.Generator, used: set) -> tuple[Scene, Scene, NewsEvent]:
    """A news photo, its twin (same layout and headline, other colours) and the event behind both."""
    for _ in range(50):
        scene = random_scene(rng)
        event = random_event(rng, scene.background)
        free = [col for col in COLOURS if col not in {o.colour for o in scene.objects}]
        offset = int(rng.integers(len(free)))
        recolour = {old: free[(i + offset) % len(free)]
                    for i, old in enumerate(dict.fromkeys(o.colour for o in scene.objects))}
        twin = replace(scene, objects=tuple(replace(o, colour=recolour[o.colour]) for o in scene.objects))
        keys = {(event, scene_key(scene)), (event, scene_key(twin))}
        if not keys & used:
            break
    used |= keys
    return scene, twin, event


def _edis(b: _Writer) -> None:
    """Headline -> (image, headline). Each positive has a twin with the very same headline and
    other colours, so the text of a candidate alone cannot decide: the image must."""
    ds, t2 = "EDIS", "edis_task2"

    def add(scene: Scene, event: NewsEvent, pool: Path, split: str) -> str:
        return b.candidate(ds, [pool], txt=edis_headline(scene, event), img=b.image(scene, ds, split),
                           src={"event": asdict(event), **scene_attrs(scene)})

    q, rng, used = b.size.eval_queries, b.rng(ds, "pool"), set()
    stories = []
    for _ in range(2 * q):
        scene, twin, event = _edis_story(rng, used)
        did, _ = _in_random_order(rng, [scene, twin], lambda s: add(s, event, b.local(t2), "pool"))
        stories.append((scene, event, did))
    for _ in range(max(0, b.size.pool_size - 4 * q)):
        scene, _, event = _edis_story(rng, used)
        add(scene, event, b.local(t2), "pool")
    for split, (scene, event, did) in _eval_splits(stories, q):
        b.query(ds, split, t2, 2, [did], txt=edis_query(scene, event, b.rng(ds, split)),
                src={"event": asdict(event), **scene_attrs(scene)})
    rng, used = b.rng(ds, "train"), set()
    for _ in range(b.size.train_small):
        scene, twin, event = _edis_story(rng, used)
        did, twin_did = _in_random_order(rng, [scene, twin], lambda s: add(s, event, b.train_pool, "train"))
        b.query(ds, "train", t2, 2, [did], txt=edis_query(scene, event, rng),
                src={"event": asdict(event), **scene_attrs(scene)}, neg=[twin_did])


def _nights_views(scene: Scene, rng: np.random.Generator) -> list[Scene]:
    """A near-duplicate (small nudge and colour shift) and a distractor that differs more."""
    return [jitter(scene, rng, move=0.015, tint=8, scale=0.04),
            jitter(scene, rng, move=0.1, tint=40, scale=0.25)]


def _nights(b: _Writer) -> None:
    """Image -> image: the reference's near-duplicate among its looser variant and other scenes."""
    ds, t4 = "NIGHTS", "nights_task4"

    def add(scene: Scene, pool: Path, split: str) -> str:
        return b.candidate(ds, [pool], img=b.image(scene, ds, split), src=scene_attrs(scene))

    q, rng = b.size.eval_queries, b.rng(ds, "pool")
    refs = []
    for _ in range(2 * q):
        ref = random_scene(rng)
        did, _ = _in_random_order(rng, _nights_views(ref, rng), lambda s: add(s, b.local(t4), "pool"))
        refs.append((ref, did))
    for _ in range(max(0, b.size.pool_size - 4 * q)):
        add(random_scene(rng), b.local(t4), "pool")
    for split, (ref, did) in _eval_splits(refs, q):
        b.query(ds, split, t4, 4, [did], img=b.image(ref, ds, split), src=scene_attrs(ref))
    rng = b.rng(ds, "train")
    for _ in range(b.size.train_small):
        ref = random_scene(rng)
        did, far_did = _in_random_order(rng, _nights_views(ref, rng), lambda s: add(s, b.train_pool, "train"))
        b.query(ds, "train", t4, 4, [did], img=b.image(ref, ds, "train"), src=scene_attrs(ref),
                neg=[far_did])


# ---------------------------------------------------------------------------------------------
# Knowledge: WebQA, OVEN, InfoSeek over one encyclopedia
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Wiki:
    entities: list[Entity]
    images: list[str]  # each entity's canonical picture, shared by OVEN and InfoSeek pools


def _wiki(b: _Writer) -> _Wiki:
    entities = make_encyclopedia(b.size.entities, np.random.default_rng([b.seed, _ENCYCLOPEDIA_STREAM]))
    images = [b.image(entity_scene(e, None), "OVEN", "wikipedia_images_full", name=e.entity_id)
              for e in entities]
    return _Wiki(entities, images)


def _split_keys(keys: list[T], rng: np.random.Generator, q: int, n_train: int) -> dict[str, list[T]]:
    """Disjoint question keys per split (test first, then val, train the rest), cycled if too few."""
    keys = [keys[i] for i in rng.permutation(len(keys))]
    parts = {"test": keys[:q], "val": keys[q:2 * q], "train": keys[2 * q:] or keys}
    wanted = {"test": q, "val": q, "train": n_train}
    return {s: [part[i % len(part)] for i in range(wanted[s])] for s, part in parts.items()}


def _webqa(b: _Writer, wiki: _Wiki) -> None:
    """Task 1: question -> web snippet; task 2: question -> entity picture with its caption. The
    pools are the same for every split (as a web corpus is); the questions of each split differ."""
    ds, t1, t2 = "WebQA", "webqa_task1", "webqa_task2"
    q, rng, ents = b.size.eval_queries, b.rng(ds, "pool"), wiki.entities
    pools1, pools2 = [b.local(t1), b.train_pool], [b.local(t2), b.train_pool]
    snippets = [[(t, b.candidate(ds, pools1, txt=t, src={"entity_id": e.entity_id}))
                 for t in webqa_snippets(e)] for e in ents]
    pictures = [b.candidate(ds, pools2, txt=webqa_caption(e), src=e.attrs(),
                            img=b.image(entity_scene(e, rng), ds, "pool")) for e in ents]
    n_train = b.size.train_small // 2
    text_keys = _split_keys([(i, s) for i in range(len(ents)) for s in WEBQA_TEXT_SLOTS], rng, q, n_train)
    image_keys = _split_keys([(i, s) for i in range(len(ents)) for s in WEBQA_IMAGE_SLOTS], rng, q, n_train)
    for split in (*_EVAL_SPLITS, "train"):
        qrng = b.rng(ds, split)
        for (i, slot), (j, slot2) in zip(text_keys[split], image_keys[split]):
            e, answer = ents[i], ents[i].answer(slot)
            pos = [did for text, did in snippets[i] if contains_word(text, answer)]
            b.query(ds, split, t1, 1, pos, txt=webqa_text_question(e, slot, qrng),
                    src={"entity_id": e.entity_id, "question_type": slot, "answer": answer})
            e = ents[j]
            b.query(ds, split, t2, 2, [pictures[j]], txt=webqa_image_question(e, slot2),
                    src={"entity_id": e.entity_id, "question_type": slot2, "answer": e.answer(slot2)})


def _oven(b: _Writer, wiki: _Wiki) -> None:
    """(photo, "what is this?") -> the entity's article (task 6) or its picture and article (task 8).
    Query photos are noisy views of the entity's signature; the article describes that signature."""
    ds = "OVEN"
    ents = wiki.entities
    pools = {
        6: [b.candidate(ds, [b.local("oven_task6"), b.train_pool], txt=oven_passage(e),
                        src={"wikidata_id": e.entity_id, "wikipedia_title": e.title}) for e in ents],
        8: [b.candidate(ds, [b.local("oven_task8"), b.train_pool], txt=oven_passage(e), img=img,
                        src={"wikidata_id": e.entity_id, "wikipedia_title": e.title})
            for e, img in zip(ents, wiki.images)],
    }
    for split in (*_EVAL_SPLITS, "train"):
        rng = b.rng(ds, split)
        for _ in range(b.size.eval_queries if split != "train" else b.size.train_large // 2):
            for task, dids in pools.items():
                i = int(rng.integers(len(ents)))
                e = ents[i]
                b.query(ds, split, f"oven_task{task}", task, [dids[i]],
                        txt=pick(rng, OVEN_QUESTIONS).format(k=e.kind),
                        img=b.image(entity_scene(e, rng), ds, split),
                        src={**e.attrs(), "data_split": split})


def _infoseek(b: _Writer, wiki: _Wiki) -> None:
    """(photo, question about one attribute) -> article chunks. Chunks that contain the answer are
    positives (often two), the entity's other chunks are its hard negatives, as in M-BEIR."""
    ds = "INFOSEEK"
    ents = wiki.entities
    chunks: dict[int, list[list[tuple[str, str]]]] = {6: [], 8: []}
    for e, img in zip(ents, wiki.images):
        texts = [f"{e.title}. {chunk}" for chunk in wiki_chunks(e)]
        src = {"wikidata_id": e.entity_id, "wikipedia_title": e.title}
        for task, image in ((6, None), (8, img)):
            pools = [b.local(f"infoseek_task{task}"), b.train_pool]
            chunks[task].append([(t, b.candidate(ds, pools, txt=t, img=image, src=src)) for t in texts])
    for split in (*_EVAL_SPLITS, "train"):
        rng = b.rng(ds, split)
        for _ in range(b.size.eval_queries if split != "train" else b.size.train_large // 2):
            for task, per_entity in chunks.items():
                i, slot = int(rng.integers(len(ents))), pick(rng, INFOSEEK_SLOTS)
                e, answer = ents[i], ents[i].answer(slot)
                pos = [did for text, did in per_entity[i] if contains_word(text, answer)]
                neg = [did for text, did in per_entity[i] if not contains_word(text, answer)]
                src = {"entity_id": e.entity_id, "answer": answer, "answer_eval": [answer],
                       "question_type": slot, "data_split": split}
                b.query(ds, split, f"infoseek_task{task}", task, pos, txt=infoseek_question(e, slot, rng),
                        img=b.image(entity_scene(e, rng), ds, split), src=src, neg=neg)
