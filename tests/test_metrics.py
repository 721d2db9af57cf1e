"""UniIR's Recall@k, ir_measures cross-checks, modality errors, the 16 pairs and `eval-run`."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import ir_measures
import numpy as np
import pytest
from ir_measures import R, Success, nDCG

from uniir_lite.data.mbeir import Qrels, read_qrels
from uniir_lite.metrics import (
    compare_tables,
    diagonal_recall_at_k,
    evaluate_pairs,
    eval_run_command,
    fractional_recall_at_k,
    modality_error_at_k,
    ndcg_at_k,
    bootstrap_average,
    diagonal_hits,
    paper_numbers,
    paper_table,
    recall_at_k,
    recall_at_k_per_query,
)
from uniir_lite.retrieval import write_run

def _ranked(*dids: str) -> list[tuple[str, float]]:
    """A ranked list with strictly decreasing scores."""
    return [(did, 1.0 - i / 100) for i, did in enumerate(dids)]


# ---------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------

QRELS_3 = {"q1": {"d1": 1}, "q2": {"d4": 1, "d5": 1, "d0": 0}, "q3": {"d10": 1}}
RUN_3 = {
    "q1": _ranked("d1", "d2", "d3"),  # positive at rank 1
    "q2": _ranked("d6", "d4", "d7", "d8", "d9", "d5"),  # positives at ranks 2 and 6
    "q9": _ranked("d1"),  # not in the qrels: ignored
}  # q3 retrieved nothing: counts 0


def test_hand_computed_values() -> None:
    assert recall_at_k_per_query(RUN_3, QRELS_3, 1) == {"q1": 1.0, "q2": 0.0, "q3": 0.0}
    assert recall_at_k_per_query(RUN_3, QRELS_3, 5) == {"q1": 1.0, "q2": 1.0, "q3": 0.0}
    assert recall_at_k(RUN_3, QRELS_3, 1) == pytest.approx(1 / 3)
    assert recall_at_k(RUN_3, QRELS_3, 5) == pytest.approx(2 / 3)
    # q2 finds 1 of its 2 positives in the top 5; its 6th result is the other one.
    assert fractional_recall_at_k(RUN_3, QRELS_3, 5) == pytest.approx((1 + 0.5 + 0) / 3)
    assert fractional_recall_at_k(RUN_3, QRELS_3, 6) == pytest.approx(2 / 3)
    dcg_q2 = 1 / math.log2(3) + 1 / math.log2(7)
    idcg_q2 = 1 + 1 / math.log2(3)
    assert ndcg_at_k(RUN_3, QRELS_3, 10) == pytest.approx((1 + dcg_q2 / idcg_q2 + 0) / 3)
    assert ndcg_at_k(RUN_3, QRELS_3, 5) == pytest.approx((1 + (1 / math.log2(3)) / idcg_q2) / 3)


def test_tied_scores_follow_our_rank_order() -> None:
    qrels = {"q": {"d2": 1}}
    run = {"q": [("d1", 0.5), ("d2", 0.5)]}  # we rank d1 first
    assert recall_at_k(run, qrels, 1) == 0.0
    assert fractional_recall_at_k(run, qrels, 1) == 0.0
    # trec_eval itself would re-sort the tie by docid and put d2 first.
    raw = {"q": {"d1": 0.5, "d2": 0.5}}
    assert ir_measures.calc_aggregate([Success @ 1], qrels, raw)[Success @ 1] == 1.0


def test_empty_qrels_and_repeated_dids_are_errors() -> None:
    with pytest.raises(ValueError, match="no query with a positive"):
        recall_at_k(RUN_3, {"q1": {"d1": 0}}, 5)
    with pytest.raises(ValueError, match="did twice for qid q1"):
        recall_at_k({"q1": _ranked("d2", "d2")}, QRELS_3, 5)


# ---------------------------------------------------------------------------------------------
# Against an independent library
# ---------------------------------------------------------------------------------------------


def _random_run(seed: int) -> tuple[dict, dict]:
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(40)]
    qrels, run = {}, {}
    for q in range(60):
        qid = f"q{q}"
        qrels[qid] = {did: 1 for did in rng.sample(docs, rng.randint(1, 6))}
        if rng.random() < 0.9:  # some queries are missing from the run
            ranking = rng.sample(docs, rng.randint(3, 25))
            scores = sorted((rng.uniform(-1, 1) for _ in ranking), reverse=True)
            run[qid] = list(zip(ranking, scores))
    run["q_extra"] = _ranked("d1", "d2")
    return qrels, run


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_equals_ir_measures_success(seed: int) -> None:
    qrels, run = _random_run(seed)
    as_dict = {qid: dict(results) for qid, results in run.items()}
    for k in (1, 5, 10):
        expected = ir_measures.calc_aggregate([Success @ k, R @ k], qrels, as_dict)
        assert recall_at_k(run, qrels, k) == pytest.approx(expected[Success @ k], abs=1e-12)
        assert fractional_recall_at_k(run, qrels, k) == pytest.approx(expected[R @ k], abs=1e-12)
        per_query = {m.query_id: m.value for m in ir_measures.iter_calc([Success @ k], qrels, as_dict)}
        assert recall_at_k_per_query(run, qrels, k) == pytest.approx(per_query)
    ndcg = ir_measures.calc_aggregate([nDCG @ 10], qrels, as_dict)[nDCG @ 10]
    assert ndcg_at_k(run, qrels, 10) == pytest.approx(ndcg, abs=1e-12)


@pytest.mark.parametrize("seed", [3, 4])
def test_fractional_recall_never_exceeds_hit_rate(seed: int) -> None:
    qrels, run = _random_run(seed)
    for k in (1, 5, 10, 20):
        assert fractional_recall_at_k(run, qrels, k) <= recall_at_k(run, qrels, k)
    # Strictly lower here: many queries have several positives.
    assert fractional_recall_at_k(run, qrels, 10) < recall_at_k(run, qrels, 10)
    single = {qid: dict([next(iter(rels.items()))]) for qid, rels in qrels.items()}
    assert fractional_recall_at_k(run, single, 5) == pytest.approx(recall_at_k(run, single, 5))
    assert 0.0 <= ndcg_at_k(run, qrels, 10) <= 1.0


# ---------------------------------------------------------------------------------------------
# Modality errors
# ---------------------------------------------------------------------------------------------

MODALITY = {
    "i1": "image", "i2": "image", "i3": "image",
    "t1": "text", "t2": "text",
    "p1": "image,text", "p2": "text,image",  # the HF card's order means the same modality
}  # fmt: skip


def test_modality_error_hand_built() -> None:
    qrels = {
        "q_img": {"i1": 1},  # wants images
        "q_mixed": {"p1": 1, "t1": 1},  # wants image,text or text
    }
    run = {
        "q_img": _ranked("t1", "i1", "i2", "t2", "p1", "i3"),  # top 5: t1, t2, p1 are errors
        "q_mixed": _ranked("p2", "i2", "t2"),  # only i2 is an error; 3 results
    }
    assert modality_error_at_k(run, qrels, MODALITY, 5) == pytest.approx((3 + 1) / (5 + 3))
    assert modality_error_at_k(run, qrels, MODALITY, 1) == pytest.approx((1 + 0) / 2)
    assert modality_error_at_k({}, qrels, MODALITY, 5) == 0.0
    with pytest.raises(ValueError, match="did x9 .qid q_img. is not in the candidate pool"):
        modality_error_at_k({"q_img": _ranked("x9")}, qrels, MODALITY, 5)


# ---------------------------------------------------------------------------------------------
# The 16 pairs
# ---------------------------------------------------------------------------------------------

METRIC_KEYS = ["recall@1", "recall@5", "recall@10", "fractional_recall@5", "ndcg@10"]


# Four real M-BEIR test queries (MSCOCO text->image 9:1, 9:2; image->text 9:6, 9:12): qid, task id,
# positives, and the top 10 a CLIP_SF model retrieved from the global pool with their modalities
# (castorini/UniIR's published sample retrieval results).
REAL_SAMPLE = [
    ("9:1", 0, ["9:1"], ["9:2 text", "9:1 image", "0:888364 image", "0:919762 image", "0:417349 image",
     "0:578025 image", "0:77925 image", "0:1061233 image", "9:24464 image", "0:61680 image"]),
    ("9:2", 0, ["9:1"], ["0:688153 image", "0:888364 image", "0:1043081 image", "9:1 image",
     "0:1025595 image", "0:236813 image", "0:216031 image", "0:323589 image", "0:919762 image",
     "0:77925 image"]),
    ("9:6", 3, ["9:2", "9:3", "9:4", "9:5", "9:6"], ["9:5 text", "9:2 text", "9:16496 text", "9:3 text",
     "9:6827 text", "0:216030 text", "9:16494 text", "9:28113 text", "9:6 text", "9:24478 text"]),
    ("9:12", 3, ["9:8", "9:9", "9:10", "9:11", "9:12"], ["9:11 text", "9:10 text", "9:8 text",
     "9:26325 text", "9:12 text", "9:9 text", "9:12446 text", "9:24927 text", "9:13428 text",
     "9:26326 text"]),
]  # fmt: skip


def test_real_mbeir_sample_results() -> None:
    run = {qid: _ranked(*(c.split()[0] for c in top10)) for qid, _, _, top10 in REAL_SAMPLE}
    qrels = Qrels(
        rel={qid: dict.fromkeys(positives, 1) for qid, _, positives, _ in REAL_SAMPLE},
        task={qid: task_id for qid, task_id, _, _ in REAL_SAMPLE},
    )
    did_modality = dict(c.split() for *_, top10 in REAL_SAMPLE for c in top10)
    did_modality["9:4"] = "text"  # a positive caption that was not retrieved
    results = evaluate_pairs(run, qrels, did_modality)
    assert [(r["dataset"], r["task_id"], r["n_queries"]) for r in results] == [("MSCOCO", 0, 2), ("MSCOCO", 3, 2)]
    t2i, i2t = results[0]["metrics"], results[1]["metrics"]
    # 9:1: the gold image is 2nd, under its own caption 9:2 (a modality error); 9:2: gold is 4th.
    assert t2i["recall@1"] == 0.0 and t2i["recall@5"] == 1.0
    assert t2i["fractional_recall@5"] == 1.0
    assert t2i["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / 2)
    assert t2i["modality_error@5"] == pytest.approx(1 / 10)
    # 9:6 finds 3 of its 5 captions in the top 5, 9:12 finds 4 of 5.
    assert i2t["recall@1"] == 1.0 and i2t["recall@10"] == 1.0
    assert i2t["fractional_recall@5"] == pytest.approx((3 / 5 + 4 / 5) / 2)
    assert i2t["modality_error@5"] == 0.0


def test_evaluate_pairs_splits_a_mixed_qrels_file(tmp_path) -> None:
    qrels_file = tmp_path / "mixed_qrels.txt"
    qrels_file.write_text(
        "8:1 0 8:11 1 7\n"  # CIRR task 7
        "9:1 0 9:1 1 0\n"  # MSCOCO task 0
        "7:1 0 7:5 1 7\n"  # FashionIQ task 7
        "9:2 0 9:7 1 0\n"
        "9:3 0 9:20 1 3\n"  # MSCOCO task 3, two positives
        "9:3 0 9:21 1 3\n"
        "8:2 0 8:12 1 7\n"
    )
    run = {
        "9:1": _ranked("9:1"),  # hit at 1
        "9:2": _ranked("9:8", "9:9", "9:10", "9:11", "9:12", "9:7"),  # hit at 6
        "9:3": _ranked("9:21", "9:0"),  # 1 of 2 positives
        "7:1": _ranked(*[f"7:{i}" for i in range(10, 19)], "7:5"),  # hit at 10
        "8:1": _ranked("8:11"),
        # 8:2 retrieved nothing
    }
    results = evaluate_pairs(run, read_qrels(qrels_file))
    assert [(r["dataset"], r["task_id"]) for r in results] == [
        ("MSCOCO", 0), ("MSCOCO", 3), ("FashionIQ", 7), ("CIRR", 7)
    ]  # the paper's row order
    for r in results:
        assert list(r) == ["dataset", "task_id", "n_queries", "metrics"]
        assert list(r["metrics"]) == METRIC_KEYS
        assert all(0.0 <= v <= 1.0 for v in r["metrics"].values())
    coco_t2i, coco_i2t, fiq, cirr = (r["metrics"] for r in results)
    assert [r["n_queries"] for r in results] == [2, 1, 1, 2]
    assert (coco_t2i["recall@1"], coco_t2i["recall@5"], coco_t2i["recall@10"]) == (0.5, 0.5, 1.0)
    assert coco_i2t["recall@1"] == 1.0 and coco_i2t["fractional_recall@5"] == 0.5
    assert (fiq["recall@5"], fiq["recall@10"]) == (0.0, 1.0)
    assert (cirr["recall@1"], cirr["recall@10"]) == (0.5, 0.5)


def test_evaluate_pairs_rejects_queries_outside_the_16_pairs() -> None:
    with pytest.raises(ValueError, match="qid 9:1 with task id 1 is not one of the 16"):
        evaluate_pairs({}, Qrels(rel={"9:1": {"9:2": 1}}, task={"9:1": 1}))
    with pytest.raises(ValueError, match="qid 9:1 has no task id"):
        evaluate_pairs({}, Qrels(rel={"9:1": {"9:2": 1}}, task={}))


def _result(dataset: str, task_id: int, **metrics: float) -> dict:
    return {"dataset": dataset, "task_id": task_id, "n_queries": 1, "metrics": metrics}


def test_paper_table() -> None:
    results = [
        _result("CIRR", 7, **{"recall@5": 0.40, "recall@10": 0.50}),
        _result("FashionIQ", 7, **{"recall@5": 0.10, "recall@10": 0.25}),  # reported at R@10
        _result("MSCOCO", 0, **{"recall@5": 0.80, "recall@10": 0.90}),
    ]
    table = paper_table(results, interval=False)
    assert list(table.columns) == ["task", "dataset", "metric", "value"]
    assert table["dataset"].tolist() == ["MSCOCO", "FashionIQ", "CIRR", "Average"]
    assert table["task"].tolist()[:3] == ["1. qt->ci", "7. (qi,qt)->ci", "7. (qi,qt)->ci"]
    assert table["metric"].tolist()[:3] == ["R@5", "R@10", "R@5"]
    assert table["value"].tolist() == pytest.approx([80.0, 25.0, 40.0, (80 + 25 + 40) / 3])


def test_paper_table_interval_and_paper_column() -> None:
    results = [
        {"dataset": "MSCOCO", "task_id": 0, "n_queries": 50, "metrics": {"recall@5": 0.5}},
        {"dataset": "CIRR", "task_id": 7, "n_queries": 50, "metrics": {"recall@5": 0.0}},
    ]
    table = paper_table(results, paper={"mscoco_task0": 81.1, "cirr_task7": 44.6})
    assert list(table.columns) == ["task", "dataset", "metric", "value", "low", "high", "paper"]
    coco, cirr, avg = table.to_dict("records")
    # Wilson 95 % at 25/50: 36.6 to 63.4 (by hand: centre 0.5, half-width 1.96 sqrt(0.25/50 + 1.96^2/1e4) / 1.0768)
    assert (coco["low"], coco["high"]) == pytest.approx((36.64, 63.36), abs=0.01)
    assert cirr["low"] == 0.0 and cirr["high"] == pytest.approx(7.14, abs=0.01)  # not zero-width at 0
    assert avg["value"] == 25.0 and avg["paper"] == pytest.approx((81.1 + 44.6) / 2)
    # the mean of two independent rows, each row's s.e. its Wilson half-width / 1.96
    row_se = [(r["high"] - r["low"]) / 2 / 1.96 for r in (coco, cirr)]
    assert avg["high"] - avg["value"] == pytest.approx(1.96 * np.hypot(*row_se) / 2)


def test_bootstrap_average_covers_the_value_and_pairs_by_query() -> None:
    rng = np.random.default_rng(1)
    a = {"x": (rng.random(200) < 0.6).astype(float), "y": (rng.random(100) < 0.3).astype(float)}
    value, low, high = bootstrap_average(a)
    assert value == pytest.approx((a["x"].mean() + a["y"].mean()) / 2)
    assert low < value < high and 0.05 < high - low < 0.2
    # a copy that differs on 10 queries of x: the paired interval is tight around 10/200 / 2
    b = {"x": a["x"].copy(), "y": a["y"].copy()}
    flip = np.flatnonzero(a["x"] == 1)[:10]
    b["x"][flip] = 0
    diff, dlow, dhigh = bootstrap_average(a, b)
    assert diff == pytest.approx(10 / 200 / 2)
    assert 0 < dlow < diff < dhigh < 0.05
    with pytest.raises(ValueError, match="different pairs"):
        bootstrap_average(a, {"x": a["x"]})


def test_paper_numbers_reads_the_transcribed_tables() -> None:
    local = paper_numbers("table6_mbeir_local", "UniIR_CLIP_SF")
    assert len(local) == 16 and local["mscoco_task0"] == 81.1
    assert np.mean(list(paper_numbers("table2_mbeir_global_5p6M", "UniIR_CLIP_SF").values())) == pytest.approx(48.9, abs=0.05)
    assert list(paper_numbers("table7_heldout_3_datasets", "UniIR_CLIP_SF")) == [
        "webqa_task1", "webqa_task2", "oven_task6", "cirr_task7", "oven_task8"]
    with pytest.raises(KeyError, match="no column 'CLIP_XX'"):
        paper_numbers("table6_mbeir_local", "CLIP_XX")


def test_compare_tables() -> None:
    local = paper_table([_result("MSCOCO", 0, **{"recall@5": 0.8}), _result("CIRR", 7, **{"recall@5": 0.4})])
    global_ = paper_table([_result("MSCOCO", 0, **{"recall@5": 0.6}), _result("CIRR", 7, **{"recall@5": 0.4})])
    both = compare_tables(local, global_)
    assert list(both.columns) == ["task", "dataset", "metric", "local", "global", "delta"]
    assert both["dataset"].tolist() == ["MSCOCO", "CIRR", "Average"]
    assert both["delta"].tolist() == pytest.approx([-20.0, 0.0, -10.0])


# ---------------------------------------------------------------------------------------------
# uniir-lite eval-run
# ---------------------------------------------------------------------------------------------


def _write_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("9:1 0 9:1 1 0\n9:6 0 9:2 1 3\n9:6 0 9:3 1 3\n")
    run = tmp_path / "run.txt"
    write_run(run, ["9:1", "9:6"], [_ranked("9:2", "9:1"), _ranked("9:3", "9:4")], "test", task_ids=[0, 3])
    pool = tmp_path / "pool.jsonl"
    pool.write_text(
        json.dumps({"did": "9:1", "txt": None, "img_path": "mbeir_images/mscoco_images/a.jpg",
                    "modality": "image", "src_content": None}) + "\n"
        + "".join(json.dumps({"did": f"9:{i}", "txt": f"caption {i}", "img_path": None, "modality": "text"}) + "\n"
                  for i in (2, 3, 4))
    )  # fmt: skip
    return run, qrels, pool


def test_eval_run_command_json(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run, qrels, pool = _write_inputs(tmp_path)
    assert eval_run_command(str(run), str(qrels), str(pool), as_json=True) == 0
    results = json.loads(capsys.readouterr().out)
    assert [list(r) for r in results] == [["dataset", "task_id", "n_queries", "metrics"]] * 2
    assert [list(r["metrics"]) for r in results] == [METRIC_KEYS + ["modality_error@5"]] * 2
    assert results[0]["metrics"]["recall@1"] == 0.0 and results[0]["metrics"]["recall@5"] == 1.0
    assert results[0]["metrics"]["modality_error@5"] == 0.5  # the caption 9:2 ranked first
    assert results[1]["metrics"]["fractional_recall@5"] == 0.5

    assert eval_run_command(str(run), str(qrels), None, as_json=True) == 0
    assert "modality_error@5" not in json.loads(capsys.readouterr().out)[0]["metrics"]


def test_eval_run_command_table(tmp_path, capsys) -> None:
    run, qrels, _ = _write_inputs(tmp_path)
    assert eval_run_command(str(run), str(qrels), None, as_json=False) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["task", "dataset", "metric", "value", "low", "high"]  # 95 % Wilson
    assert out[1].split() == ["1.", "qt->ci", "MSCOCO", "R@5", "100.0", "20.7", "100.0"]
    assert out[2].split() == ["4.", "qi->ct", "MSCOCO", "R@5", "100.0", "20.7", "100.0"]
    assert out[3].split() == ["Average", "100.0", "71.9", "100.0"]


def test_eval_run_command_bad_input(tmp_path, capsys) -> None:
    run, qrels, pool = _write_inputs(tmp_path)
    bad_run = tmp_path / "bad_run.txt"
    bad_run.write_text("9:1 Q0 9:2 1 0.9 test\n9:1 Q0 9:1 two 0.5 test\n")
    assert eval_run_command(str(bad_run), str(qrels), None, as_json=False) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"{bad_run}:2: rank must be an integer, got 'two'"]

    bad_qrels = tmp_path / "bad_qrels.txt"
    bad_qrels.write_text("9:1 0 9:1 1 0\n9:1 0 9:2\n")
    assert eval_run_command(str(run), str(bad_qrels), None, as_json=False) == 2
    assert capsys.readouterr().err.startswith(f"{bad_qrels}:2: ")

    missing = tmp_path / "nope.txt"
    assert eval_run_command(str(missing), str(qrels), None, as_json=True) == 2
    assert capsys.readouterr().err.strip() == f"{missing}: no such file"

    # A run that retrieved a did the pool does not hold.
    write_run(run, ["9:1"], [_ranked("9:99")], "test")
    assert eval_run_command(str(run), str(qrels), str(pool), as_json=True) == 2
    assert "did 9:99 (qid 9:1) is not in the candidate pool" in capsys.readouterr().err


def test_diagonal_recall_at_k_by_hand() -> None:
    import torch

    # query 0: its candidate 0 ranks 1st; query 1: candidate 1 ranks 2nd; query 2: candidate 2 ranks 3rd.
    scores = torch.tensor([[0.9, 0.1, 0.0],
                           [0.8, 0.5, 0.1],
                           [0.7, 0.6, 0.2]])
    assert diagonal_recall_at_k(scores, 1) == pytest.approx(1 / 3)
    assert diagonal_recall_at_k(scores, 2) == pytest.approx(2 / 3)
    assert diagonal_recall_at_k(scores, 3) == 1.0
    assert diagonal_recall_at_k(scores, 10) == 1.0  # k past the number of candidates
    assert diagonal_recall_at_k(scores.numpy(), 2) == pytest.approx(2 / 3)
    assert diagonal_hits(scores, 2).tolist() == [1.0, 1.0, 0.0]  # the same ranks, query by query
    assert diagonal_hits(scores.numpy(), 10).tolist() == [1.0, 1.0, 1.0]
    noisy = torch.randn(40, 40)
    assert diagonal_hits(noisy, 5).mean() == pytest.approx(diagonal_recall_at_k(noisy, 5))
