"""The M-BEIR format: ids, tasks, paths, readers and a validator.

Taught in notebook 00. Everything here reads the real M-BEIR files unchanged (UniIR's
`src/data/preprocessing/utils.py` and `src/data/mbeir_dataset.py` are the reference), and the
synthetic benchmark is written in the same layout, so one loader serves both.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from uniir_lite.io import AtomicFile, write_text_atomic

if TYPE_CHECKING:
    import datasets

PathLike = str | os.PathLike[str]

# ---------------------------------------------------------------------------------------------
# Datasets, modalities and tasks
# ---------------------------------------------------------------------------------------------

# UniIR's DATASET_IDS, spelled as UniIR spells them (INFOSEEK upper-case).
DATASET_IDS: dict[str, int] = {
    "VisualNews": 0,
    "Fashion200K": 1,
    "WebQA": 2,
    "EDIS": 3,
    "NIGHTS": 4,
    "OVEN": 5,
    "INFOSEEK": 6,
    "FashionIQ": 7,
    "CIRR": 8,
    "MSCOCO": 9,
}
DATASET_NAMES: dict[int, str] = {i: name for name, i in DATASET_IDS.items()}
# The file-name stem of each dataset: query/train/mbeir_<stem>_train.jsonl, pair names <stem>_task<k>.
DATASET_STEMS: dict[str, str] = {name: name.lower() for name in DATASET_IDS}
# UniIR's MBEIR_DATASET_TO_DOMAIN (paper Table 1 calls "common" "Misc.").
DATASET_DOMAINS: dict[str, str] = {
    "VisualNews": "news",
    "EDIS": "news",
    "Fashion200K": "fashion",
    "FashionIQ": "fashion",
    "WebQA": "wiki",
    "OVEN": "wiki",
    "INFOSEEK": "wiki",
    "NIGHTS": "common",
    "CIRR": "common",
    "MSCOCO": "common",
}

# Exactly the strings of the files; "image,text" in this order, no space.
MODALITIES: tuple[str, ...] = ("text", "image", "image,text")


@dataclass(frozen=True)
class Task:
    """One retrieval task: the code's 0-indexed `task_id` and the paper's 1..8 numbering."""

    task_id: int
    query_modality: str
    cand_modality: str
    paper_number: int
    short: str


# UniIR's MBEIR_TASK. Code id 5 ("image -> text,image") is unused, so it is absent here.
TASKS: dict[int, Task] = {
    0: Task(0, "text", "image", 1, "qt->ci"),
    1: Task(1, "text", "text", 2, "qt->ct"),
    2: Task(2, "text", "image,text", 3, "qt->(ci,ct)"),
    3: Task(3, "image", "text", 4, "qi->ct"),
    4: Task(4, "image", "image", 5, "qi->ci"),
    6: Task(6, "image,text", "text", 6, "(qi,qt)->ct"),
    7: Task(7, "image,text", "image", 7, "(qi,qt)->ci"),
    8: Task(8, "image,text", "image,text", 8, "(qi,qt)->(ci,ct)"),
}


def task_id_for(query_modality: str, cand_modality: str) -> int:
    """The code task id of a (query modality, candidate modality) pair, as UniIR's get_mbeir_task_id."""
    for task in TASKS.values():
        if (task.query_modality, task.cand_modality) == (query_modality, cand_modality):
            return task.task_id
    raise ValueError(
        f"no M-BEIR task retrieves {cand_modality!r} candidates for {query_modality!r} queries "
        f"(valid pairs: {', '.join(f'{t.query_modality} -> {t.cand_modality}' for t in TASKS.values())})"
    )


@dataclass(frozen=True)
class Pair:
    """One of the 16 (dataset, task) evaluation pairs; `name` is the stem of its files."""

    name: str
    dataset: str
    dataset_id: int
    task_id: int
    metric_k: int


def _pair(dataset: str, uniir_name: str, task_id: int) -> Pair:
    # Fashion200K and FashionIQ are reported with Recall@10, everything else with Recall@5.
    metric_k = 10 if uniir_name in ("Fashion200K", "FashionIQ") else 5
    name = f"{DATASET_STEMS[uniir_name]}_task{task_id}"
    return Pair(name, dataset, DATASET_IDS[uniir_name], task_id, metric_k)


# The paper's row order (Tables 2 and 6); `dataset` is the paper's display name.
EVAL_PAIRS: tuple[Pair, ...] = (
    _pair("VisualNews", "VisualNews", 0),
    _pair("MSCOCO", "MSCOCO", 0),
    _pair("Fashion200K", "Fashion200K", 0),
    _pair("WebQA", "WebQA", 1),
    _pair("EDIS", "EDIS", 2),
    _pair("WebQA", "WebQA", 2),
    _pair("VisualNews", "VisualNews", 3),
    _pair("MSCOCO", "MSCOCO", 3),
    _pair("Fashion200K", "Fashion200K", 3),
    _pair("NIGHTS", "NIGHTS", 4),
    _pair("OVEN", "OVEN", 6),
    _pair("InfoSeek", "INFOSEEK", 6),
    _pair("FashionIQ", "FashionIQ", 7),
    _pair("CIRR", "CIRR", 7),
    _pair("OVEN", "OVEN", 8),
    _pair("InfoSeek", "INFOSEEK", 8),
)
PAIRS_BY_NAME: dict[str, Pair] = {pair.name: pair for pair in EVAL_PAIRS}


def get_pair(name: str) -> Pair:
    """The evaluation pair called `name` (e.g. "cirr_task7"), with a clear error otherwise."""
    try:
        return PAIRS_BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"unknown M-BEIR pair {name!r}; valid pairs: {', '.join(PAIRS_BY_NAME)}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Ids: "dataset_id:n" strings and UniIR's integer hashing (the FAISS ids)
# ---------------------------------------------------------------------------------------------

_ID_RE = re.compile(r"(\d+):(\d+)")
QID_BASE = 500_000
DID_BASE = 10_000_000


def parse_id(s: str) -> tuple[int, int]:
    """Split a qid/did like "9:6" into (dataset_id, n)."""
    match = _ID_RE.fullmatch(s) if isinstance(s, str) else None
    if match is None:
        raise ValueError(f"bad M-BEIR id {s!r}: expected 'dataset_id:n' such as '9:6'")
    dataset_id, n = int(match[1]), int(match[2])
    if dataset_id not in DATASET_NAMES:
        raise ValueError(f"bad M-BEIR id {s!r}: unknown dataset id {dataset_id} (valid: 0..9)")
    return dataset_id, n


def _hash(s: str, base: int, kind: str) -> int:
    dataset_id, n = parse_id(s)
    if n >= base:
        # UniIR would silently collide with the next dataset's ids.
        raise ValueError(f"{kind} {s!r} cannot be hashed: n must be below {base:,}")
    return dataset_id * base + n


def hash_qid(qid: str) -> int:
    """UniIR's hash_qid: "9:6" -> 9 * 500_000 + 6."""
    return _hash(qid, QID_BASE, "qid")


def hash_did(did: str) -> int:
    """UniIR's hash_did: "9:6" -> 9 * 10_000_000 + 6 (the FAISS id of a candidate)."""
    return _hash(did, DID_BASE, "did")


def unhash_qid(hashed: int) -> str:
    """Inverse of hash_qid."""
    return f"{int(hashed) // QID_BASE}:{int(hashed) % QID_BASE}"


def unhash_did(hashed: int) -> str:
    """Inverse of hash_did."""
    return f"{int(hashed) // DID_BASE}:{int(hashed) % DID_BASE}"


# ---------------------------------------------------------------------------------------------
# Text normalisation
# ---------------------------------------------------------------------------------------------


def format_string(s: str | None) -> str:
    """UniIR's format_string, byte for byte.

    Strips whitespace, removes every carriage return and any leading/trailing double quotes,
    upper-cases the first character and ends the text with a period unless it already ends in
    `.`, `?` or `!`. Not idempotent on purpose: `'" x "'` -> `" x ."`, as in UniIR.
    """
    s = (s or "").replace("\r", "").strip().strip('"')
    if s:
        s = s[0].upper() + s[1:]
        if s[-1] not in ".?!":
            s += "."
    return s


# ---------------------------------------------------------------------------------------------
# The directory layout
# ---------------------------------------------------------------------------------------------


def query_path(root: PathLike, split: str, name: str) -> Path:
    """query/{split}/mbeir_{name}_{split}.jsonl; `name` is a pair (val/test) or a dataset stem (train)."""
    return Path(root) / "query" / split / f"mbeir_{name}_{split}.jsonl"


def union_train_path(root: PathLike) -> Path:
    """The default (upsampled) training file."""
    return Path(root) / "query" / "union_train" / "mbeir_union_up_train.jsonl"


def local_pool_path(root: PathLike, name: str, split: str = "test") -> Path:
    """The local pool of a pair; MSCOCO alone has split-specific pools (val and test)."""
    if name.startswith("mscoco_"):
        return Path(root) / "cand_pool" / "local" / f"mbeir_{name}_{split}_cand_pool.jsonl"
    return Path(root) / "cand_pool" / "local" / f"mbeir_{name}_cand_pool.jsonl"


def global_pool_path(root: PathLike, split: str = "test") -> Path:
    """The union pool of a split (test: M-BEIR's 5.6M global pool)."""
    return Path(root) / "cand_pool" / "global" / f"mbeir_union_{split}_cand_pool.jsonl"


def qrels_path(root: PathLike, split: str, name: str) -> Path:
    """qrels/{split}/mbeir_{name}_{split}_qrels.txt (UniIR's 5-column qrels)."""
    return Path(root) / "qrels" / split / f"mbeir_{name}_{split}_qrels.txt"


def instructions_path(root: PathLike) -> Path:
    """The query-instruction table (4 prompts per dataset and task)."""
    return Path(root) / "instructions" / "query_instructions.tsv"


# ---------------------------------------------------------------------------------------------
# Errors and low-level reading/writing
# ---------------------------------------------------------------------------------------------


class MBEIRFormatError(ValueError):
    """Bad M-BEIR input; reads as "path:line: message" so editors and terminals can jump to it."""

    def __init__(self, path: PathLike, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {message}")


def _iter_json_lines(path: PathLike) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, record or None, error or None) for each non-blank line; never raises on content."""
    # Binary lines: exact line numbers even for bad UTF-8, and only "\n" ends a line, as in M-BEIR.
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, None, f"not valid UTF-8: {e.reason} at byte {e.start}"
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, None, f"malformed JSON: {e.msg} (column {e.colno})"
                continue
            if not isinstance(record, dict):
                yield line_no, None, f"expected a JSON object, got {type(record).__name__}"
                continue
            yield line_no, record, None


def decoded_lines(path: PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of a small UTF-8 text file; bad bytes name their line."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MBEIRFormatError(path, line_no, f"not valid UTF-8: {e.reason} at byte {e.start}") from None


def iter_jsonl(path: PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, record) for each non-blank line of a jsonl file.

    Taught in notebook 00. A line that is not a JSON object raises MBEIRFormatError("path:line: ...").
    """
    for line_no, record, error in _iter_json_lines(path):
        if error is not None:
            raise MBEIRFormatError(path, line_no, error)
        yield line_no, record  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Qrels
# ---------------------------------------------------------------------------------------------


@dataclass
class Qrels:
    """Relevance judgements: `rel[qid][did]` (> 0 only, as UniIR's load_qrel) and `task[qid]`."""

    rel: dict[str, dict[str, int]]
    task: dict[str, int]


def _parse_qrels_line(parts: list[str]) -> tuple[str, str, int, int | None]:
    """(qid, did, relevance, task_id or None) of one qrels line split on whitespace; raises ValueError."""
    if len(parts) not in (4, 5):
        raise ValueError(
            f"expected 5 columns 'qid 0 did relevance task_id' (or 4 TREC columns), got {len(parts)}"
        )
    qid, _, did, relevance = parts[:4]
    try:
        relevance_value = int(relevance)
    except ValueError:
        raise ValueError(f"relevance must be an integer, got {relevance!r}") from None
    if len(parts) == 4:
        return qid, did, relevance_value, None
    try:
        task_id = int(parts[4])
    except ValueError:
        raise ValueError(f"task_id must be an integer, got {parts[4]!r}") from None
    if task_id not in TASKS:
        raise ValueError(f"unknown task_id {task_id} (valid: {sorted(TASKS)})")
    return qid, did, relevance_value, task_id


def _iter_qrels(path: PathLike) -> Iterator[tuple[int, tuple[str, str, int, int | None] | None, str | None]]:
    """(line number, parsed line or None, error or None) for each non-blank qrels line."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                parts = raw.decode("utf-8").split()
            except UnicodeDecodeError as e:
                yield line_no, None, f"not valid UTF-8: {e.reason} at byte {e.start}"
                continue
            if not parts:
                continue
            try:
                yield line_no, _parse_qrels_line(parts), None
            except ValueError as e:
                yield line_no, None, str(e)


def _add_judgement(qrels: Qrels, first_line: dict[str, int], line_no: int,
                   parsed: tuple[str, str, int, int | None]) -> str | None:
    """Add one qrels line; returns an error message if its task contradicts an earlier line."""
    qid, did, relevance, task_id = parsed
    if task_id is not None:
        if qrels.task.setdefault(qid, task_id) != task_id:
            return (f"qid {qid} has task_id {task_id} here but {qrels.task[qid]} on line "
                    f"{first_line[qid]}")
    first_line.setdefault(qid, line_no)
    if relevance > 0:  # as UniIR's load_qrel
        qrels.rel.setdefault(qid, {})[did] = relevance
    return None


def read_qrels(path: PathLike) -> Qrels:
    """Read UniIR's 5-column qrels (`qid 0 did 1 task_id`) or standard 4-column TREC qrels.

    Used by `uniir-lite eval-run`. 4-column lines carry no task, so their queries are left out of `task`.
    """
    qrels = Qrels(rel={}, task={})
    first_line: dict[str, int] = {}
    for line_no, parsed, error in _iter_qrels(path):
        if parsed is not None:
            error = _add_judgement(qrels, first_line, line_no, parsed)
        if error is not None:
            raise MBEIRFormatError(path, line_no, error)
    return qrels


# ---------------------------------------------------------------------------------------------
# Queries and candidates: one record each
# ---------------------------------------------------------------------------------------------


@dataclass
class Query:
    """One M-BEIR query record; `txt` is the raw `query_txt` (None for image-only queries)."""

    qid: str
    txt: str | None
    img_path: str | None
    modality: str
    src_content: str | None
    pos: list[str]
    neg: list[str]
    task_id: int

    @property
    def dataset_id(self) -> int:
        return parse_id(self.qid)[0]


def _has(modality: str, part: str) -> bool:
    return part in modality.split(",")


def _check_modality(value: object, key: str) -> str:
    if value not in MODALITIES:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, MODALITIES))}, got {value!r}")
    return value  # type: ignore[return-value]


def _check_content(record: dict, key: str, present: bool, modality_key: str, modality: str) -> str | None:
    # Absent content is null or "" (real image records carry "txt": null); present content is a
    # non-empty string, so a record always says exactly what its modality says.
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} must be a string or null, got {type(value).__name__}")
    if present and not (value or "").strip():
        raise ValueError(f"{key} is missing or empty but {modality_key} is {modality!r}")
    if not present and value:
        raise ValueError(f"{key} is set but {modality_key} is {modality!r}")
    return value or None


def _check_src_content(record: dict, key: str) -> str | None:
    # The key may be missing (real VisualNews candidates) or null; M-BEIR stores a JSON string.
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    raise ValueError(f"{key} must be a JSON string or null, got {type(value).__name__}")


def _check_id(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string like '9:6', got {value!r}")
    parse_id(value)
    return value


def _check_id_list(record: dict, key: str, required: bool) -> list[str]:
    value = record.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise ValueError(f"{key} must be a non-empty list of did strings, got {value!r}")
    return [_check_id(did, key) for did in value]


def query_from_record(record: dict) -> Query:
    """Validate one query record and return it as a Query; raises ValueError with the reason."""
    qid = _check_id(record.get("qid"), "qid")
    modality = _check_modality(record.get("query_modality"), "query_modality")
    txt = _check_content(record, "query_txt", _has(modality, "text"), "query_modality", modality)
    img_path = _check_content(
        record, "query_img_path", _has(modality, "image"), "query_modality", modality
    )
    pos = _check_id_list(record, "pos_cand_list", required=True)
    neg = _check_id_list(record, "neg_cand_list", required=False)
    task_id = record.get("task_id")
    if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id not in TASKS:
        raise ValueError(f"task_id must be one of {sorted(TASKS)}, got {task_id!r}")
    if TASKS[task_id].query_modality != modality:
        raise ValueError(
            f"task_id {task_id} ({TASKS[task_id].query_modality} -> {TASKS[task_id].cand_modality}) "
            f"does not match query_modality {modality!r}"
        )
    src_content = _check_src_content(record, "query_src_content")
    return Query(qid, txt, img_path, modality, src_content, pos, neg, task_id)


def candidate_from_record(record: dict) -> dict[str, str | None]:
    """Validate one candidate-pool record; returns the five pool columns."""
    did = _check_id(record.get("did"), "did")
    modality = _check_modality(record.get("modality"), "modality")
    txt = _check_content(record, "txt", _has(modality, "text"), "modality", modality)
    img_path = _check_content(record, "img_path", _has(modality, "image"), "modality", modality)
    src_content = _check_src_content(record, "src_content")
    return {"did": did, "txt": txt, "img_path": img_path, "modality": modality,
            "src_content": src_content}


def is_union_file(path: PathLike) -> bool:
    """The union query files repeat records on purpose: UniIR upsamples small datasets there."""
    return Path(path).name.startswith("mbeir_union_")


def _repeat_error(query: Query, first: tuple[Query, int], allow_repeats: bool) -> str | None:
    """None for an allowed repeat (an identical copy in a union file), else the duplicate message."""
    if allow_repeats and query == first[0]:
        return None
    copy = " with different content" if allow_repeats else ""
    return f"duplicate qid {query.qid!r}{copy} (first on line {first[1]})"


def read_queries(path: PathLike) -> list[Query]:
    """Read and validate a query jsonl file (one split of one pair, a train file or the union file).

    Taught in notebook 00. The first bad line raises MBEIRFormatError("path:line: reason"). In the
    union files (`mbeir_union_*`) identical repeated records are kept: they are UniIR's upsampling.
    """
    allow_repeats = is_union_file(path)
    queries: list[Query] = []
    first: dict[str, tuple[Query, int]] = {}
    for line_no, record in iter_jsonl(path):
        try:
            query = query_from_record(record)
        except ValueError as e:
            raise MBEIRFormatError(path, line_no, str(e)) from None
        if query.qid in first:
            error = _repeat_error(query, first[query.qid], allow_repeats)
            if error:
                raise MBEIRFormatError(path, line_no, error)
        else:
            first[query.qid] = (query, line_no)
        queries.append(query)
    return queries


# ---------------------------------------------------------------------------------------------
# Candidate pools: validated once, then memory-mapped Arrow
# ---------------------------------------------------------------------------------------------

POOL_COLUMNS: tuple[str, ...] = ("did", "txt", "img_path", "modality", "src_content")
_POOL_CACHE_VERSION = "1"
_POOL_BATCH_ROWS = 16_384


def default_cache_dir() -> Path:
    """Where read_pool keeps its Arrow files unless told otherwise (respects XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "uniir_lite" / "pools"


def _pool_cache_file(path: Path, cache_dir: Path) -> Path:
    # Keyed by the file's identity and version, so an edited pool is re-validated and rebuilt.
    stat = path.stat()
    key = f"{_POOL_CACHE_VERSION}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_dir / f"{path.stem}-{digest}.arrow"


def _duplicates(keys: np.ndarray, lines: np.ndarray) -> list[tuple[int, int, int]]:
    """(key, first line, repeated line) for every repeat of a key, by repeated line; keys in file order.

    Sorting int64 keys finds repeats without a Python set of millions of ids.
    """
    order = np.argsort(keys, kind="stable")  # equal keys stay in file order
    sorted_keys = keys[order]
    repeated = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1]) + 1
    if len(repeated) == 0:
        return []
    group_starts = np.r_[0, np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1]
    first = group_starts[np.searchsorted(group_starts, repeated, side="right") - 1]
    found = [(int(sorted_keys[i]), int(lines[order[f]]), int(lines[order[i]]))
             for i, f in zip(repeated, first)]
    return sorted(found, key=lambda item: item[2])


def read_pool(path: PathLike, cache_dir: PathLike | None = None) -> datasets.Dataset:
    """Validate a candidate-pool jsonl and return it as a memory-mapped `datasets.Dataset`.

    Taught in notebook 00. Columns: did, txt, img_path, modality, src_content (strings or None).
    The pool is streamed into an Arrow file under `cache_dir` (default: `default_cache_dir()`),
    so the 5.6M-candidate global pool is never held in Python lists; a later call with the same,
    unchanged file maps the cached Arrow file without re-reading the jsonl.
    """
    import datasets  # imported here: `datasets` is slow to import and only pools need it
    import pyarrow as pa

    path = Path(path)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    arrow_file = _pool_cache_file(path, cache_dir)
    if not arrow_file.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        schema = pa.schema([(name, pa.string()) for name in POOL_COLUMNS])
        out = AtomicFile(arrow_file, "wb")
        try:
            hashed = array("q")  # hash_did of every row, for the duplicate check
            lines = array("q")
            with pa.ipc.new_stream(out.file, schema) as writer:
                batch: dict[str, list] = {name: [] for name in POOL_COLUMNS}
                for line_no, record in iter_jsonl(path):
                    try:
                        row = candidate_from_record(record)
                        hashed.append(hash_did(row["did"]))
                    except ValueError as e:
                        raise MBEIRFormatError(path, line_no, str(e)) from None
                    lines.append(line_no)
                    for name in POOL_COLUMNS:
                        batch[name].append(row[name])
                    if len(batch["did"]) == _POOL_BATCH_ROWS:
                        writer.write_batch(pa.record_batch(batch, schema=schema))
                        batch = {name: [] for name in POOL_COLUMNS}
                if batch["did"] or not lines:
                    writer.write_batch(pa.record_batch(batch, schema=schema))
            duplicates = _duplicates(np.frombuffer(hashed, dtype=np.int64),
                                     np.frombuffer(lines, dtype=np.int64))
            if duplicates:
                key, first, again = duplicates[0]
                raise MBEIRFormatError(
                    path, again, f"duplicate did {unhash_did(key)!r} (first on line {first})"
                )
        except BaseException:
            out.discard()
            raise
        out.commit()
    return datasets.Dataset.from_file(str(arrow_file))


def pool_modalities(pool: datasets.Dataset) -> dict[str, str]:
    """did -> modality for a pool (a dict: meant for evaluation-sized pools)."""
    table = pool.data
    return dict(zip(table.column("did").to_pylist(), table.column("modality").to_pylist()))


# ---------------------------------------------------------------------------------------------
# Query instructions: instructions/query_instructions.tsv
# ---------------------------------------------------------------------------------------------

INSTRUCTION_HEADER: tuple[str, ...] = (
    "query_modality", "cand_modality", "dataset_name", "dataset_id",
    "prompt_1", "prompt_2", "prompt_3", "prompt_4",
)
InstructionKey = tuple[int, str, str]  # (dataset_id, query_modality, cand_modality)


def read_instructions(path: PathLike) -> dict[InstructionKey, list[str]]:
    """Read query_instructions.tsv as UniIR does: (dataset_id, query_modality, cand_modality) -> prompts.

    Taught in notebook 07. The header is skipped; columns 0, 1 and 3 form the key and the
    non-empty columns from 4 on are the prompts (raw text: format_string is applied at use).
    """
    table: dict[InstructionKey, list[str]] = {}
    key_line: dict[InstructionKey, int] = {}
    for line_no, line in decoded_lines(path):
        if line_no == 1:
            header = line.strip().split("\t")
            if header[:2] != ["query_modality", "cand_modality"] or header[3:4] != ["dataset_id"]:
                # UniIR skips the first line blindly; a file without it would silently lose a row.
                raise MBEIRFormatError(
                    path, 1, "expected the header 'query_modality<TAB>cand_modality<TAB>"
                             "dataset_name<TAB>dataset_id<TAB>prompt_1...'",
                )
            continue
        if not line.strip():
            continue
        parts = line.strip().split("\t")  # as UniIR's _load_query_instructions
        if len(parts) < 5:
            raise MBEIRFormatError(
                path, line_no,
                f"expected tab-separated query_modality, cand_modality, dataset_name, "
                f"dataset_id and at least one prompt; got {len(parts)} column(s)",
            )
        try:
            dataset_id = int(parts[3])
        except ValueError:
            raise MBEIRFormatError(
                path, line_no, f"dataset_id must be an integer, got {parts[3]!r}"
            ) from None
        try:
            _check_modality(parts[0], "query_modality")
            _check_modality(parts[1], "cand_modality")
        except ValueError as e:
            raise MBEIRFormatError(path, line_no, str(e)) from None
        prompts = [p for p in parts[4:] if p]  # never empty: strip() removed trailing tabs
        key = (dataset_id, parts[0], parts[1])
        if key in table:
            raise MBEIRFormatError(
                path, line_no, f"duplicate instructions for {key} (first on line {key_line[key]})"
            )
        table[key] = prompts
        key_line[key] = line_no
    if not table:
        raise MBEIRFormatError(path, None, "no instruction rows below the header")
    return table


InstructionRow = tuple[str, str, str, int, Sequence[str]]


def write_instructions(path: PathLike, rows: Iterable[InstructionRow]) -> None:
    """Write query_instructions.tsv in M-BEIR's format, atomically.

    `rows` is an iterable of `(query_modality, cand_modality, dataset_name, dataset_id, prompts)`,
    e.g. `("image,text", "image", "CIRR", 8, ["Retrieve a day-to-day image ...", ...])`.
    """
    rows = list(rows)
    width = max([4] + [len(row[4]) for row in rows])
    header = list(INSTRUCTION_HEADER[:4]) + [f"prompt_{i}" for i in range(1, width + 1)]
    lines = ["\t".join(header)]
    for query_modality, cand_modality, dataset_name, dataset_id, prompts in rows:
        _check_modality(query_modality, "query_modality")
        _check_modality(cand_modality, "cand_modality")
        cells = [query_modality, cand_modality, str(dataset_name), str(int(dataset_id)), *prompts]
        for cell in cells:
            if not cell or cell != cell.strip() or any(c in cell for c in "\t\r\n"):
                raise ValueError(f"instruction cell {cell!r} is empty, padded or holds a tab/newline")
        lines.append("\t".join(cells))
    write_text_atomic(path, "\n".join(lines) + "\n")
