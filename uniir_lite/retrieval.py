"""Exact retrieval: cosine top-k search, TREC run files and embeddings on disk.

Used from notebook 00 on. UniIR indexes L2-normalised embeddings in a
faiss `Flat` index with inner-product metric, i.e. exact cosine similarity; `search` does the same
either with faiss (`IndexFlatIP`) or with chunked torch matmuls that never hold the full
[n_queries, n_candidates] score matrix, so a 5.6M-candidate pool streams through a GPU (or CPU).
Both backends rank by score (descending) and break exact ties by candidate index (ascending).

The torch backend screens in half precision and rescores in float32 by default (`screen="auto"`):
a fp16 (GPU) or bf16 (CPU with native bf16 dot products) matmul picks a shortlist per query, the
shortlist is rescored in float32, and an error bound on the half-precision scores proves that no
candidate outside the shortlist can be in the top k; rows where the proof fails are searched again
in float32. Same results as the float32 search, 2-10x less matmul time (`benchmarks/`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from uniir_lite.data.mbeir import MBEIRFormatError, decoded_lines
from uniir_lite.io import atomic_open

PathLike = str | os.PathLike[str]
Embeddings = np.ndarray | torch.Tensor
Ranked = list[tuple[str, float]]  # one query's results: (did, score), best first

# ---------------------------------------------------------------------------------------------
# Exact top-k search
# ---------------------------------------------------------------------------------------------


def _rows(emb: Embeddings, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) as a float32 CPU/GPU tensor; only this slice is copied (fp16 shards stay fp16)."""
    if isinstance(emb, torch.Tensor):
        return emb[start:stop].float()
    return torch.from_numpy(np.array(emb[start:stop], dtype=np.float32))


def _check_shapes(q_emb: Embeddings, c_emb: Embeddings, k: int) -> None:
    if q_emb.ndim != 2 or c_emb.ndim != 2:
        raise ValueError(
            f"embeddings must be 2-D [n, embed_dim]; got queries {tuple(q_emb.shape)}, "
            f"candidates {tuple(c_emb.shape)}"
        )
    if q_emb.shape[1] != c_emb.shape[1]:
        raise ValueError(
            f"queries have embed_dim {q_emb.shape[1]} but candidates {c_emb.shape[1]}"
        )
    if c_emb.shape[0] == 0:
        raise ValueError("the candidate pool is empty")
    if c_emb.shape[0] >= 2**32:
        raise ValueError("at most 2**32 - 1 candidates per search")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")


def _tie_break_keys(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pack (score, candidate index) into one int64 whose order is score desc, then index asc.

    torch.topk does not say which of several equal scores it keeps. Unique keys make the result
    deterministic: the high 32 bits are the float32 score mapped to an order-preserving int32
    (negative floats have their magnitude bits flipped), the low 32 bits are 2**32 - 1 - index.
    """
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return (ordered << 32) + (0xFFFFFFFF - idx)


def _unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of _tie_break_keys: (float32 scores, int64 indices)."""
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.view(torch.float32), 0xFFFFFFFF - (keys & 0xFFFFFFFF)


def _chunk_top_k(scores: torch.Tensor, c_idx: torch.Tensor, k: int) -> torch.Tensor:
    """Packed keys of the k best candidates of one chunk: [qb, cb] scores -> [qb, min(k, cb)].

    A float topk is cheap; only rows where equal scores straddle the k-th place (where topk may
    keep any of the tied candidates) are redone on the packed keys of the whole row.
    """
    if scores.shape[1] <= k:
        return _tie_break_keys(scores, c_idx.expand_as(scores))
    vals, pos = scores.topk(k + 1, dim=1)  # [qb, k + 1]
    keys = _tie_break_keys(vals[:, :k], c_idx[pos[:, :k]])  # [qb, k]
    tied = (vals[:, k - 1] == vals[:, k]).nonzero().squeeze(1)  # [n_tied]
    if len(tied):
        keys[tied] = _tie_break_keys(scores[tied], c_idx.expand(len(tied), -1)).topk(k, dim=1).values
    return keys


def _search_torch(
    q_emb: Embeddings,
    c_emb: Embeddings,
    k: int,
    chunk_size: int,
    query_chunk_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[np.ndarray, np.ndarray]:
    n_q, n_c = q_emb.shape[0], c_emb.shape[0]
    # Queries are normalised once and stay on the device; candidates stream through in chunks,
    # each moved to the device once, and a running top-k per query is merged chunk by chunk.
    q_norm = torch.cat(
        [
            F.normalize(_rows(q_emb, s, s + query_chunk_size).to(device), dim=-1).to(dtype)
            for s in range(0, n_q, query_chunk_size)
        ]
    )  # [n_q, embed_dim]
    best = torch.empty((n_q, 0), dtype=torch.int64, device=device)  # [n_q, <=k] packed keys
    for c_start in range(0, n_c, chunk_size):
        c_chunk = F.normalize(_rows(c_emb, c_start, c_start + chunk_size).to(device), dim=-1)
        c_chunk = c_chunk.to(dtype)  # [cb, embed_dim]
        c_idx = torch.arange(c_start, c_start + c_chunk.shape[0], device=device)  # [cb]
        merged = []
        for q_start in range(0, n_q, query_chunk_size):
            scores = q_norm[q_start : q_start + query_chunk_size] @ c_chunk.T  # [qb, cb]
            keys = torch.cat(
                [best[q_start : q_start + query_chunk_size], _chunk_top_k(scores, c_idx, k)], dim=1
            )  # [qb, <=2k]
            merged.append(keys.topk(min(k, keys.shape[1]), dim=1).values)  # [qb, <=k]
        best = torch.cat(merged)
    scores, idx = _unpack_keys(best)  # topk sorted the keys, so rows are best first
    return scores.cpu().numpy(), idx.cpu().numpy()


# Half-precision screening. For unit vectors q, c rounded to a format of unit roundoff u, a dot
# product accumulated in float32 over d terms and rounded to that format on output is within
#     3u + u^2 + 2 d 2^-24
# of the exact score (input rounding 2u + u^2 by Cauchy-Schwarz; output rounding u; float32
# accumulation and fp16 subnormals below d 2^-24 each). SCREEN_SAFETY's extra quarter covers the
# rounding of the float32 rescoring (another d 2^-24) and norms of 1 +- 1e-6.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SCREEN_SAFETY = 1.25
# Shortlist length beyond k. The float32 k-th score must clear the shortlist's last screened score
# by the bound; with 64 extra that fails for ~2% of queries with bf16 on random 768-d vectors in a
# 100k pool (they are searched again in float32) and for almost none with the 8x finer fp16.
SCREEN_EXTRA = 64
RESCORE_ELEMENTS = 2**24  # float32 elements gathered per rescoring step (64 MB)


def screen_error(dtype: torch.dtype, embed_dim: int) -> float:
    """Bound on |score in `dtype` - float32 score| for unit vectors of `embed_dim` (see above)."""
    u = UNIT_ROUNDOFF[dtype]
    return SCREEN_SAFETY * (3 * u + u * u + 2 * embed_dim * 2.0**-24)


def auto_screen_dtype(device: torch.device) -> torch.dtype | None:
    """fp16 on CUDA (tensor cores; finer than bf16); bf16 on a CPU with native bf16 dot products
    (AVX512-BF16 or AMX), where it is about twice as fast as float32; else None (float32 only)."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        try:
            native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        except AttributeError:  # pragma: no cover - older torch
            native = False
        return torch.bfloat16 if native else None
    return None


@contextlib.contextmanager
def _ieee_matmuls(device: torch.device) -> Iterator[None]:
    """What the error bound assumes of cuBLAS: float32 matmuls in full float32 (no TF32) and
    fp16/bf16 matmuls that do not reduce split-K partial sums in half precision."""
    flags = ("allow_tf32", "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
    m = torch.backends.cuda.matmul
    saved = {f: getattr(m, f) for f in flags} if device.type == "cuda" else {}
    for f, value in saved.items():
        if value:
            setattr(m, f, False)
    try:
        yield
    finally:
        for f, value in saved.items():
            if value:
                setattr(m, f, value)


def _gather_rows(emb: Embeddings, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows `idx` [qb, K] of `emb` as float32 on `device`: [qb, K, embed_dim]."""
    if isinstance(emb, torch.Tensor):
        rows = emb.index_select(0, idx.to(emb.device).reshape(-1))
    else:
        rows = torch.from_numpy(np.asarray(emb[idx.cpu().numpy().reshape(-1)]))
    return rows.to(device).float().view(*idx.shape, -1)


def _search_screened(
    q_emb: Embeddings,
    c_emb: Embeddings,
    k: int,
    chunk_size: int,
    query_chunk_size: int,
    device: torch.device,
    screen: torch.dtype,
    stats: dict | None,
) -> tuple[np.ndarray, np.ndarray]:
    n_q, n_c, embed_dim = q_emb.shape[0], c_emb.shape[0], c_emb.shape[1]
    width = min(k + SCREEN_EXTRA, n_c)  # shortlist length K
    q32 = torch.cat(
        [F.normalize(_rows(q_emb, s, s + query_chunk_size).to(device), dim=-1) for s in range(0, n_q, query_chunk_size)]
    )  # [n_q, embed_dim] float32
    q_lo = q32.to(screen)
    # 1. Screen: a running top-K per query of the half-precision scores.
    best_s = torch.empty((n_q, 0), dtype=screen, device=device)  # [n_q, <=K]
    best_i = torch.empty((n_q, 0), dtype=torch.int64, device=device)  # [n_q, <=K]
    with _ieee_matmuls(device):
        for c_start in range(0, n_c, chunk_size):
            c_lo = F.normalize(_rows(c_emb, c_start, c_start + chunk_size).to(device), dim=-1).to(screen)  # [cb, d]
            new_s, new_i = [], []
            for q_start in range(0, n_q, query_chunk_size):
                rows = slice(q_start, q_start + query_chunk_size)
                scores = q_lo[rows] @ c_lo.T  # [qb, cb] in the screening dtype
                top = scores.topk(min(width, scores.shape[1]), dim=1)
                s = torch.cat([best_s[rows], top.values], dim=1)  # [qb, <=2K]
                i = torch.cat([best_i[rows], top.indices + c_start], dim=1)
                keep = s.topk(min(width, s.shape[1]), dim=1)
                new_s.append(keep.values)
                new_i.append(i.gather(1, keep.indices))
            best_s, best_i = torch.cat(new_s), torch.cat(new_i)
    # 2. Rescore the shortlist in float32; 3. prove that nothing outside it reaches the top k.
    bound = screen_error(screen, embed_dim)
    out_keys, proven = [], []
    step = max(1, RESCORE_ELEMENTS // (width * embed_dim))
    for q_start in range(0, n_q, step):
        rows = slice(q_start, q_start + step)
        cand = _gather_rows(c_emb, best_i[rows], device)  # [qb, K, d], not normalised
        with _ieee_matmuls(device):
            dots = torch.bmm(cand, q32[rows, :, None]).squeeze(-1)  # [qb, K] float32
        exact = dots / cand.norm(dim=-1).clamp_min(1e-12)  # [qb, K]: F.normalize's cosine
        keys = _tie_break_keys(exact, best_i[rows]).topk(min(k, width), dim=1).values  # [qb, k]
        kth_score = _unpack_keys(keys[:, -1])[0]  # [qb]
        # every candidate outside the shortlist scores at most (its screened score) + bound
        outside_max = best_s[rows, -1].float() + bound  # [qb]
        proven.append(torch.full_like(kth_score, True, dtype=torch.bool) if width == n_c else outside_max < kth_score)
        out_keys.append(keys)
    keys, proven = torch.cat(out_keys), torch.cat(proven)
    scores, idx = (t.cpu().numpy() for t in _unpack_keys(keys))
    redo = (~proven).nonzero().squeeze(1).cpu().numpy()  # [n_redo]
    if len(redo):
        q_redo = q_emb[torch.from_numpy(redo).to(q_emb.device)] if isinstance(q_emb, torch.Tensor) else q_emb[redo]
        scores[redo], idx[redo] = _search_torch(q_redo, c_emb, k, chunk_size, query_chunk_size, device, torch.float32)
    if stats is not None:
        stats.update(screen=str(screen).removeprefix("torch."), shortlist=width, bound=bound,
                     rows=n_q, rows_redone=len(redo))
    return scores, idx


def _search_faiss(
    q_emb: Embeddings, c_emb: Embeddings, k: int, chunk_size: int
) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    embed_dim, n_c = c_emb.shape[1], c_emb.shape[0]
    index = faiss.IndexFlatIP(embed_dim)  # UniIR's "Flat" + METRIC_INNER_PRODUCT
    for start in range(0, n_c, chunk_size):
        index.add(F.normalize(_rows(c_emb, start, start + chunk_size).cpu(), dim=-1).numpy())
    q_norm = F.normalize(_rows(q_emb, 0, q_emb.shape[0]).cpu(), dim=-1).numpy()  # [n_q, embed_dim]
    k = min(k, n_c)
    out_scores = np.empty((len(q_norm), k), dtype=np.float32)  # [n_q, k]
    out_idx = np.empty((len(q_norm), k), dtype=np.int64)  # [n_q, k]
    # faiss does not order tied scores by index, nor say which of them it keeps at the k-th place.
    # We fetch one extra result: if it ties with the k-th, the tie may go on past the window, so
    # those rows are searched again with twice the window until the tie ends inside it (or the
    # window is the whole pool). Then each row is sorted by (score desc, index asc).
    rows, fetch = np.arange(len(q_norm)), min(k + 1, n_c)
    while len(rows):
        scores, idx = index.search(q_norm[rows], fetch)  # [n_rows, fetch] each
        open_tie = (scores[:, k - 1] == scores[:, -1]) if fetch < n_c else np.zeros(len(rows), dtype=bool)
        done = ~open_tie
        order = np.lexsort((idx[done], -scores[done]), axis=1)[:, :k]
        out_scores[rows[done]] = np.take_along_axis(scores[done], order, axis=1)
        out_idx[rows[done]] = np.take_along_axis(idx[done], order, axis=1)
        rows, fetch = rows[open_tie], min(2 * fetch, n_c)
    return out_scores, out_idx


@torch.no_grad()
def search(
    q_emb: Embeddings,
    c_emb: Embeddings,
    k: int,
    backend: Literal["torch", "faiss"] = "torch",
    chunk_size: int | None = None,
    query_chunk_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    screen: torch.dtype | Literal["auto"] | None = "auto",
    stats: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k: for each query the k candidates with the largest inner product.

    Both inputs are L2-normalised here (in float32), so raw, unnormalised
    embeddings (e.g. UniIR's summed score-fusion embeddings) and fp16 shards can be passed as they
    are, as numpy arrays or torch tensors. Returns numpy `(scores, idx)`, both
    [n_queries, min(k, n_candidates)], float32 and int64, each row best first; equal scores are
    ordered by candidate index ascending in both backends, also at the k-th place. "Equal" means
    equal as computed: float32 matmul kernels may round mathematically equal scores (say of two
    identical candidates) differently, so on real embeddings the backends agree up to that rounding.

    - `backend="torch"`: chunked over candidates (`chunk_size` rows at a time; default 16384 on
      CPU, 65536 on GPU) and queries (`query_chunk_size`; default 1024 on CPU, 4096 on GPU), with a
      running top-k merge; runs on `device` (default: the device of `q_emb` if it is a tensor, else
      CPU). With `dtype=float32` (the default) results are exact; `screen` ("auto": fp16 on GPU,
      bf16 on CPUs with native bf16, else none) is the half-precision dtype of the shortlist pass
      described in the module docstring, `None` for float32 matmuls only. `stats` (a dict), if
      given, receives how many query rows the screen could not settle. `dtype=bf16/fp16` instead
      ranks by half-precision scores alone: faster, not exact (scores change in the 3rd decimal).
    - `backend="faiss"`: a CPU `faiss.IndexFlatIP`, as UniIR (`device` and `dtype` must be left as is).
    """
    _check_shapes(q_emb, c_emb, k)
    if device is None:
        device = q_emb.device if isinstance(q_emb, torch.Tensor) and backend == "torch" else "cpu"
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    # a GPU wants larger matmuls; 4096 x 65536 float32 scores are 1 GiB
    chunk_size = chunk_size if chunk_size is not None else (65536 if on_gpu else 16384)
    query_chunk_size = query_chunk_size if query_chunk_size is not None else (4096 if on_gpu else 1024)
    if chunk_size < 1 or query_chunk_size < 1:
        raise ValueError("chunk_size and query_chunk_size must be at least 1")
    if q_emb.shape[0] == 0:
        width = min(k, c_emb.shape[0])
        return np.empty((0, width), dtype=np.float32), np.empty((0, width), dtype=np.int64)
    if backend == "faiss":
        if device.type != "cpu" or dtype != torch.float32:
            raise ValueError("the faiss backend runs on CPU in float32; use backend='torch' for GPU or bf16")
        return _search_faiss(q_emb, c_emb, k, chunk_size)
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}; use 'torch' or 'faiss'")
    if screen == "auto":
        screen = auto_screen_dtype(device)
    if screen is not None and screen not in UNIT_ROUNDOFF:
        raise ValueError(f"screen must be 'auto', None, torch.float16 or torch.bfloat16; got {screen!r}")
    if screen is not None and dtype == torch.float32 and c_emb.shape[0] > k + SCREEN_EXTRA:
        return _search_screened(q_emb, c_emb, k, chunk_size, query_chunk_size, device, screen, stats)
    if stats is not None:
        stats.update(screen=None, rows=q_emb.shape[0], rows_redone=0)
    return _search_torch(q_emb, c_emb, k, chunk_size, query_chunk_size, device, dtype)


def search_dids(
    q_emb: Embeddings,
    c_emb: Embeddings,
    c_dids: Sequence[str],
    k: int,
    **search_kwargs,
) -> list[Ranked]:
    """`search`, with row indices mapped back to candidate dids: one [(did, score), ...] per query.

    `search_kwargs` go to `search` (backend, chunk_size, device, dtype).
    """
    if len(c_dids) != c_emb.shape[0]:
        raise ValueError(f"{len(c_dids)} dids for {c_emb.shape[0]} candidate embeddings")
    scores, idx = search(q_emb, c_emb, k, **search_kwargs)
    return [
        [(c_dids[i], s) for i, s in zip(row_idx.tolist(), row_scores.tolist())]
        for row_idx, row_scores in zip(idx, scores)
    ]


# ---------------------------------------------------------------------------------------------
# TREC run files
# ---------------------------------------------------------------------------------------------


def _check_token(value: str, what: str) -> None:
    """Ids go in whitespace-separated files: they must be non-empty and hold no whitespace."""
    if not value or any(ch.isspace() for ch in value):
        raise ValueError(f"{what} {value!r} must be non-empty and without whitespace")


def write_run(
    path: PathLike,
    qids: Sequence[str],
    ranked: Sequence[Sequence[tuple[str, float]]],
    run_id: str,
    task_ids: Sequence[int] | None = None,
) -> None:
    """Write a TREC run file, one line per result: `qid Q0 did rank score run_id [task_id]`.

    `ranked[i]` holds query `qids[i]`'s (did, score) results, best first;
    ranks are 1-based. With `task_ids` (one per query) each line ends with UniIR's extra task-id
    column; standard TREC readers (ir_measures' among them) expect the 6-column form, so leave
    `task_ids` out for files other tools read. The file is written atomically.
    """
    if len(ranked) != len(qids):
        raise ValueError(f"{len(qids)} qids but {len(ranked)} ranked lists")
    if task_ids is not None and len(task_ids) != len(qids):
        raise ValueError(f"{len(qids)} qids but {len(task_ids)} task ids")
    _check_token(run_id, "run_id")
    with atomic_open(Path(path), "w") as f:
        for i, (qid, results) in enumerate(zip(qids, ranked)):
            _check_token(qid, "qid")
            task_col = "" if task_ids is None else f" {int(task_ids[i])}"
            for rank, (did, score) in enumerate(results, start=1):
                _check_token(did, "did")
                # 9 significant digits round-trip a float32 score exactly.
                f.write(f"{qid} Q0 {did} {rank} {float(score):.9g} {run_id}{task_col}\n")


def read_run(path: PathLike) -> dict[str, Ranked]:
    """Read a TREC run file (6 columns, or 7 with UniIR's task id) into {qid: [(did, score), ...]}.

    Each list is sorted by the file's rank column. A malformed line, a
    repeated rank or a did listed twice for one query raises `MBEIRFormatError` ("path:line: ...").
    """
    rows: dict[str, list[tuple[int, str, float]]] = {}
    seen: dict[tuple[str, str], int] = {}
    ranks: dict[tuple[str, int], int] = {}
    for line_no, line in decoded_lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (6, 7):
            raise MBEIRFormatError(
                path, line_no,
                f"expected 6 columns 'qid Q0 did rank score run_id' (or 7 with task_id), "
                f"got {len(parts)}",
            )
        qid, _, did, rank_str, score_str = parts[:5]
        try:
            rank = int(rank_str)
        except ValueError:
            raise MBEIRFormatError(path, line_no, f"rank must be an integer, got {rank_str!r}") from None
        if rank < 1:
            raise MBEIRFormatError(path, line_no, f"rank must be 1 or more, got {rank}")
        try:
            score = float(score_str)
        except ValueError:
            raise MBEIRFormatError(path, line_no, f"score must be a number, got {score_str!r}") from None
        if len(parts) == 7:
            try:
                int(parts[6])
            except ValueError:
                raise MBEIRFormatError(
                    path, line_no, f"task_id must be an integer, got {parts[6]!r}"
                ) from None
        if (qid, did) in seen:
            raise MBEIRFormatError(
                path, line_no, f"did {did} is listed twice for qid {qid} (first on line {seen[qid, did]})"
            )
        if (qid, rank) in ranks:
            raise MBEIRFormatError(
                path, line_no, f"rank {rank} is used twice for qid {qid} (first on line {ranks[qid, rank]})"
            )
        seen[qid, did] = ranks[qid, rank] = line_no
        rows.setdefault(qid, []).append((rank, did, score))
    return {qid: [(did, score) for _, did, score in sorted(results)] for qid, results in rows.items()}


# ---------------------------------------------------------------------------------------------
# Embeddings on disk
# ---------------------------------------------------------------------------------------------


def ids_path(path: PathLike) -> Path:
    """Where `save_embeddings` puts the ids of `path`: `x.npy` -> `x.ids.txt`."""
    return Path(path).with_suffix(".ids.txt")


def save_embeddings(path: PathLike, emb: Embeddings, ids: Sequence[str]) -> None:
    """Save embeddings as an fp16 `.npy` ([n, embed_dim], as UniIR's embedder) and their ids.

    The ids (qids or dids, one per row) go to `ids_path(path)`, one a line.
    Both files are written atomically.
    """
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"{path}: embeddings are saved as .npy; name the file *.npy")
    if isinstance(emb, torch.Tensor):
        emb = emb.detach().cpu().numpy()
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise ValueError(
            f"{path}: need [n, embed_dim] embeddings and n ids; got {emb.shape} and {len(ids)} ids"
        )
    for i in ids:
        _check_token(i, f"{path}: id")
    with atomic_open(ids_path(path), "w") as f:
        f.writelines(f"{i}\n" for i in ids)
    with atomic_open(path, "wb") as f:
        np.save(f, np.asarray(emb, dtype=np.float16))


def load_embeddings(path: PathLike, mmap: bool = False) -> tuple[np.ndarray, list[str]]:
    """Load what `save_embeddings` wrote: (fp16 [n, embed_dim] array, n ids).

    `mmap=True` memory-maps the array, so a large pool is read lazily by
    `search` chunk by chunk.
    """
    path = Path(path)
    emb = np.load(path, mmap_mode="r" if mmap else None)
    ids = ids_path(path).read_text(encoding="utf-8").splitlines()
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise MBEIRFormatError(
            ids_path(path), None, f"{len(ids)} ids for embeddings of shape {emb.shape} in {path}"
        )
    return emb, ids

