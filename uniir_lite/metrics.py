"""Metrics: UniIR's Recall@k, standard IR measures, the modality-error rate and the paper's table.

Taught in notebook 00. A run is `{qid: [(did, score), ...]}` with results best first (as
`retrieval.read_run` and `retrieval.search_dids` give them); `qrels_rel` is `{qid: {did: relevance}}`
(as `data.mbeir.read_qrels(...).rel`). Every average is over the queries of the qrels that have at
least one positive (relevance > 0); a query missing from the run scores 0.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import ir_measures
import numpy as np
import pandas as pd

from uniir_lite.data.mbeir import (
    EVAL_PAIRS,
    TASKS,
    MBEIRFormatError,
    Qrels,
    parse_id,
    pool_modalities,
    read_pool,
    read_qrels,
)
from uniir_lite.retrieval import read_run

Run = Mapping[str, Sequence[tuple[str, float]]]
QrelsRel = Mapping[str, Mapping[str, int]]


def _positives(qrels_rel: QrelsRel) -> dict[str, set[str]]:
    """{qid: set of positive dids} for the queries that have at least one positive."""
    positives = {qid: {did for did, r in rels.items() if r > 0} for qid, rels in qrels_rel.items()}
    positives = {qid: dids for qid, dids in positives.items() if dids}
    if not positives:
        raise ValueError("the qrels hold no query with a positive (relevance > 0)")
    return positives


def _top_k(run: Run, qid: str, k: int | None) -> list[str]:
    """The first k dids (all if k is None) retrieved for `qid`; none if it is absent from the run."""
    dids = [did for did, _ in run.get(qid, ())]
    if len(set(dids)) != len(dids):
        raise ValueError(f"the run lists a did twice for qid {qid}")
    return dids[:k]


def _mean(values: Mapping[str, float]) -> float:
    return sum(values.values()) / len(values)


# ---------------------------------------------------------------------------------------------
# UniIR's Recall@k (a hit rate)
# ---------------------------------------------------------------------------------------------


def recall_at_k_per_query(run: Run, qrels_rel: QrelsRel, k: int) -> dict[str, float]:
    """UniIR's Recall@k per query: 1.0 if ANY positive is among the top k, else 0.0.

    Taught in notebook 00. This is `compute_recall_at_k` of UniIR's mbeir_retriever.py, i.e.
    trec_eval's `success.k` (Success@k), not its fractional `recall.k`.
    """
    return {
        qid: float(not positives.isdisjoint(_top_k(run, qid, k)))
        for qid, positives in _positives(qrels_rel).items()
    }


def recall_at_k(run: Run, qrels_rel: QrelsRel, k: int) -> float:
    """UniIR's Recall@k averaged over the queries of the qrels: the number the paper reports.

    Taught in notebook 00.
    """
    return _mean(recall_at_k_per_query(run, qrels_rel, k))


def chance_recall(d, k: int | None = None) -> float:
    """Expected UniIR Recall@k of a random ranking of one loaded pair `d` (from
    `uniir_lite.evaluation.load_pairs`): the mean over its queries of 1 - C(N - P, k) / C(N, k)
    for a pool of N candidates of which P are the query's positives. `k` defaults to the pair's
    paper metric (`d.pair.metric_k`). Taught in notebook 00.
    """
    from math import comb

    import numpy as np

    n = len(d.pool)
    k = d.pair.metric_k if k is None else k
    if k >= n:  # every candidate is retrieved
        return 1.0
    return float(np.mean([1 - comb(n - len(q.pos), k) / comb(n, k) for q in d.queries]))


def diagonal_recall_at_k(scores, k: int) -> float:
    """UniIR's Recall@k of a [n_queries, n_candidates] score matrix (a torch tensor or numpy array)
    whose positives are on the diagonal: query i's only positive is candidate i.

    Computed through `recall_at_k` on the top-k run, so ties are broken as `scores.topk` breaks them.
    """
    import torch

    scores = torch.as_tensor(scores)
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    run = {f"q{i}": [(f"c{j}", float(s)) for j, s in zip(idx.tolist(), val.tolist())]
           for i, (val, idx) in enumerate(zip(top.values, top.indices))}
    return recall_at_k(run, {f"q{i}": {f"c{i}": 1} for i in range(scores.shape[0])}, k)


def diagonal_hits(scores, k: int) -> np.ndarray:
    """[n_queries] 1.0 where query i's only positive, candidate i, is in its top k (ties broken as
    `scores.topk` breaks them): the per-query hits behind `diagonal_recall_at_k`, which intervals
    (`wilson_interval`, `bootstrap_average`) resample."""
    import torch

    scores = torch.as_tensor(scores)
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # [n, k]
    return (top == torch.arange(scores.shape[0])[:, None]).any(dim=1).double().numpy()


# ---------------------------------------------------------------------------------------------
# Standard measures through an independent library (ir_measures, backend pytrec_eval)
# ---------------------------------------------------------------------------------------------


def ir_measures_per_query(run: Run, qrels_rel: QrelsRel, measure: str) -> dict[str, float]:
    """Per-query values of an ir_measures measure such as "R@5", "nDCG@10" or "Success@5".

    trec_eval re-sorts a run by score and breaks ties by docid, which
    could reorder our ranking; we hand it scores n, n-1, ..., 1 taken from our rank order, so it
    sees exactly our ranking.
    """
    positives = _positives(qrels_rel)
    ir_qrels = {qid: {did: int(qrels_rel[qid][did]) for did in dids} for qid, dids in positives.items()}
    ir_run = {}
    for qid in positives:
        dids = _top_k(run, qid, None)
        if dids:
            ir_run[qid] = {did: float(len(dids) - rank) for rank, did in enumerate(dids)}
    values = dict.fromkeys(positives, 0.0)
    for metric in ir_measures.pytrec_eval.iter_calc([ir_measures.parse_measure(measure)], ir_qrels, ir_run):
        values[metric.query_id] = float(metric.value)
    return values


def fractional_recall_at_k(run: Run, qrels_rel: QrelsRel, k: int) -> float:
    """trec_eval's recall.k: |positives in top k| / |positives|, averaged (ir_measures `R@k`).

    Never above UniIR's Recall@k; lower on multi-positive pairs such as
    MSCOCO image->text (5 captions per image).
    """
    return _mean(ir_measures_per_query(run, qrels_rel, f"R@{k}"))


def ndcg_at_k(run: Run, qrels_rel: QrelsRel, k: int) -> float:
    """nDCG@k (ir_measures `nDCG@k`, trec_eval's ndcg_cut.k), averaged."""
    return _mean(ir_measures_per_query(run, qrels_rel, f"nDCG@{k}"))


# ---------------------------------------------------------------------------------------------
# Modality errors
# ---------------------------------------------------------------------------------------------


def _canonical_modality(modality: str) -> str:
    # "text,image" (the HF card's spelling) and "image,text" (the files') are the same modality.
    return ",".join(sorted(modality.split(",")))


def modality_error_at_k(
    run: Run, qrels_rel: QrelsRel, did_modality: Mapping[str, str], k: int
) -> float:
    """Share of retrieved top-k results whose modality is not the modality the query asks for.

    Taught in notebook 07. The paper shows modality errors (e.g. a caption retrieved for a
    text->image query) but reports no such number; this rate is the kit's own definition. The
    wanted modality of a query is that of its positives; if they have several modalities, a
    result is an error when its modality is none of them. The rate is pooled over all retrieved
    top-k results of the qrels' queries (the mean of per-query rates when every query has k
    results); 0.0 when nothing was retrieved.
    """

    def modality_of(did: str, qid: str) -> str:
        if did not in did_modality:
            raise ValueError(f"did {did} (qid {qid}) is not in the candidate pool")
        return _canonical_modality(did_modality[did])

    errors = results = 0
    for qid, positives in _positives(qrels_rel).items():
        wanted = {modality_of(did, qid) for did in positives}
        retrieved = [modality_of(did, qid) for did in _top_k(run, qid, k)]
        errors += sum(modality not in wanted for modality in retrieved)
        results += len(retrieved)
    return errors / results if results else 0.0


# ---------------------------------------------------------------------------------------------
# The 16 (dataset, task) pairs and the paper's table
# ---------------------------------------------------------------------------------------------


def evaluate_pairs(
    run: Run, qrels: Qrels, did_modality: Mapping[str, str] | None = None
) -> list[dict]:
    """Score a run on each of M-BEIR's 16 (dataset, task) pairs that the qrels hold.

    A query belongs to the pair given by its qid's dataset prefix ("9:6"
    -> MSCOCO) and its qrels task id, so one qrels file may hold several pairs (as in a global
    evaluation). Returns, in the paper's row order and leaving out pairs without queries:
    `{"dataset", "task_id", "n_queries", "metrics": {"recall@1", "recall@5", "recall@10",
    "fractional_recall@5", "ndcg@10"[, "modality_error@5" when did_modality is given]}}`,
    every metric a fraction in [0, 1].
    """
    pair_index = {(pair.dataset_id, pair.task_id): i for i, pair in enumerate(EVAL_PAIRS)}
    by_pair: dict[int, dict[str, Mapping[str, int]]] = {}
    for qid, rels in qrels.rel.items():
        if qid not in qrels.task:
            raise ValueError(f"qid {qid} has no task id; use UniIR's 5-column qrels (qid 0 did 1 task_id)")
        dataset_id, _ = parse_id(qid)
        key = (dataset_id, qrels.task[qid])
        if key not in pair_index:
            raise ValueError(
                f"qid {qid} with task id {key[1]} is not one of the 16 M-BEIR evaluation pairs"
            )
        by_pair.setdefault(pair_index[key], {})[qid] = rels

    results = []
    for i, pair in enumerate(EVAL_PAIRS):
        pair_rel = by_pair.get(i)
        if not pair_rel:
            continue
        metrics = {
            "recall@1": recall_at_k(run, pair_rel, 1),
            "recall@5": recall_at_k(run, pair_rel, 5),
            "recall@10": recall_at_k(run, pair_rel, 10),
            "fractional_recall@5": fractional_recall_at_k(run, pair_rel, 5),
            "ndcg@10": ndcg_at_k(run, pair_rel, 10),
        }
        if did_modality is not None:
            metrics["modality_error@5"] = modality_error_at_k(run, pair_rel, did_modality, 5)
        results.append(
            {
                "dataset": pair.dataset,
                "task_id": pair.task_id,
                "n_queries": len(_positives(pair_rel)),
                "metrics": metrics,
            }
        )
    return results


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % (z = 1.96) Wilson score interval of a hit rate `p` measured on `n` queries.

    Taught in notebook 00. Unlike p +- 2 s.e. it stays inside [0, 1] and is not zero-width at
    p = 0 or 1: 50 queries at 0.5 give [0.37, 0.63], a row's recall is known to about 13 points.
    """
    if n <= 0:
        return (0.0, 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def bootstrap_average(
    hits: Mapping[str, Sequence[float]],
    other: Mapping[str, Sequence[float]] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(value, low, high): the plain mean over pairs of each pair's mean hit, with a percentile
    bootstrap interval that resamples each pair's queries.

    `hits` is `{pair: per-query hit (0/1 or recall) in query order}`. With `other` (the same pairs
    and queries, another model or setting), it is the difference `hits - other`, resampled paired
    by query: the interval of a headline difference ("instructions add 14 points").
    """
    rng = np.random.default_rng(seed)
    pairs = sorted(hits)
    if other is not None and sorted(other) != pairs:
        raise ValueError(f"bootstrap_average: the two sides have different pairs: {pairs} vs {sorted(other)}")
    diffs = []
    for pair in pairs:
        a = np.asarray(hits[pair], dtype=np.float64)
        b = np.zeros_like(a) if other is None else np.asarray(other[pair], dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"bootstrap_average: pair {pair} has {a.size} queries on one side, {b.size} on the other")
        diffs.append(a - b)
    value = float(np.mean([d.mean() for d in diffs]))
    boot = np.zeros(n_boot)
    for d in diffs:  # [n_boot] per pair, averaged over pairs
        boot += d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    boot /= len(diffs)
    tail = 100 * (1 - level) / 2
    return value, float(np.percentile(boot, tail)), float(np.percentile(boot, 100 - tail))


def paper_table(
    results: Sequence[Mapping], paper: Mapping[str, float] | None = None, interval: bool = True
) -> pd.DataFrame:
    """The paper's table (Tables 2 and 6) from `evaluate_pairs` results, in percent.

    One row per pair present, in the paper's order, with the paper's
    metric (Recall@5; Recall@10 for Fashion200K and FashionIQ), then an "Average" row: the plain
    mean over the rows present, as the paper averages its 16 rows. Columns: task (paper number
    and short name, e.g. "1. qt->ci"), dataset, metric, value; with `interval`, `low` and `high`
    (95 %: Wilson per row; for the average, the normal interval of a mean of independent rows, each
    row's variance read from its Wilson width);
    with `paper` (`{pair name: percent}`, from `paper_numbers`), the paper's value as `paper`.
    """
    by_key = {(r["dataset"], r["task_id"]): r for r in results}
    rows, variances = [], []
    for pair in EVAL_PAIRS:
        result = by_key.get((pair.dataset, pair.task_id))
        if result is None:
            continue
        task = TASKS[pair.task_id]
        value = result["metrics"][f"recall@{pair.metric_k}"]
        n = result["n_queries"]
        low, high = wilson_interval(value, n)
        variances.append(((high - low) / (2 * 1.96)) ** 2)  # the Wilson width as a variance: not 0 at p = 0 or 1
        row = {
            "task": f"{task.paper_number}. {task.short}",
            "dataset": pair.dataset,
            "metric": f"R@{pair.metric_k}",
            "value": 100.0 * value,
            "low": 100.0 * low,
            "high": 100.0 * high,
        }
        if paper is not None:
            row["paper"] = paper.get(pair.name, float("nan"))
        rows.append(row)
    columns = ["task", "dataset", "metric", "value"] + (["low", "high"] if interval else []) + (["paper"] if paper is not None else [])
    table = pd.DataFrame(rows, columns=["task", "dataset", "metric", "value", "low", "high", "paper"])
    mean = table["value"].mean()
    half = 100.0 * 1.96 * np.sqrt(np.sum(variances)) / max(len(variances), 1)
    average = {"task": "", "dataset": "Average", "metric": "", "value": mean, "low": max(0.0, mean - half), "high": min(100.0, mean + half)}
    if paper is not None:
        average["paper"] = table["paper"].mean()
    return pd.concat([table, pd.DataFrame([average])], ignore_index=True)[columns]


def paper_numbers(table: str, column: str) -> dict[str, float]:
    """One column of one of the paper's tables, `{pair name: percent}` (e.g. `paper_numbers(
    "table6_mbeir_local", "UniIR_CLIP_SF")["mscoco_task0"]`), from `results/paper_numbers.json`
    (transcribed from the UniIR paper's table images; its `_about` and `_source` fields say how)."""
    from uniir_lite.config import repo_root

    path = repo_root() / "results" / "paper_numbers.json"
    data = json.loads(path.read_text())
    if table not in data or column not in data[table]:
        known = {t: sorted(c for c in v if not c.startswith("_")) for t, v in data.items() if isinstance(v, dict)}
        raise KeyError(f"{path}: no column {column!r} in table {table!r}; tables and columns: {known}")
    # Table 7 and Figure 5 hold the five held-out rows (paper tasks 2, 3, 6, 7, 8 on WebQA, OVEN, CIRR)
    names = _HELDOUT_PAIRS if "rows" in data[table] else [row[2] for row in data["rows"]]
    return dict(zip(names, data[table][column]))


_HELDOUT_PAIRS = ("webqa_task1", "webqa_task2", "oven_task6", "cirr_task7", "oven_task8")


def compare_tables(local: pd.DataFrame, global_: pd.DataFrame) -> pd.DataFrame:
    """Two `paper_table`s side by side: columns task, dataset, metric, local, global, delta.

    `delta` is global minus local (the cost of the heterogeneous pool);
    rows follow the local table, then any rows only the global one has.
    """
    key = ["task", "dataset", "metric"]
    local, global_ = local[key + ["value"]], global_[key + ["value"]]
    # Paper order: the local rows, then rows only the global table has; the Average rows (each
    # table's mean over its own rows) last. A left merge keeps the order of its left side.
    rows = pd.concat([local[key], global_[key]]).drop_duplicates()
    rows = pd.concat([rows[rows["dataset"] != "Average"], rows[rows["dataset"] == "Average"]])
    merged = rows.merge(local.rename(columns={"value": "local"}), on=key, how="left").merge(
        global_.rename(columns={"value": "global"}), on=key, how="left"
    )
    merged["delta"] = merged["global"] - merged["local"]
    return merged


# ---------------------------------------------------------------------------------------------
# Command line: uniir-lite eval-run
# ---------------------------------------------------------------------------------------------


def eval_run_command(run: str, qrels: str, pool: str | None, as_json: bool) -> int:
    """`uniir-lite eval-run --run RUN --qrels QRELS [--pool POOL.jsonl] [--json]`.

    Prints the paper's table (or, with `as_json`, the `evaluate_pairs`
    list as JSON). With a pool, adds the modality-error rate. Bad input prints one
    "path:line: message" line on stderr and returns 2.
    """
    try:
        for path in (run, qrels, pool):
            if path is not None and not Path(path).is_file():
                raise MBEIRFormatError(path, None, "no such file")
        ranked = read_run(run)
        judgements = read_qrels(qrels)
        did_modality = None
        if pool is not None:
            did_modality = pool_modalities(read_pool(pool))
        results = evaluate_pairs(ranked, judgements, did_modality)
        if not results:
            raise MBEIRFormatError(qrels, None, "no query with a positive; nothing to evaluate")
    except MBEIRFormatError as e:
        print(e, file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"uniir-lite eval-run: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable file, permissions
        print(f"{e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        print(paper_table(results).to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    return 0
