"""Writing a benchmark in M-BEIR's layout: sizes, random streams, the streaming writer and the union files.

Taught in notebook 00. `_Writer` streams queries, qrels, local and global candidate pools and
images to disk with M-BEIR's names and record format (files appear atomically, one commit per
dataset); the sampling helpers here are shared by the dataset builders (`datasets`, `composed`);
the union files (global pools, union val and the upsampled union train file) are written last.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from uniir_lite.data.mbeir import (
    DATASET_IDS, DATASET_STEMS, EVAL_PAIRS, global_pool_path, local_pool_path, qrels_path, query_path,
    union_train_path,
)
from uniir_lite.data.synthetic.scenes import Scene, jpeg_bytes
from uniir_lite.io import AtomicFile, atomic_open

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
    "tiny": SynthSize("tiny", eval_queries=150, pool_size=250, train_large=600, train_small=200,
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

    def image(self, scene: Scene, dataset: str, split: str, name: str | None = None) -> str:
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
            f.write(jpeg_bytes(scene, self.px))
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


def _in_random_order(rng: np.random.Generator, items: Sequence[T], write: Callable[[T], str]) -> list[str]:
    """Write related candidates in a random order, so a pool's order never tells which one is the
    answer; returns their dids in the order given."""
    dids = [""] * len(items)
    for i in rng.permutation(len(items)):
        dids[i] = write(items[i])
    return dids


# ---------------------------------------------------------------------------------------------
# The union files: global pools, union val and union train
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
