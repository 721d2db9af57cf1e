"""UniIR's evaluation pipeline: embed, search, score, on local pools and on the global pool.

Used from notebook 00 on. A model enters as two functions:
- `embed_queries(queries: list[Query]) -> array [n, d]`, queries of one (dataset, task) pair;
- `embed_candidates(pool: datasets.Dataset) -> array [n, d]`, rows with did, txt, img_path, modality.
As UniIR does, each local pool is embedded once, and the global pool's embeddings are the
concatenation of the 16 local pools' (M-BEIR's global test pool is exactly that union).

`evaluate` is the one evaluation; for a UniIR model (`uniir_lite.fusion.UniIRModel`), `embed_fns`
makes its two functions (instructions prefixed to the queries as UniIR does) and `evaluate_model`
runs `evaluate` with them on local and global pools.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

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
from uniir_lite.metrics import evaluate_pairs, recall_at_k_per_query
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


def paper_hits(ev: Evaluation, data: list[PairData]) -> dict[str, np.ndarray]:
    """`{pair name: per-query hit at the paper's k}` (1.0 when a positive is in the top k), in the
    order of each pair's queries: what `metrics.bootstrap_average` resamples for an interval."""
    out = {}
    for d in data:
        per_query = recall_at_k_per_query(ev.run, d.qrels.rel, d.pair.metric_k)
        out[d.pair.name] = np.array([per_query[q.qid] for q in d.queries if q.qid in per_query])
    return out


def average(results: list[dict], metric: str = "paper") -> float:
    """Plain mean over pairs, as the paper's "Average" column. `"paper"` takes each pair's metric
    of the paper: Recall@5, or Recall@10 for Fashion200K and FashionIQ."""
    values = [r["metrics"][_paper_metric(r) if metric == "paper" else metric] for r in results]
    return float(np.mean(values))


def _paper_metric(result: dict) -> str:
    k = next(p.metric_k for p in EVAL_PAIRS if p.dataset == result["dataset"] and p.task_id == result["task_id"])
    return f"recall@{k}"


# ---------------------------------------------------------------------------------------------
# A UniIR model's embedding functions
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def embed_dataset(model, dataset, collate, encode: Callable, batch_size: int, device,
                  num_workers: int = 0) -> np.ndarray:
    """[n, d] float32 embeddings of an `MBEIREmbedDataset`, in its order."""
    from uniir_lite.train import to_device

    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    out = [encode(to_device(side, device)).float().cpu() for side in loader]
    return torch.cat(out).numpy() if out else np.zeros((0, model.embed_dim), np.float32)


def embed_fns(
    model,
    cfg,
    root: str | Path,
    instructions: bool = True,
    policy: str = "random",
    seed: int | None = None,
    batch_size: int | None = None,
    split: str = "test",
):
    """`(embed_queries, embed_candidates)` of a UniIR model (`uniir_lite.fusion.UniIRModel`) for `evaluate`.

    Queries get their instruction exactly as UniIR: chosen for the modality of their positive
    candidates, prefixed to the text (`"<instruction> <query>"`), and an image-only query gets the
    instruction alone as its text. Candidates never get one.

    `policy="random"` is UniIR's evaluation (one random instruction per query, here drawn from
    `(seed, qid)` so a run repeats), `"fixed"` the qid-hashed choice. Candidate embeddings are
    cached per pool, so local and global evaluations embed each pool once.
    """
    from uniir_lite.data.mbeir import global_pool_path, pool_modalities
    from uniir_lite.data.torch_data import MBEIREmbedDataset, collator_for
    from uniir_lite.instructions import InstructionTable

    root = Path(root).resolve()
    seed = cfg.seed if seed is None else seed
    batch_size = batch_size or cfg.eval_batch_size
    collate = collator_for(model, root)
    table = InstructionTable.from_root(root) if instructions else None
    modality: dict[str, str] = {}
    cache: dict[str, np.ndarray] = {}

    def modality_of(did: str) -> str:
        if not modality:  # the union of the split's pools holds every positive
            modality.update(pool_modalities(read_pool(global_pool_path(root, split))))
        return modality[did]

    def embed_queries(queries) -> np.ndarray:
        dataset = MBEIREmbedDataset.from_queries(list(queries), root=root, instructions=table,
                                                 modality_of=modality_of if table else None,
                                                 policy=policy, seed=seed)
        return embed_dataset(model, dataset, collate, model.encode_query, batch_size, cfg.device, cfg.num_workers)

    def embed_candidates(pool) -> np.ndarray:
        key = getattr(pool, "_fingerprint", None) or str(id(pool))
        if key not in cache:
            dataset = MBEIREmbedDataset.from_pool(pool, root=root)
            cache[key] = embed_dataset(model, dataset, collate, model.encode_candidate, batch_size, cfg.device,
                                       cfg.num_workers)
        return cache[key]

    return embed_queries, embed_candidates


def evaluate_model(model, cfg, root: str | Path, data: list[PairData], instructions: bool = True,
                   policy: str = "random", seed: int | None = None,
                   pools: tuple[str, ...] = ("local", "global")) -> dict[str, Evaluation]:
    """{pool: `Evaluation`} of a UniIR model on `data` (from `load_pairs`): `evaluate` with its
    `embed_fns`, embedding each candidate pool once for all `pools`."""
    embed_queries, embed_candidates = embed_fns(model, cfg, root, instructions, policy, seed)
    return {pool: evaluate(data, embed_queries, embed_candidates, pool=pool) for pool in pools}


def chance_level(data: list[PairData]) -> dict[str, float]:
    """Expected paper metric (Recall@5, or @10 for the fashion sets) of a random ranking, per pair:
    the mean over queries of 1 - C(N - P, k) / C(N, k) for a local pool of N with P positives
    (`uniir_lite.metrics.chance_recall`)."""
    from uniir_lite.metrics import chance_recall

    return {d.pair.name: chance_recall(d) for d in data}
