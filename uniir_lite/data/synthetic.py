"""The synthetic benchmark: ten M-BEIR-like datasets written in the exact M-BEIR layout.

Taught in notebook 00. `write_benchmark` draws every image and text (`synthetic_content`) and
writes queries, local and global candidate pools, qrels, instructions and images with M-BEIR's
names and record format, so the readers of `mbeir` serve both. Each dataset plays the role of its
M-BEIR namesake (same dataset id, same tasks), and the content is built to show the paper's
phenomena with tiny models: text candidates that repeat or paraphrase text queries (the modality
lure of the global pool), composed queries that need both image and text, entities recognisable
from their pictures for the knowledge tasks, and one shared visual and verbal vocabulary so
training on some datasets partly transfers to held-out ones.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from uniir_lite.data import synthetic_content as c
from uniir_lite.io import AtomicFile, atomic_open, write_text_atomic
from uniir_lite.data.mbeir import (
    DATASET_IDS, DATASET_NAMES, DATASET_STEMS, EVAL_PAIRS, TASKS, PathLike,
    global_pool_path, instructions_path, local_pool_path, qrels_path, query_path, union_train_path,
    write_instructions,
)

GENERATOR = "uniir_lite.data.synthetic"
GENERATOR_VERSION = 1
MANIFEST = "synthetic.json"
# What write_benchmark owns inside its directory (and may delete to regenerate).
_OUTPUTS = ("query", "cand_pool", "qrels", "instructions", "mbeir_images")


@dataclass(frozen=True)
class SynthSize:
    """How big the benchmark is (notebook 00 prints it). Local pools grow beyond `pool_size` when
    their positives need it."""

    name: str
    eval_queries: int  # queries per pair in each of val and test
    pool_size: int     # candidates per local pool, at least
    train_large: int   # training queries of VisualNews, MSCOCO, OVEN and InfoSeek
    train_small: int   # training queries of Fashion200K, WebQA, EDIS, NIGHTS, FashionIQ and CIRR
    upsample: int      # how often the union training file repeats each UPSAMPLED dataset
    entities: int      # named entities of the encyclopedia behind WebQA, OVEN and InfoSeek


SIZES: dict[str, SynthSize] = {
    "tiny": SynthSize("tiny", eval_queries=50, pool_size=250, train_large=600, train_small=200,
                      upsample=2, entities=80),
    "small": SynthSize("small", eval_queries=250, pool_size=1250, train_large=3000, train_small=1000,
                       upsample=2, entities=400),
    "gpu": SynthSize("gpu", eval_queries=1000, pool_size=5000, train_large=24000, train_small=8000,
                     upsample=3, entities=2000),
}
# As UniIR's datasets_info: the small datasets are upsampled in the union training file.
UPSAMPLED = ("WebQA", "EDIS", "NIGHTS", "FashionIQ", "CIRR")
# One random stream per (dataset, stream), so changing one split never changes another; the
# encyclopedia and the union file's shuffle have streams of their own.
_STREAMS = {"train": 0, "val": 1, "test": 2, "pool": 3}
_ENCYCLOPEDIA_STREAM, _UNION_STREAM = 99, 98
_EVAL_SPLITS = ("val", "test")
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Writing: atomic files, id counters, images
# ---------------------------------------------------------------------------------------------


def _modality(txt: str | None, img: str | None) -> str:
    return "image,text" if txt and img else "image" if img else "text"


class _Writer:
    """Streams one benchmark to disk: records go out as they are made, files commit per dataset."""

    def __init__(self, root: Path, size: SynthSize, seed: int, px: int) -> None:
        self.root, self.size, self.seed, self.px = root, size, seed, px
        self.files: dict[Path, AtomicFile] = {}
        self.lines: dict[str, int] = {}  # relative path -> lines, for the manifest
        self.images = 0
        self._dids: Counter[str] = Counter()
        self._qids: Counter[tuple[str, str]] = Counter()
        self._numbers: Counter[str] = Counter()
        self._dirs: set[Path] = set()

    def rng(self, dataset: str, stream: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, DATASET_IDS[dataset], _STREAMS[stream]])

    def local(self, pair: str, split: str = "test") -> Path:
        return local_pool_path(self.root, pair, split)

    @property
    def train_pool(self) -> Path:
        return global_pool_path(self.root, "train")

    def _write(self, path: Path, line: str) -> None:
        if path not in self.files:
            self.files[path] = AtomicFile(path)
        self.files[path].writeline(line)

    def commit(self, keep: Iterable[Path] = ()) -> None:
        for path in [p for p in self.files if p not in set(keep)]:
            f = self.files.pop(path)
            f.commit()
            self.lines[path.relative_to(self.root).as_posix()] = f.lines

    def discard(self) -> None:
        for f in self.files.values():
            f.discard()
        self.files.clear()

    def image(self, scene: c.Scene, dataset: str, split: str, name: str | None = None) -> str:
        """Write one JPEG atomically; returns its path relative to the root, as M-BEIR records it."""
        # Real M-BEIR keeps InfoSeek's photos among OVEN's.
        folder = f"{DATASET_STEMS[dataset]}_images/{split}"
        if dataset == "INFOSEEK":
            folder = f"oven_images/infoseek_{split}"
        if name is None:
            self._numbers[folder] += 1
            name = f"{self._numbers[folder]:06d}"
        rel = f"mbeir_images/{folder}/{name}.jpg"
        path = self.root / rel
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        with atomic_open(path, "wb") as f:
            f.write(c.jpeg_bytes(scene, self.px))
        self.images += 1
        return rel

    def candidate(self, dataset: str, pools: Sequence[Path], txt: str | None = None, img: str | None = None,
                  src: dict | None = None, src_key: bool = True) -> str:
        """Write one candidate into each of `pools`; returns its did (one number space per dataset)."""
        self._dids[dataset] += 1
        did = f"{DATASET_IDS[dataset]}:{self._dids[dataset]}"
        record: dict = {"did": did, "txt": txt, "img_path": img, "modality": _modality(txt, img)}
        if src_key:
            record["src_content"] = None if src is None else json.dumps(src)
        line = json.dumps(record)
        for pool in pools:
            self._write(pool, line)
        return did

    def query(self, dataset: str, split: str, pair: str, task_id: int, pos: Sequence[str],
              txt: str | None = None, img: str | None = None, src: dict | None = None,
              neg: Sequence[str] = ()) -> str:
        """Write one query and its qrels; qids count per (dataset, split) across the task files."""
        if not pos:
            raise RuntimeError(f"a {pair} {split} query was generated without a positive")
        self._qids[dataset, split] += 1
        qid = f"{DATASET_IDS[dataset]}:{self._qids[dataset, split]}"
        record = {"qid": qid, "query_txt": txt, "query_img_path": img, "query_modality": _modality(txt, img),
                  "query_src_content": None if src is None else json.dumps(src),
                  "pos_cand_list": list(pos), "neg_cand_list": list(neg), "task_id": task_id}
        name = DATASET_STEMS[dataset] if split == "train" else pair  # train files are per dataset
        self._write(query_path(self.root, split, name), json.dumps(record))
        for did in pos:
            self._write(qrels_path(self.root, split, name), f"{qid} 0 {did} 1 {task_id}")
        return qid


def _distinct(n: int, draw: Callable[[], T], key: Callable[[T], Hashable], used: set | None = None,
              tries: int = 50) -> list[T]:
    """`n` draws with different keys, like a real pool; a key repeats only once draws keep colliding."""
    used = set() if used is None else used
    out: list[T] = []
    while len(out) < n:
        for _ in range(tries):
            item = draw()
            if key(item) not in used:
                break
        used.add(key(item))
        out.append(item)
    return out


def _eval_splits(items: Sequence[T], q: int, offset: int = 0) -> Iterable[tuple[str, T]]:
    """(split, item): items[offset:offset+q] are val queries, the next q test queries."""
    for k, split in enumerate(_EVAL_SPLITS):
        for item in items[offset + k * q: offset + (k + 1) * q]:
            yield split, item


# ---------------------------------------------------------------------------------------------
# Image <-> text datasets: VisualNews, MSCOCO, Fashion200K
# ---------------------------------------------------------------------------------------------


def _visualnews(b: _Writer) -> None:
    """Tasks 0 and 3 over one set of news photos: the task-3 pool holds exactly the captions that
    task-0 queries use, so in the global pool a caption query meets itself as a text candidate."""
    ds, t0, t3 = "VisualNews", "visualnews_task0", "visualnews_task3"
    q, rng = b.size.eval_queries, b.rng(ds, "pool")
    items = []
    for scene in _distinct(max(b.size.pool_size, 4 * q), lambda: c.random_scene(rng), c.scene_key):
        caption = c.news_caption(scene, c.random_event(rng, scene.background))
        img = b.image(scene, ds, "pool")
        # Real VisualNews candidates carry no src_content key at all.
        items.append((caption, img, c.scene_attrs(scene),
                      b.candidate(ds, [b.local(t0)], img=img, src_key=False),
                      b.candidate(ds, [b.local(t3)], txt=caption, src_key=False)))
    q0 = list(_eval_splits(items, b.size.eval_queries))
    q3 = list(_eval_splits(items, b.size.eval_queries, offset=2 * q))
    for (split, (caption, _, src, img_did, _)), (_, (_, img, src3, _, txt_did)) in zip(q0, q3):
        b.query(ds, split, t0, 0, [img_did], txt=caption, src=src)
        b.query(ds, split, t3, 3, [txt_did], img=img, src=src3)
    rng = b.rng(ds, "train")
    for _ in range(b.size.train_large // 2):
        scene = c.random_scene(rng)
        caption, src = c.news_caption(scene, c.random_event(rng, scene.background)), c.scene_attrs(scene)
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
        for scene in _distinct(max(b.size.pool_size // 2, 2 * q), lambda: c.random_scene(rng), c.scene_key):
            key, src, img = c.scene_key(scene), c.scene_attrs(scene), b.image(scene, ds, split)
            images[key].append(b.candidate(ds, [b.local(t0, split)], img=img, src=src))
            texts = c.coco_captions(scene, rng)
            captions[key] += [b.candidate(ds, [b.local(t3, split)], txt=t, src=src) for t in texts]
            shots.append((key, img, texts, src))
        for (key, _, texts, src), (key3, img, _, src3) in zip(shots[:q], shots[q:2 * q]):
            b.query(ds, split, t0, 0, images[key], txt=c.pick(rng, texts), src=src)
            b.query(ds, split, t3, 3, captions[key3], img=img, src=src3)
    rng = b.rng(ds, "train")
    for _ in range(b.size.train_large // 2):
        scene = c.random_scene(rng)
        src, img, texts = c.scene_attrs(scene), b.image(scene, ds, "train"), c.coco_captions(scene, rng)
        img_did = b.candidate(ds, [b.train_pool], img=img, src=src)
        txt_dids = [b.candidate(ds, [b.train_pool], txt=t, src=src) for t in texts]
        b.query(ds, "train", t0, 0, [img_did], txt=c.pick(rng, texts), src=src)
        b.query(ds, "train", t3, 3, txt_dids, img=img, src=src)


def _garment_families(rng: np.random.Generator, n: int) -> list[c.Garment]:
    """Products in families of near-identical items that differ in one attribute (fine-grained)."""
    out: list[c.Garment] = []
    seen: set[c.Garment] = set()
    while len(out) < n:
        family = _distinct(1, lambda: c.random_garment(rng), lambda g: g, seen)
        for _ in range(int(rng.integers(0, 3))):
            attr = c.pick(rng, ("colour", "shade", "pattern", "length"))
            value = c.pick(rng, [v for v in c.GARMENT_ATTRIBUTES[attr] if v != getattr(family[0], attr)])
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
    images: dict[c.Garment, list[str]] = defaultdict(list)
    texts: dict[c.Garment, str] = {}
    shots = []
    for g in _garment_families(rng, max(b.size.pool_size, 4 * q)):
        img = b.image(c.garment_scene(g, rng), ds, "pool")
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
        g = c.random_garment(rng)
        img = b.image(c.garment_scene(g, rng), ds, "train")
        img_did = b.candidate(ds, [b.train_pool], img=img, src=g.attrs())
        txt_did = b.candidate(ds, [b.train_pool], txt=g.description(), src=g.attrs())
        b.query(ds, "train", t0, 0, [img_did], txt=g.description(), src=g.attrs())
        b.query(ds, "train", t3, 3, [txt_did], img=img, src=g.attrs())


# ---------------------------------------------------------------------------------------------
# News and near-duplicates: EDIS, NIGHTS
# ---------------------------------------------------------------------------------------------


def _edis_story(rng: np.random.Generator, used: set) -> tuple[c.Scene, c.Scene, c.NewsEvent]:
    """A news photo, its twin (same layout and headline, other colours) and the event behind both."""
    for _ in range(50):
        scene = c.random_scene(rng)
        event = c.random_event(rng, scene.background)
        free = [col for col in c.COLOURS if col not in {o.colour for o in scene.objects}]
        offset = int(rng.integers(len(free)))
        recolour = {old: free[(i + offset) % len(free)]
                    for i, old in enumerate(dict.fromkeys(o.colour for o in scene.objects))}
        twin = replace(scene, objects=tuple(replace(o, colour=recolour[o.colour]) for o in scene.objects))
        keys = {(event, c.scene_key(scene)), (event, c.scene_key(twin))}
        if not keys & used:
            break
    used |= keys
    return scene, twin, event


def _in_random_order(rng: np.random.Generator, items: Sequence[T], write: Callable[[T], str]) -> list[str]:
    """Write related candidates in a random order, so a pool's order never tells which one is the
    answer; returns their dids in the order given."""
    dids = [""] * len(items)
    for i in rng.permutation(len(items)):
        dids[i] = write(items[i])
    return dids


def _edis(b: _Writer) -> None:
    """Headline -> (image, headline). Each positive has a twin with the very same headline and
    other colours, so the text of a candidate alone cannot decide: the image must."""
    ds, t2 = "EDIS", "edis_task2"

    def add(scene: c.Scene, event: c.NewsEvent, pool: Path, split: str) -> str:
        return b.candidate(ds, [pool], txt=c.edis_headline(scene, event), img=b.image(scene, ds, split),
                           src={"event": asdict(event), **c.scene_attrs(scene)})

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
        b.query(ds, split, t2, 2, [did], txt=c.edis_query(scene, event, b.rng(ds, split)),
                src={"event": asdict(event), **c.scene_attrs(scene)})
    rng, used = b.rng(ds, "train"), set()
    for _ in range(b.size.train_small):
        scene, twin, event = _edis_story(rng, used)
        did, twin_did = _in_random_order(rng, [scene, twin], lambda s: add(s, event, b.train_pool, "train"))
        b.query(ds, "train", t2, 2, [did], txt=c.edis_query(scene, event, rng),
                src={"event": asdict(event), **c.scene_attrs(scene)}, neg=[twin_did])


def _nights_views(scene: c.Scene, rng: np.random.Generator) -> list[c.Scene]:
    """A near-duplicate (small nudge and colour shift) and a distractor that differs more."""
    return [c.jitter(scene, rng, move=0.015, tint=8, scale=0.04),
            c.jitter(scene, rng, move=0.1, tint=40, scale=0.25)]


def _nights(b: _Writer) -> None:
    """Image -> image: the reference's near-duplicate among its looser variant and other scenes."""
    ds, t4 = "NIGHTS", "nights_task4"

    def add(scene: c.Scene, pool: Path, split: str) -> str:
        return b.candidate(ds, [pool], img=b.image(scene, ds, split), src=c.scene_attrs(scene))

    q, rng = b.size.eval_queries, b.rng(ds, "pool")
    refs = []
    for _ in range(2 * q):
        ref = c.random_scene(rng)
        did, _ = _in_random_order(rng, _nights_views(ref, rng), lambda s: add(s, b.local(t4), "pool"))
        refs.append((ref, did))
    for _ in range(max(0, b.size.pool_size - 4 * q)):
        add(c.random_scene(rng), b.local(t4), "pool")
    for split, (ref, did) in _eval_splits(refs, q):
        b.query(ds, split, t4, 4, [did], img=b.image(ref, ds, split), src=c.scene_attrs(ref))
    rng = b.rng(ds, "train")
    for _ in range(b.size.train_small):
        ref = c.random_scene(rng)
        did, far_did = _in_random_order(rng, _nights_views(ref, rng), lambda s: add(s, b.train_pool, "train"))
        b.query(ds, "train", t4, 4, [did], img=b.image(ref, ds, "train"), src=c.scene_attrs(ref),
                neg=[far_did])


# ---------------------------------------------------------------------------------------------
# Knowledge: WebQA, OVEN, InfoSeek over one encyclopedia
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Wiki:
    entities: list[c.Entity]
    images: list[str]  # each entity's canonical picture, shared by OVEN and InfoSeek pools


def _wiki(b: _Writer) -> _Wiki:
    entities = c.make_encyclopedia(b.size.entities, np.random.default_rng([b.seed, _ENCYCLOPEDIA_STREAM]))
    images = [b.image(c.entity_scene(e, None), "OVEN", "wikipedia_images_full", name=e.entity_id)
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
                 for t in c.webqa_snippets(e)] for e in ents]
    pictures = [b.candidate(ds, pools2, txt=c.webqa_caption(e), src=e.attrs(),
                            img=b.image(c.entity_scene(e, rng), ds, "pool")) for e in ents]
    n_train = b.size.train_small // 2
    text_keys = _split_keys([(i, s) for i in range(len(ents)) for s in c.WEBQA_TEXT_SLOTS], rng, q, n_train)
    image_keys = _split_keys([(i, s) for i in range(len(ents)) for s in c.WEBQA_IMAGE_SLOTS], rng, q, n_train)
    for split in (*_EVAL_SPLITS, "train"):
        qrng = b.rng(ds, split)
        for (i, slot), (j, slot2) in zip(text_keys[split], image_keys[split]):
            e, answer = ents[i], ents[i].answer(slot)
            pos = [did for text, did in snippets[i] if c.contains_word(text, answer)]
            b.query(ds, split, t1, 1, pos, txt=c.webqa_text_question(e, slot, qrng),
                    src={"entity_id": e.entity_id, "question_type": slot, "answer": answer})
            e = ents[j]
            b.query(ds, split, t2, 2, [pictures[j]], txt=c.webqa_image_question(e, slot2),
                    src={"entity_id": e.entity_id, "question_type": slot2, "answer": e.answer(slot2)})


def _oven(b: _Writer, wiki: _Wiki) -> None:
    """(photo, "what is this?") -> the entity's article (task 6) or its picture and article (task 8).
    Query photos are noisy views of the entity's signature; the article describes that signature."""
    ds = "OVEN"
    ents = wiki.entities
    pools = {
        6: [b.candidate(ds, [b.local("oven_task6"), b.train_pool], txt=c.oven_passage(e),
                        src={"wikidata_id": e.entity_id, "wikipedia_title": e.title}) for e in ents],
        8: [b.candidate(ds, [b.local("oven_task8"), b.train_pool], txt=c.oven_passage(e), img=img,
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
                        txt=c.pick(rng, c.OVEN_QUESTIONS).format(k=e.kind),
                        img=b.image(c.entity_scene(e, rng), ds, split),
                        src={**e.attrs(), "data_split": split})


def _infoseek(b: _Writer, wiki: _Wiki) -> None:
    """(photo, question about one attribute) -> article chunks. Chunks that contain the answer are
    positives (often two), the entity's other chunks are its hard negatives, as in M-BEIR."""
    ds = "INFOSEEK"
    ents = wiki.entities
    chunks: dict[int, list[list[tuple[str, str]]]] = {6: [], 8: []}
    for e, img in zip(ents, wiki.images):
        texts = [f"{e.title}. {chunk}" for chunk in c.wiki_chunks(e)]
        src = {"wikidata_id": e.entity_id, "wikipedia_title": e.title}
        for task, image in ((6, None), (8, img)):
            pools = [b.local(f"infoseek_task{task}"), b.train_pool]
            chunks[task].append([(t, b.candidate(ds, pools, txt=t, img=image, src=src)) for t in texts])
    for split in (*_EVAL_SPLITS, "train"):
        rng = b.rng(ds, split)
        for _ in range(b.size.eval_queries if split != "train" else b.size.train_large // 2):
            for task, per_entity in chunks.items():
                i, slot = int(rng.integers(len(ents))), c.pick(rng, c.INFOSEEK_SLOTS)
                e, answer = ents[i], ents[i].answer(slot)
                pos = [did for text, did in per_entity[i] if c.contains_word(text, answer)]
                neg = [did for text, did in per_entity[i] if not c.contains_word(text, answer)]
                src = {"entity_id": e.entity_id, "answer": answer, "answer_eval": [answer],
                       "question_type": slot, "data_split": split}
                b.query(ds, split, f"infoseek_task{task}", task, pos, txt=c.infoseek_question(e, slot, rng),
                        img=b.image(c.entity_scene(e, rng), ds, split), src=src, neg=neg)


# ---------------------------------------------------------------------------------------------
# Composed retrieval: FashionIQ, CIRR
# ---------------------------------------------------------------------------------------------


_GarmentEdit = tuple[c.Garment, list[tuple[str, str]], c.Garment, c.Garment]


def _garment_edit(rng: np.random.Generator, used: set) -> _GarmentEdit:
    """Reference, changes, target, and a lure that carries the same changes on another kind of garment."""
    for _ in range(50):
        ref = c.random_garment(rng)
        attrs = rng.choice(["colour", "pattern", "shade", "length"], size=int(rng.integers(1, 3)),
                           replace=False)
        changes = [(str(a), c.pick(rng, [v for v in c.GARMENT_ATTRIBUTES[a] if v != getattr(ref, a)]))
                   for a in attrs]
        target = replace(ref, **dict(changes))
        lure = replace(c.random_garment(rng), **dict(changes))
        if lure.kind == ref.kind:
            lure = replace(lure, kind=c.pick(rng, [k for k in c.GARMENTS if k != ref.kind]))
        if not {ref, target, lure} & used:
            break
    used |= {ref, target, lure}
    return ref, changes, target, lure


def _fashioniq(b: _Writer) -> None:
    """(reference garment, "make it red with stripes") -> target. The pool holds a near copy of the
    reference (the image-only answer) and the same changes on another garment (the text-only answer)."""
    ds, t7 = "FashionIQ", "fashioniq_task7"
    q = b.size.eval_queries
    by_garment: dict[c.Garment, list[str]] = defaultdict(list)

    def add(g: c.Garment, pool: Path, split: str, rng: np.random.Generator) -> str:
        did = b.candidate(ds, [pool], img=b.image(c.garment_scene(g, rng), ds, split), src=g.attrs())
        by_garment[g].append(did)
        return did

    rng, used = b.rng(ds, "pool"), set()
    edits = []
    for _ in range(2 * q):
        ref, changes, target, lure = _garment_edit(rng, used)
        _in_random_order(rng, [ref, target, lure], lambda g: add(g, b.local(t7), "pool", rng))
        edits.append((ref, changes, target))
    for _ in range(max(0, b.size.pool_size - 6 * q)):
        add(c.random_garment(rng), b.local(t7), "pool", rng)
    for split, (ref, changes, target) in _eval_splits(edits, q):
        qrng = b.rng(ds, split)
        b.query(ds, split, t7, 7, by_garment[target], txt=c.garment_edit_text(changes, qrng),
                img=b.image(c.garment_scene(ref, qrng), ds, split),
                src={"reference": ref.attrs(), "changes": dict(changes), "target": target.attrs()})
    rng, used = b.rng(ds, "train"), set()
    for _ in range(b.size.train_small):
        ref, changes, target, lure = _garment_edit(rng, used)
        near, target_did, lure_did = _in_random_order(rng, [ref, target, lure],
                                                      lambda g: add(g, b.train_pool, "train", rng))
        b.query(ds, "train", t7, 7, [target_did], txt=c.garment_edit_text(changes, rng),
                img=b.image(c.garment_scene(ref, rng), ds, "train"),
                src={"reference": ref.attrs(), "changes": dict(changes), "target": target.attrs()},
                neg=[near, lure_did])


def _group_attrs(g: c.Group | None) -> dict | None:
    return None if g is None else {"shape": g.shape, "colour": g.colour}


def _scene_edit(rng: np.random.Generator) -> tuple[c.Scene, dict, c.Scene, c.Scene, str]:
    """Reference, edit, target (the reference edited, same layout), a lure that matches the text
    but not the image, and the modification text."""
    ref = c.random_scene(rng, min_groups=2, max_groups=3, max_count=1)
    groups = c.groups_of(ref)
    kinds = {(g.shape, g.colour) for g in groups}
    ops = ["remove", "recolour", "reshape", "background"]
    if len(ref.objects) < c.MAX_OBJECTS:
        ops.append("add")
    op, old, new, bg = c.pick(rng, ops), c.pick(rng, groups), None, ref.background
    objects = list(ref.objects)
    if op == "add":
        old = None
        new = c.pick(rng, [c.Group(s, col, 1, c.pick(rng, list(c.OBJECT_SIZES)), c.pick(rng, c.PATTERNS))
                           for s in c.SHAPES for col in c.COLOURS if (s, col) not in kinds])
        x, y = c.free_cell(ref, rng)
        objects.append(c.Obj(new.shape, new.colour, new.size, new.pattern, x, y))
    elif op == "remove":
        objects = [o for o in objects if (o.shape, o.colour) != (old.shape, old.colour)]
    elif op in ("recolour", "reshape"):
        if op == "recolour":
            options = [c.Group(old.shape, col) for col in c.COLOURS if (old.shape, col) not in kinds]
        else:
            options = [c.Group(s, old.colour) for s in c.SHAPES if (s, old.colour) not in kinds]
        new = c.pick(rng, options)
        edited = (old.shape, old.colour)
        objects = [replace(o, shape=new.shape, colour=new.colour) if (o.shape, o.colour) == edited else o
                   for o in objects]
    else:
        bg = c.pick(rng, [x for x in c.BACKGROUNDS if x != ref.background])
    target = c.Scene(bg, tuple(objects))
    if op == "remove":  # the same remaining shapes elsewhere: only the image tells them apart
        lure = c.place(c.groups_of(target), c.pick(rng, [x for x in c.BACKGROUNDS if x != bg]), rng)
    else:  # another scene that also has what the text asks for
        lure_groups = [g for g in c.random_groups(rng, 1, 2, 1)
                       if new is None or (g.shape, g.colour) != (new.shape, new.colour)]
        if new is not None:
            lure_groups.append(replace(new, size=c.pick(rng, list(c.OBJECT_SIZES))))
        lure = c.place(lure_groups, bg if op == "background" else c.pick(rng, list(c.BACKGROUNDS)), rng)
    edit = {"op": op, "old": _group_attrs(old), "new": _group_attrs(new), "background": bg}
    return ref, edit, target, lure, c.scene_edit_text(op, old, new, bg, rng)


def _fresh_scene_edit(rng: np.random.Generator, used: set) -> tuple[c.Scene, dict, c.Scene, c.Scene, str]:
    """A scene edit whose reference, target and lure are new to the pool (so positives are exact)."""
    for _ in range(50):
        edit = _scene_edit(rng)
        keys = {c.scene_key(s) for s in (edit[0], edit[2], edit[3])}
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

    def add(scene: c.Scene, pool: Path, split: str) -> str:
        did = b.candidate(ds, [pool], img=b.image(scene, ds, split), src=c.scene_attrs(scene))
        by_key[c.scene_key(scene)].append(did)
        return did

    rng, used = b.rng(ds, "pool"), set()
    edits = []
    for _ in range(2 * q):
        ref, edit, target, lure, text = _fresh_scene_edit(rng, used)
        near_copy = c.jitter(ref, rng, move=0.02, tint=10)
        _in_random_order(rng, [near_copy, target, lure], lambda s: add(s, b.local(t7), "pool"))
        edits.append((ref, edit, target, text))
    for _ in range(max(0, b.size.pool_size - 6 * q)):
        add(c.random_scene(rng, max_count=1), b.local(t7), "pool")
    for split, (ref, edit, target, text) in _eval_splits(edits, q):
        b.query(ds, split, t7, 7, by_key[c.scene_key(target)], txt=text, img=b.image(ref, ds, split),
                src={"reference": c.scene_attrs(ref), "edit": edit, "target": c.scene_attrs(target)})
    rng, used = b.rng(ds, "train"), set()
    for _ in range(b.size.train_small):
        ref, edit, target, lure, text = _fresh_scene_edit(rng, used)
        near_copy = c.jitter(ref, rng, move=0.02, tint=10)
        near, target_did, lure_did = _in_random_order(rng, [near_copy, target, lure],
                                                      lambda s: add(s, b.train_pool, "train"))
        b.query(ds, "train", t7, 7, [target_did], txt=text, img=b.image(ref, ds, "train"),
                src={"reference": c.scene_attrs(ref), "edit": edit, "target": c.scene_attrs(target)},
                neg=[near, lure_did])


# ---------------------------------------------------------------------------------------------
# The union files, the instructions and the manifest
# ---------------------------------------------------------------------------------------------


def _concatenate(b: _Writer, dest: Path, sources: Iterable[Path]) -> None:
    out = AtomicFile(dest)
    try:
        for source in sources:
            with open(source, encoding="utf-8") as f:
                for line in f:
                    out.writeline(line.rstrip("\n"))
    except BaseException:
        out.discard()
        raise
    out.commit()
    b.lines[dest.relative_to(b.root).as_posix()] = out.lines


def _line_offsets(path: Path) -> np.ndarray:
    offsets, at = [], 0
    with open(path, "rb") as f:
        for line in f:
            offsets.append(at)
            at += len(line)
    return np.asarray(offsets, dtype=np.int64)


def _union_train(b: _Writer) -> dict[str, int]:
    """UniIR's mbeir_union_up_train.jsonl: every training file, the small ones repeated (UniIR
    upsamples them with random.choices, so records and qids repeat), shuffled. Streams through
    byte offsets, so the gpu size is never held in memory. Returns the repeat factors."""
    factors = {name: b.size.upsample if name in UPSAMPLED else 1 for name in DATASET_IDS}
    sources = [query_path(b.root, "train", DATASET_STEMS[name]) for name in DATASET_IDS]
    offsets = [np.tile(_line_offsets(path), factors[name]) for name, path in zip(DATASET_IDS, sources)]
    which = np.concatenate([np.full(len(o), k) for k, o in enumerate(offsets)])
    where = np.concatenate(offsets)
    order = np.random.default_rng([b.seed, _UNION_STREAM]).permutation(len(where))
    out = AtomicFile(union_train_path(b.root))
    handles = [open(path, "rb") for path in sources]
    try:
        for k in order:
            f = handles[which[k]]
            f.seek(where[k])
            out.writeline(f.readline().decode("utf-8").rstrip("\n"))
    except BaseException:
        out.discard()
        raise
    finally:
        for f in handles:
            f.close()
    out.commit()
    b.lines[union_train_path(b.root).relative_to(b.root).as_posix()] = out.lines
    return factors


def _write_unions(b: _Writer) -> dict[str, int]:
    """Global pools (test: the 16 local test pools concatenated, as M-BEIR), union val and train."""
    root = b.root
    for split in _EVAL_SPLITS:
        # Only MSCOCO's pools differ between val and test.
        _concatenate(b, global_pool_path(root, split),
                     [local_pool_path(root, pair.name, split) for pair in EVAL_PAIRS])
    _concatenate(b, root / "query" / "union_val" / "mbeir_union_val.jsonl",
                 [query_path(root, "val", p.name) for p in EVAL_PAIRS])
    return _union_train(b)


def _resolve(size: str | SynthSize) -> SynthSize:
    if isinstance(size, SynthSize):
        return size
    if size not in SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; choose one of {', '.join(SIZES)}")
    return SIZES[size]


def _read_manifest(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); delete it or choose another "
                         f"directory") from None
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR:
        raise ValueError(f"{path}:1: not written by {GENERATOR}; choose another directory")
    return manifest


def _clear(root: Path, previous: dict | None) -> None:
    """Remove an earlier synthetic benchmark; refuse to touch a directory that holds anything else."""
    present = [name for name in _OUTPUTS if (root / name).exists()]
    if present and previous is None:
        raise FileExistsError(
            f"{root} already holds {', '.join(present)} but no {MANIFEST}, so it is not a synthetic "
            f"benchmark and nothing there is overwritten; choose a new or empty directory")
    for name in present:
        shutil.rmtree(root / name)


def _dumps(obj: dict) -> str:
    return json.dumps(obj, indent=2) + "\n"


def _generate(root: Path, size: SynthSize, seed: int, image_px: int, progress: bool, force: bool) -> bool:
    """Write the benchmark unless `root` already holds this one; True when it was (re)written."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(image_px, int) or image_px < 16:
        raise ValueError(f"image_px must be an integer of at least 16, got {image_px!r}")
    identity = {"generator": GENERATOR, "version": GENERATOR_VERSION, "size": size.name, "seed": seed,
                "image_px": image_px, "sizes": asdict(size)}
    manifest = root / MANIFEST
    previous = _read_manifest(manifest)
    if (not force and previous is not None and previous.get("complete")
            and {key: previous.get(key) for key in identity} == identity):
        return False
    root.mkdir(parents=True, exist_ok=True)
    _clear(root, previous)
    # Written first, so an interrupted run is recognised (and cleaned) as ours next time.
    write_text_atomic(manifest, _dumps({**identity, "complete": False}))
    b = _Writer(root, size, seed, image_px)
    try:
        wiki = _wiki(b)
        roles: list[tuple[str, Callable[[], None]]] = [  # in UniIR's dataset-id order
            ("VisualNews", lambda: _visualnews(b)), ("Fashion200K", lambda: _fashion200k(b)),
            ("WebQA", lambda: _webqa(b, wiki)), ("EDIS", lambda: _edis(b)), ("NIGHTS", lambda: _nights(b)),
            ("OVEN", lambda: _oven(b, wiki)), ("INFOSEEK", lambda: _infoseek(b, wiki)),
            ("FashionIQ", lambda: _fashioniq(b)), ("CIRR", lambda: _cirr(b)), ("MSCOCO", lambda: _mscoco(b)),
        ]
        for name, role in roles:
            role()
            b.commit(keep=[b.train_pool])  # the union train pool fills across all datasets
            if progress:
                print(f"synthetic {size.name}: {name} written ({b.images} images so far)", flush=True)
        b.commit()
        factors = _write_unions(b)
        write_instructions(instructions_path(root), [
            (TASKS[p.task_id].query_modality, TASKS[p.task_id].cand_modality, DATASET_NAMES[p.dataset_id],
             p.dataset_id, list(c.INSTRUCTIONS[p.name])) for p in EVAL_PAIRS
        ])
    except BaseException:
        b.discard()
        raise
    write_text_atomic(manifest, _dumps({**identity, "complete": True, "upsample": factors, "images": b.images,
                                        "files": dict(sorted(b.lines.items()))}))
    return True


def write_benchmark(out_dir: PathLike, size: str | SynthSize = "tiny", seed: int = 0, image_px: int = 64,
                    progress: bool = False) -> Path:
    """Write the synthetic benchmark in M-BEIR's layout under `out_dir` and return that path.

    Taught in notebook 00. Records stream to disk as they are made and every file (images too)
    appears atomically; the same seed gives byte-identical files. When `out_dir/synthetic.json`
    already records this generator version, size, seed and image size, nothing is written.
    """
    _generate(Path(out_dir), _resolve(size), seed, image_px, progress, force=False)
    return Path(out_dir)


def ensure_benchmark(data_dir: PathLike, size: str | SynthSize, seed: int) -> Path:
    """The notebooks' setup call: the benchmark at `data_dir`, written only if not there yet.

    Taught in notebook 00.
    """
    return write_benchmark(data_dir, size, seed)


def synth_command(out: str, size: str, seed: int, force: bool = False) -> int:
    """`uniir-lite data synth OUT --size tiny --seed 0 [--force]`: write it and print one summary line."""
    start = time.perf_counter()
    try:
        spec = _resolve(size)
        written = _generate(Path(out), spec, seed, 64, progress=False, force=force)
        manifest = _read_manifest(Path(out) / MANIFEST) or {}
    except (ValueError, OSError) as e:  # FileExistsError is an OSError
        print(f"error: {e}")
        return 1
    files = manifest["files"]
    union = files[union_train_path(".").as_posix()]
    tests = sum(files[query_path(".", "test", p.name).as_posix()] for p in EVAL_PAIRS)
    pool = files[global_pool_path(".", "test").as_posix()]
    print(f"{'wrote' if written else 'already there:'} synthetic {spec.name} benchmark (seed {seed}) "
          f"in {out}: {union:,} union training queries, {tests:,} test queries, {pool:,} global test candidates, "
          f"{manifest['images']:,} images, {time.perf_counter() - start:.1f} s")
    return 0
