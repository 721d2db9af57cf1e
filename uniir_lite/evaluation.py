"""UniIR's evaluation pipeline: embed, search, score, on local pools and on the global pool.

Used from notebook 00 on. A model enters as two functions:
- `embed_queries(queries: list[Query]) -> array [n, d]`, queries of one (dataset, task) pair;
- `embed_candidates(pool: datasets.Dataset) -> array [n, d]`, rows with did, txt, img_path, modality.
As UniIR does, each local pool is embedded once, and the global pool's embeddings are the
concatenation of the 16 local pools' (M-BEIR's global test pool is exactly that union).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from uniir_lite.data.mbeir import (
    EVAL_PAIRS,
    Pair,
    Qrels,
    Query,
    local_pool_path,
    qrels_path,
    query_path,
    read_pool,
    read_qrels,
    read_queries,
)
from uniir_lite.metrics import evaluate_pairs
from uniir_lite.retrieval import search_dids

EmbedQueries = Callable[[list[Query]], np.ndarray]
EmbedCandidates = Callable[..., np.ndarray]


@dataclasses.dataclass
class PairData:
    """One evaluation pair's queries, qrels and local pool (a memory-mapped dataset)."""

    pair: Pair
    queries: list[Query]
    qrels: Qrels
    pool: object  # datasets.Dataset


def load_pairs(root: str | Path, split: str = "test", pairs: Sequence[Pair] = EVAL_PAIRS) -> list[PairData]:
    """Read every requested pair that has files in `root` (a subset directory is fine)."""
    out = []
    for pair in pairs:
        qpath = query_path(root, split, pair.name)
        if not qpath.is_file():
            continue
        out.append(
            PairData(
                pair,
                read_queries(qpath),
                read_qrels(qrels_path(root, split, pair.name)),
                read_pool(local_pool_path(root, pair.name, split)),
            )
        )
    if not out:
        raise FileNotFoundError(f"{root}: no query files for split {split!r} (expected e.g. {query_path(root, split, pairs[0].name)})")
    return out


@dataclasses.dataclass
class Evaluation:
    """Per-pair results (`metrics.evaluate_pairs` format) and the ranked lists behind them."""

    results: list[dict]
    run: dict[str, list[tuple[str, float]]]


def _merged_qrels(data: list[PairData]) -> Qrels:
    qrels = Qrels(rel={}, task={})
    for d in data:
        qrels.rel.update(d.qrels.rel)
        qrels.task.update(d.qrels.task)
    return qrels


def evaluate(
    data: list[PairData],
    embed_queries: EmbedQueries,
    embed_candidates: EmbedCandidates,
    pool: str = "local",
    k: int = 10,
    backend: str = "torch",
) -> Evaluation:
    """Search each pair's queries in its local pool (`pool="local"`) or in the union of all the
    pools in `data` (`pool="global"`), then score with UniIR's Recall@k and the modality error."""
    if pool not in ("local", "global"):
        raise ValueError(f"pool must be 'local' or 'global', got {pool!r}")
    c_embs = [np.asarray(embed_candidates(d.pool), dtype=np.float32) for d in data]  # [n_cand_i, d] each
    did_modality = {}
    for d in data:
        did_modality.update(zip(d.pool["did"], d.pool["modality"]))
    run: dict[str, list[tuple[str, float]]] = {}
    if pool == "global":
        all_c = np.concatenate(c_embs)  # [n_global, d]
        all_dids = [did for d in data for did in d.pool["did"]]
    for d, c_emb in zip(data, c_embs):
        q_emb = np.asarray(embed_queries(d.queries), dtype=np.float32)  # [n_q, d]
        if pool == "global":
            ranked = search_dids(q_emb, all_c, all_dids, k, backend=backend)
        else:
            ranked = search_dids(q_emb, c_emb, list(d.pool["did"]), k, backend=backend)
        run.update({q.qid: r for q, r in zip(d.queries, ranked)})
    return Evaluation(evaluate_pairs(run, _merged_qrels(data), did_modality), run)


def average(results: list[dict], metric: str = "paper") -> float:
    """Plain mean over pairs, as the paper's "Average" column. `"paper"` takes each pair's metric
    of the paper: Recall@5, or Recall@10 for Fashion200K and FashionIQ."""
    values = [r["metrics"][_paper_metric(r) if metric == "paper" else metric] for r in results]
    return float(np.mean(values))


def _paper_metric(result: dict) -> str:
    k = next(p.metric_k for p in EVAL_PAIRS if p.dataset == result["dataset"] and p.task_id == result["task_id"])
    return f"recall@{k}"
