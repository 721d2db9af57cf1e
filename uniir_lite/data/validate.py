"""Validating a whole M-BEIR directory (or a subset of it): `uniir-lite data validate DIR`.

Taught in notebook 00. Every record, every cross-file reference (positives in the pool, qrels agreeing
with queries, instructions for every pair) and every image path is checked; problems are collected,
not raised, so one bad file does not hide the others, and each names its file and line.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uniir_lite.data.mbeir import (
    DATASET_IDS,
    DATASET_NAMES,
    DATASET_STEMS,
    EVAL_PAIRS,
    TASKS,
    InstructionKey,
    MBEIRFormatError,
    Pair,
    PathLike,
    Qrels,
    Query,
    _add_judgement,
    _duplicates,
    _iter_json_lines,
    _iter_qrels,
    _repeat_error,
    candidate_from_record,
    get_pair,
    global_pool_path,
    hash_did,
    instructions_path,
    is_union_file,
    local_pool_path,
    qrels_path,
    query_from_record,
    query_path,
    read_instructions,
    unhash_did,
    union_train_path,
)

MAX_LISTED_MISSING_IMAGES = 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong in an M-BEIR directory, located as "path:line: message"."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"


class _Enough(Exception):
    """Raised internally once max_problems have been collected."""


class _Validator:
    """Walks the layout, collecting problems instead of stopping at the first one."""

    def __init__(self, root: PathLike, check_images: bool, max_problems: int | None) -> None:
        self.root = Path(root)
        self.check_images = check_images
        self.max_problems = max_problems
        self.problems: list[Problem] = []
        self.counts: dict[str, int] = dict.fromkeys(
            ("query files", "queries", "pools", "candidates", "qrels files", "judgements",
             "instruction rows", "images"), 0)
        self.missing_images = 0
        self._images_seen: set[str] = set()
        self._pools: dict[Path, dict[str, str] | None] = {}
        # (dataset_id, query_modality, cand_modality) -> where a query first needs it
        self._needed_instructions: dict[InstructionKey, tuple[Path, int]] = {}

    def add(self, path: PathLike, line: int | None, message: str) -> None:
        self.problems.append(Problem(str(path), line, message))
        if self.max_problems is not None and len(self.problems) >= self.max_problems:
            raise _Enough

    def image(self, img_path: str, path: Path, line: int, owner: str) -> None:
        if not self.check_images or img_path in self._images_seen:
            return
        self._images_seen.add(img_path)
        self.counts["images"] += 1
        if not (self.root / img_path).is_file():
            self.missing_images += 1
            if self.missing_images <= MAX_LISTED_MISSING_IMAGES:
                self.add(path, line, f"image of {owner} not found: {self.root / img_path}")

    def pool(self, path: Path, keep_index: bool) -> dict[str, str] | None:
        """Check a pool once; returns did -> modality if `keep_index` on its first check, else None.

        Only the pools that queries are checked against keep an index, so the 5.6M global test
        pool is streamed without holding its ids in a dict.
        """
        if path in self._pools:
            return self._pools[path]
        if not path.is_file():
            return None
        index: dict[str, str] = {}
        hashed, lines = array("q"), array("q")
        for line_no, record, error in _iter_json_lines(path):
            try:
                if error is not None:
                    raise ValueError(error)
                row = candidate_from_record(record)  # type: ignore[arg-type]
                hashed.append(hash_did(row["did"]))
            except ValueError as e:
                self.add(path, line_no, str(e))
                continue
            lines.append(line_no)
            self.counts["candidates"] += 1
            if keep_index:
                index.setdefault(row["did"], row["modality"])  # type: ignore[arg-type]
            if row["img_path"]:
                self.image(row["img_path"], path, line_no, f"candidate {row['did']}")
        for key, first, again in _duplicates(np.frombuffer(hashed, dtype=np.int64),
                                             np.frombuffer(lines, dtype=np.int64)):
            self.add(path, again, f"duplicate did {unhash_did(key)!r} (first on line {first})")
        self.counts["pools"] += 1
        self._pools[path] = index if keep_index else None
        return self._pools[path]

    def queries(self, path: Path, pair: Pair | None, dataset_id: int | None) -> dict[str, tuple[Query, int]]:
        """Check a query file; returns qid -> (query, line). `pair`/`dataset_id` say what it must hold."""
        found: dict[str, tuple[Query, int]] = {}
        self.counts["query files"] += 1
        for line_no, record, error in _iter_json_lines(path):
            try:
                if error is not None:
                    raise ValueError(error)
                query = query_from_record(record)  # type: ignore[arg-type]
            except ValueError as e:
                self.add(path, line_no, str(e))
                continue
            if query.qid in found:
                error = _repeat_error(query, found[query.qid], is_union_file(path))
                if error:
                    self.add(path, line_no, error)
                continue
            found[query.qid] = (query, line_no)
            self.counts["queries"] += 1
            expected_dataset = pair.dataset_id if pair is not None else dataset_id
            if expected_dataset is not None and query.dataset_id != expected_dataset:
                self.add(path, line_no, f"qid {query.qid} is not from dataset {expected_dataset} "
                                        f"({DATASET_NAMES[expected_dataset]}) like this file")
            if pair is not None and query.task_id != pair.task_id:
                self.add(path, line_no,
                         f"task_id {query.task_id} in a file of pair {pair.name} (task {pair.task_id})")
            key = (query.dataset_id, query.modality, TASKS[query.task_id].cand_modality)
            self._needed_instructions.setdefault(key, (path, line_no))
            if query.img_path:
                self.image(query.img_path, path, line_no, f"query {query.qid}")
        return found

    def against_pool(self, path: Path, queries: dict[str, tuple[Query, int]],
                     pool_path: Path, pool: dict[str, str]) -> None:
        for qid, (query, line_no) in queries.items():
            for kind, dids in (("positive", query.pos), ("negative", query.neg)):
                for did in dids:
                    if did not in pool:
                        self.add(path, line_no, f"{kind} {did} of query {qid} is not in {pool_path}")
            # UniIR assigns task_id from the modality of the first positive.
            first = pool.get(query.pos[0])
            wanted = TASKS[query.task_id].cand_modality
            if first is not None and first != wanted:
                self.add(path, line_no, f"first positive {query.pos[0]} of query {qid} is {first!r} "
                                        f"but task {query.task_id} retrieves {wanted!r}")

    def against_qrels(self, path: Path, queries: dict[str, tuple[Query, int]], qrels_file: Path) -> None:
        qrels = Qrels(rel={}, task={})
        first_line: dict[str, int] = {}
        self.counts["qrels files"] += 1
        for line_no, parsed, error in _iter_qrels(qrels_file):
            if parsed is not None:
                error = _add_judgement(qrels, first_line, line_no, parsed)
                self.counts["judgements"] += 1
            if error is not None:
                self.add(qrels_file, line_no, error)
        for qid, line_no in first_line.items():
            if qid not in queries:
                self.add(qrels_file, line_no, f"qid {qid} is not in {path}")
                continue
            query, query_line = queries[qid]
            where = f"{path}:{query_line}"
            positives = set(qrels.rel.get(qid, {}))
            if positives != set(query.pos):
                self.add(qrels_file, line_no,
                         f"positives of {qid} are {sorted(positives)} here but pos_cand_list is "
                         f"{sorted(set(query.pos))} in {where}")
            if qid in qrels.task and qrels.task[qid] != query.task_id:
                self.add(qrels_file, line_no, f"task_id of {qid} is {qrels.task[qid]} here but "
                                              f"{query.task_id} in {where}")
        for qid, (_, query_line) in queries.items():
            if qid not in first_line:
                self.add(path, query_line, f"query {qid} has no judgements in {qrels_file}")

    def query_file(self, path: Path, pair: Pair | None, dataset_id: int | None,
                   pool_path: Path, qrels_file: Path | None) -> None:
        if not path.is_file():
            return
        queries = self.queries(path, pair, dataset_id)
        pool = self.pool(pool_path, keep_index=True)
        if pool is not None:
            self.against_pool(path, queries, pool_path, pool)
        if qrels_file is not None and qrels_file.is_file():
            self.against_qrels(path, queries, qrels_file)

    def instructions(self, found_any: bool) -> None:
        path = instructions_path(self.root)
        if not path.is_file():
            if found_any:  # UniIR needs the table even with instructions off
                self.add(path, None, "missing: every M-BEIR directory needs its instruction table")
            return
        try:
            table = read_instructions(path)
        except MBEIRFormatError as e:
            self.add(path, e.line, e.message)
            return
        self.counts["instruction rows"] = len(table)
        for key, (query_file, line_no) in self._needed_instructions.items():
            if key not in table:
                dataset_id, q_mod, c_mod = key
                self.add(path, None, f"no instructions for dataset {dataset_id} "
                                     f"({DATASET_NAMES[dataset_id]}), {q_mod} -> {c_mod}, "
                                     f"needed by {query_file}:{line_no}")

    def run(self, pairs: list[Pair], all_pairs: bool, splits: tuple[str, ...]) -> None:
        root = self.root
        for split in splits:
            # Query files first: they need their pool's did -> modality index.
            if split == "train":
                for name in dict.fromkeys(DATASET_NAMES[p.dataset_id] for p in pairs):
                    stem = DATASET_STEMS[name]
                    self.query_file(query_path(root, split, stem), None, DATASET_IDS[name],
                                    global_pool_path(root, split), qrels_path(root, split, stem))
            else:
                for pair in pairs:
                    self.query_file(query_path(root, split, pair.name), pair, None,
                                    local_pool_path(root, pair.name, split),
                                    qrels_path(root, split, pair.name))
                    self.pool(local_pool_path(root, pair.name, split), keep_index=False)
            if all_pairs:
                union_queries = (union_train_path(root) if split == "train" else
                                 root / "query" / f"union_{split}" / f"mbeir_union_{split}.jsonl")
                self.query_file(union_queries, None, None, global_pool_path(root, split), None)
                self.pool(global_pool_path(root, split), keep_index=False)
        found_any = self.counts["query files"] > 0 or self.counts["pools"] > 0
        self.instructions(found_any)
        if not found_any and not instructions_path(root).is_file():
            self.add(root, None, f"no M-BEIR files found for splits {', '.join(splits)} "
                                 f"(expected e.g. {query_path(root, 'test', pairs[0].name)})")
        if self.missing_images > MAX_LISTED_MISSING_IMAGES:
            self.add(root, None, f"{self.missing_images} referenced images are missing in total "
                                 f"(the first {MAX_LISTED_MISSING_IMAGES} are listed)")


def _resolve_pairs(pairs: list[str] | list[Pair] | None) -> list[Pair]:
    if not pairs:
        return list(EVAL_PAIRS)
    return [p if isinstance(p, Pair) else get_pair(p) for p in pairs]


def _validate(root: PathLike, pairs, splits, check_images: bool,
              max_problems: int | None) -> _Validator:
    selected = _resolve_pairs(pairs)
    validator = _Validator(root, check_images, max_problems)
    try:
        validator.run(selected, all_pairs=not pairs, splits=tuple(splits))
    except _Enough:
        pass
    return validator


def validate_dir(root: PathLike, pairs: list[str] | None = None,
                 splits: tuple[str, ...] = ("train", "val", "test"), check_images: bool = True,
                 max_problems: int | None = None) -> list[Problem]:
    """Check an M-BEIR directory (real or synthetic) file by file and across files.

    Taught in notebook 00. Every file of the layout that exists for the requested pairs and
    splits is checked (a subset directory is fine); then the cross-file rules: each positive and
    negative is in the pair's pool (train: the union train pool), qrels agree with the queries,
    instructions exist for every (dataset, query modality, candidate modality) in use, and every
    referenced image exists under `root`. The union files and global pools are checked only when
    `pairs` is None. Returns the problems found (at most `max_problems`), never raises on content.
    """
    return _validate(root, pairs, splits, check_images, max_problems).problems


def validate_command(root: str, pairs: list[str] | None, max_show: int = 20) -> int:
    """`uniir-lite data validate DIR [--pairs ...]`: print problems or an OK summary; exit code."""
    try:
        validator = _validate(root, pairs, ("train", "val", "test"), True, None)
    except ValueError as e:  # an unknown pair name
        print(f"error: {e}")
        return 2
    problems = validator.problems
    if problems:
        for problem in problems[:max_show]:
            print(problem)
        if len(problems) > max_show:
            print(f"... and {len(problems) - max_show} more problems")
        return 1
    print("OK: " + ", ".join(f"{n} {what}" for what, n in validator.counts.items()))
    return 0
