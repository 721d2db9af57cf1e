"""Torch datasets and the collator that turn M-BEIR records into model batches.

Taught in notebook 05. No model code lives here: the caller passes the tokenizer and the
image loader of its towers, so CPU and GPU runs, tiny and real towers, share the same batches.
Image paths in the records are relative to the M-BEIR root; the datasets resolve them against
`root`, and the collator raises a clear error for an image that is not there.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from uniir_lite.data.mbeir import PathLike, Query, format_string, parse_id, read_queries
from uniir_lite.instructions import POLICIES, InstructionTable, choose, instruct_query

if TYPE_CHECKING:
    import datasets


def _resolve(root: Path, img_path: str | None) -> str | None:
    return str(root / img_path) if img_path else None


def target_modality(query: Query, modality_of: Callable[[str], str]) -> str:
    """The candidate modality an instruction is chosen for: that of the query's first positive
    from its own dataset (UniIR's hack for OVEN/InfoSeek, whose positives can come from the other)."""
    dataset_id = query.dataset_id
    same_dataset = [did for did in query.pos if parse_id(did)[0] == dataset_id]
    return modality_of((same_dataset or query.pos)[0])


class _PoolRows:
    """did -> row lookup into an Arrow pool without copying its columns into Python; rows read once
    are kept (up to `cache_size`), as training draws the same positives every epoch."""

    def __init__(self, pool: datasets.Dataset, cache_size: int = 100_000) -> None:
        self.pool = pool
        # One int per did: the union train pool fits; the texts stay in the memory-mapped file.
        self.row_of = {did: i for i, did in enumerate(pool.data.column("did").to_pylist())}
        self.cache_size = cache_size
        self._rows: dict[str, dict[str, Any]] = {}

    def __getitem__(self, did: str) -> dict[str, Any]:
        row = self._rows.get(did)
        if row is None:
            try:
                row = self.pool[self.row_of[did]]
            except KeyError:
                raise KeyError(f"candidate {did} is not in the pool") from None
            if len(self._rows) >= self.cache_size:
                self._rows.clear()
            self._rows[did] = row
        return row

    def modality(self, did: str) -> str:
        return self[did]["modality"]


def _candidate_item(row: Mapping[str, Any], root: Path) -> dict[str, Any]:
    # Candidates are never instructed; UniIR formats their text as format_string(txt or "").
    return {"did": row["did"], "txt": format_string(row["txt"]),
            "img_path": _resolve(root, row["img_path"]), "modality": row["modality"]}


class MBEIRTrainDataset(Dataset):
    """Training queries with one positive (and optional hard negatives) each.

    Item: dict(qid, query_txt, query_img, pos, negs, task_id). The positive is drawn afresh for
    every (epoch, index) like UniIR's `shuffle_cand`; draws come from a generator seeded with
    (seed, epoch, index), so they do not depend on worker count or access order. Call
    `set_epoch(e)` once per epoch to get new draws. With `instructions=None` the query text is
    `format_string(query_txt)` (the "no instruction" setting).
    """

    def __init__(
        self,
        queries: PathLike | Sequence[Query],
        pool: datasets.Dataset,
        instructions: InstructionTable | None,
        policy: str = "random",
        seed: int = 0,
        hard_negatives: int = 0,
        *,
        root: PathLike,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown instruction policy {policy!r}; choose one of {POLICIES}")
        self.queries = read_queries(queries) if isinstance(queries, (str, os.PathLike)) else list(queries)
        self.pool = _PoolRows(pool)
        self.instructions = instructions
        self.policy = policy
        self.seed = seed
        self.hard_negatives = hard_negatives
        self.root = Path(root)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        query = self.queries[index]
        # A string seed is hashed with SHA-512 by `random`, the same in every process.
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        pos = self.pool[rng.choice(query.pos)]
        negs = rng.sample(query.neg, min(self.hard_negatives, len(query.neg)))
        if self.instructions is None:
            query_txt = format_string(query.txt)
        else:
            prompts = self.instructions.prompts(
                query.dataset_id, query.modality, target_modality(query, self.pool.modality))
            query_txt = instruct_query(query.txt, choose(prompts, query.qid, self.policy, rng))
        return {
            "qid": query.qid,
            "query_txt": query_txt,
            "query_img": _resolve(self.root, query.img_path),
            "pos": _candidate_item(pos, self.root),
            "negs": [_candidate_item(self.pool[did], self.root) for did in negs],
            "task_id": query.task_id,
        }


class MBEIREmbedDataset(Dataset):
    """Queries or candidates to embed; item: dict(id, txt, img_path).

    Build it with `MBEIREmbedDataset.from_queries(...)` (instructed or not; each query's
    instruction is chosen once, from (seed, qid) alone) or `MBEIREmbedDataset.from_pool(...)`.
    """

    def __init__(
        self,
        *,
        root: PathLike,
        queries: Sequence[Query] | None = None,
        pool: datasets.Dataset | None = None,
        instructions: InstructionTable | None = None,
        modality_of: Callable[[str], str] | None = None,
        policy: str = "fixed",
        seed: int = 0,
    ) -> None:
        if (queries is None) == (pool is None):
            raise ValueError("pass exactly one of queries or pool")
        if instructions is not None and modality_of is None:
            raise ValueError("instructed queries need modality_of(did) to find the target modality")
        if policy not in POLICIES:
            raise ValueError(f"unknown instruction policy {policy!r}; choose one of {POLICIES}")
        self.root = Path(root)
        self.queries = None if queries is None else list(queries)
        self.pool = pool
        self.instructions = instructions
        self.modality_of = modality_of
        self.policy = policy
        self.seed = seed

    @classmethod
    def from_queries(
        cls,
        queries: PathLike | Sequence[Query],
        *,
        root: PathLike,
        instructions: InstructionTable | None = None,
        modality_of: Callable[[str], str] | None = None,
        policy: str = "fixed",
        seed: int = 0,
    ) -> MBEIREmbedDataset:
        """Queries; with `instructions`, `modality_of(did)` gives the target modality (e.g.
        `pool_modalities(pool).__getitem__`)."""
        if isinstance(queries, (str, os.PathLike)):
            queries = read_queries(queries)
        return cls(root=root, queries=queries, instructions=instructions,
                   modality_of=modality_of, policy=policy, seed=seed)

    @classmethod
    def from_pool(cls, pool: datasets.Dataset, *, root: PathLike) -> MBEIREmbedDataset:
        """Candidates of a pool read with `read_pool`, in pool order; text is format_string(txt)."""
        return cls(root=root, pool=pool)

    def __len__(self) -> int:
        return len(self.queries) if self.queries is not None else len(self.pool)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self.queries is None:
            row = self.pool[index]
            return {"id": row["did"], "txt": format_string(row["txt"]),
                    "img_path": _resolve(self.root, row["img_path"])}
        query = self.queries[index]
        if self.instructions is None:
            txt = format_string(query.txt)
        else:
            prompts = self.instructions.prompts(
                query.dataset_id, query.modality, target_modality(query, self.modality_of))
            rng = random.Random(f"{self.seed}:{query.qid}")
            txt = instruct_query(query.txt, choose(prompts, query.qid, self.policy, rng))
        return {"id": query.qid, "txt": txt, "img_path": _resolve(self.root, query.img_path)}


class MBEIRCollator:
    """Stacks texts and images into tensors, with 0/1 masks for a missing modality.

    As UniIR's collator: a missing image is an all-zero image with `img_mask` 0, a missing text
    is the empty string with `txt_mask` 0; the masks let score fusion drop that embedding.
    Works on `MBEIREmbedDataset` items (-> one side: ids, txt, img, txt_mask, img_mask) and
    `MBEIRTrainDataset` items (-> query, pos and neg sides plus task_id; negatives are flattened,
    `neg_query_index` pointing at their query).
    """

    def __init__(
        self,
        tokenize: Callable[[list[str]], torch.Tensor],
        load_image: Callable[[str], torch.Tensor],
        image_size: int | tuple[int, int],
    ) -> None:
        self.tokenize = tokenize
        self.load_image = load_image
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)

    def _image(self, img_path: str | None, owner: str) -> torch.Tensor:
        if img_path is None:
            return torch.zeros(3, *self.image_size)  # [3, H, W]
        if not os.path.isfile(img_path):
            raise FileNotFoundError(f"image of {owner} not found: {img_path}")
        try:
            return self.load_image(img_path)  # [3, H, W]
        except OSError as e:
            raise OSError(f"cannot read image of {owner} at {img_path}: {e}") from e

    def side(self, ids: list[str], txts: list[str], img_paths: list[str | None], kind: str) -> dict[str, Any]:
        """One side of a batch (queries or candidates)."""
        return {
            "ids": ids,
            "txt": self.tokenize(txts),  # [bs, seq_len]
            "img": torch.stack([self._image(p, f"{kind} {i}") for i, p in zip(ids, img_paths)]),  # [bs, 3, H, W]
            "txt_mask": torch.tensor([1 if t else 0 for t in txts], dtype=torch.long),  # [bs]
            "img_mask": torch.tensor([1 if p else 0 for p in img_paths], dtype=torch.long),  # [bs]
        }

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        if "qid" not in batch[0]:
            return self.side([b["id"] for b in batch], [b["txt"] for b in batch],
                             [b["img_path"] for b in batch], "record")
        negs = [(row, neg) for row, b in enumerate(batch) for neg in b["negs"]]
        return {
            "query": self.side([b["qid"] for b in batch], [b["query_txt"] for b in batch],
                               [b["query_img"] for b in batch], "query"),
            "pos": self.side([b["pos"]["did"] for b in batch], [b["pos"]["txt"] for b in batch],
                             [b["pos"]["img_path"] for b in batch], "candidate"),
            # None without hard negatives (UniIR's default: in-batch negatives only).
            "neg": self.side([n["did"] for _, n in negs], [n["txt"] for _, n in negs],
                             [n["img_path"] for _, n in negs], "candidate") if negs else None,
            "neg_query_index": torch.tensor([row for row, _ in negs], dtype=torch.long),  # [n_neg]
            "task_id": torch.tensor([b["task_id"] for b in batch], dtype=torch.long),  # [bs]
        }


def collator_for(model, root: PathLike) -> MBEIRCollator:
    """The `MBEIRCollator` of a UniIR model (`uniir_lite.fusion.UniIRModel`): its tokenizer, its image
    size, CLIP's normalisation."""
    from uniir_lite.data.images import ImageLoader

    # datasets resolve image paths against the absolute root, so the loader's join keeps them as is
    loader = ImageLoader(Path(root).resolve(), model.image_size)
    return MBEIRCollator(model.tokenize, loader, model.image_size)
