"""Exact search (torch and faiss backends), TREC run files and embeddings on disk."""

from __future__ import annotations

import ir_measures
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uniir_lite.data.mbeir import MBEIRFormatError
from uniir_lite.retrieval import (
    SCREEN_EXTRA,
    ids_path,
    load_embeddings,
    read_run,
    save_embeddings,
    screen_error,
    search,
    search_dids,
    write_run,
)


def _random(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _reference(q: np.ndarray, c: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in float64 with numpy: sort by score desc, then index asc."""
    qn = q.astype(np.float64) / np.linalg.norm(q.astype(np.float64), axis=1, keepdims=True)
    cn = c.astype(np.float64) / np.linalg.norm(c.astype(np.float64), axis=1, keepdims=True)
    scores = qn @ cn.T
    order = np.lexsort((np.broadcast_to(np.arange(len(c)), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


# ---------------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk_size", "query_chunk_size", "k"),
    [
        (1, 1, 5),  # one candidate per chunk: every merge path
        (7, 3, 20),  # k larger than a chunk
        (64, 16, 10),
        (1000, 1000, 10),  # one chunk holds everything
        (50, 8, 199),  # k = n_candidates - 1
        (50, 8, 200),  # k = n_candidates
    ],
)
def test_torch_and_faiss_agree_with_brute_force(chunk_size: int, query_chunk_size: int, k: int) -> None:
    q, c = _random(37, 24, seed=1), _random(200, 24, seed=2)
    ref_scores, ref_idx = _reference(q, c, k)
    t_scores, t_idx = search(q, c, k, backend="torch", chunk_size=chunk_size, query_chunk_size=query_chunk_size)
    f_scores, f_idx = search(q, c, k, backend="faiss", chunk_size=chunk_size)
    assert t_idx.shape == f_idx.shape == (37, k)
    assert t_scores.dtype == f_scores.dtype == np.float32
    assert t_idx.dtype == f_idx.dtype == np.int64
    np.testing.assert_array_equal(t_idx, ref_idx)
    np.testing.assert_array_equal(f_idx, ref_idx)
    np.testing.assert_allclose(t_scores, ref_scores, atol=1e-5)
    np.testing.assert_allclose(f_scores, ref_scores, atol=1e-5)


def test_k_above_pool_size_returns_whole_pool_ranked() -> None:
    q, c = _random(4, 8, seed=3), _random(6, 8, seed=4)
    for backend in ("torch", "faiss"):
        scores, idx = search(q, c, 50, backend=backend)
        assert idx.shape == (4, 6)
        assert sorted(idx[0].tolist()) == list(range(6))
        assert np.all(np.diff(scores, axis=1) <= 0)


def test_inputs_are_normalised_inside() -> None:
    q, c = _random(5, 16, seed=5), _random(30, 16, seed=6)
    scaled = c * np.random.default_rng(7).uniform(0.01, 100, size=(30, 1)).astype(np.float32)
    for backend in ("torch", "faiss"):
        s1, i1 = search(q, c, 10, backend=backend)
        s2, i2 = search(q * 3.0, scaled, 10, backend=backend)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(s1, s2, atol=1e-5)
        assert np.all(np.abs(s2) <= 1 + 1e-6)  # cosine similarities


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("chunk_size", [2, 4, 100])
def test_ties_are_broken_by_candidate_index(backend: str, chunk_size: int) -> None:
    # Candidates 1, 4, 6, 9, 11 are the same direction as the query (score 1.0, a 5-way tie that
    # straddles k=3 and spans chunks); the rest are orthogonal (score 0.0, another tie).
    c = np.zeros((12, 4), dtype=np.float32)
    c[:, 1] = 1.0
    tied = [1, 4, 6, 9, 11]
    c[tied] = [[2.0, 0, 0, 0]]
    q = np.array([[1.0, 0, 0, 0]] * 3, dtype=np.float32)
    scores, idx = search(q, c, 3, backend=backend, chunk_size=chunk_size, query_chunk_size=2)
    assert idx.tolist() == [[1, 4, 6]] * 3
    np.testing.assert_allclose(scores, 1.0)
    scores, idx = search(q, c, 8, backend=backend, chunk_size=chunk_size)
    assert idx[0].tolist() == [1, 4, 6, 9, 11, 0, 2, 3]
    np.testing.assert_allclose(scores[0], [1.0] * 5 + [0.0] * 3)


def _half_vectors(n: int, seed: int) -> np.ndarray:
    """Unit vectors with four entries of +-0.5: every inner product is a multiple of 0.25, exact
    in float32 whatever order a matmul kernel adds in, so scores tie exactly and often."""
    rng = np.random.default_rng(seed)
    v = np.zeros((n, 16), dtype=np.float32)
    for row in v:
        row[rng.choice(16, size=4, replace=False)] = rng.choice([-0.5, 0.5], size=4)
    return v


@pytest.mark.parametrize(("chunk_size", "k"), [(16, 5), (16, 50), (1000, 5), (1000, 50)])
def test_backends_agree_on_random_data_full_of_ties(chunk_size: int, k: int) -> None:
    q, c = _half_vectors(30, seed=14), _half_vectors(300, seed=15)
    ref_scores, ref_idx = _reference(q, c, k)
    assert (ref_scores[:, :-1] == ref_scores[:, 1:]).mean() > 0.5  # most neighbours tie
    t_scores, t_idx = search(q, c, k, backend="torch", chunk_size=chunk_size, query_chunk_size=7)
    _, f_idx = search(q, c, k, backend="faiss", chunk_size=chunk_size)
    np.testing.assert_array_equal(t_scores, ref_scores)
    np.testing.assert_array_equal(t_idx, ref_idx)
    np.testing.assert_array_equal(f_idx, ref_idx)


def test_fp16_inputs_numpy_and_torch() -> None:
    q, c = _random(9, 32, seed=8).astype(np.float16), _random(120, 32, seed=9).astype(np.float16)
    ref_scores, ref_idx = _reference(q.astype(np.float32), c.astype(np.float32), 10)
    for q_in, c_in in [(q, c), (torch.from_numpy(q), torch.from_numpy(c))]:
        for backend in ("torch", "faiss"):
            scores, idx = search(q_in, c_in, 10, backend=backend, chunk_size=50)
            assert scores.dtype == np.float32
            np.testing.assert_array_equal(idx, ref_idx)
            np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_bf16_matmul_stays_close() -> None:
    q, c = _random(6, 64, seed=10), _random(300, 64, seed=11)
    ref_scores, ref_idx = _reference(q, c, 1)
    scores, idx = search(q, c, 1, dtype=torch.bfloat16)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, ref_scores, atol=0.03)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu() -> None:
    q, c = _random(50, 64, seed=12), _random(5000, 64, seed=13)
    cpu = search(q, c, 10, chunk_size=1024)
    gpu = search(torch.from_numpy(q).cuda(), torch.from_numpy(c), 10, chunk_size=1024)
    np.testing.assert_array_equal(cpu[1], gpu[1])


def test_search_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="embed_dim 8 but candidates 9"):
        search(_random(2, 8, 0), _random(3, 9, 0), 1)
    with pytest.raises(ValueError, match="2-D"):
        search(_random(2, 8, 0)[0], _random(3, 8, 0), 1)
    with pytest.raises(ValueError, match="unknown backend"):
        search(_random(2, 8, 0), _random(3, 8, 0), 1, backend="annoy")  # type: ignore[arg-type]


def test_no_queries_and_tensors_that_require_grad() -> None:
    scores, idx = search(np.zeros((0, 8), dtype=np.float32), _random(3, 8, 0), 5)
    assert scores.shape == idx.shape == (0, 3)
    q = torch.from_numpy(_random(2, 8, 1)).requires_grad_()
    for backend in ("torch", "faiss"):
        assert search(q, _random(3, 8, 0), 2, backend=backend)[1].shape == (2, 2)


def test_search_dids_maps_rows_to_dids() -> None:
    c = np.eye(3, dtype=np.float32)
    q = np.array([[0.1, 0.9, 0.2], [1.0, 0.0, 0.5]], dtype=np.float32)
    ranked = search_dids(q, c, ["9:1", "9:2", "9:3"], k=2)
    assert [[did for did, _ in row] for row in ranked] == [["9:2", "9:3"], ["9:1", "9:3"]]
    assert ranked[1][0][1] == pytest.approx(1.0 / np.sqrt(1.25), abs=1e-6)
    with pytest.raises(ValueError, match="2 dids for 3"):
        search_dids(q, c, ["9:1", "9:2"], k=2)


# ---------------------------------------------------------------------------------------------
# run files
# ---------------------------------------------------------------------------------------------


def test_write_run_format_and_round_trip(tmp_path) -> None:
    path = tmp_path / "runs" / "run.txt"
    ranked = [[("9:2", 0.75), ("9:1", 0.5)], [("8:7", 0.25)]]
    write_run(path, ["9:1", "8:3"], ranked, run_id="clip_sf", task_ids=[0, 7])
    assert path.read_text().splitlines() == [
        "9:1 Q0 9:2 1 0.75 clip_sf 0",
        "9:1 Q0 9:1 2 0.5 clip_sf 0",
        "8:3 Q0 8:7 1 0.25 clip_sf 7",
    ]
    assert read_run(path) == {"9:1": [("9:2", 0.75), ("9:1", 0.5)], "8:3": [("8:7", 0.25)]}
    assert [p.name for p in path.parent.iterdir()] == ["run.txt"]  # no temp file left

    write_run(path, ["9:1", "8:3"], ranked, run_id="clip_sf")
    assert path.read_text().splitlines()[0] == "9:1 Q0 9:2 1 0.75 clip_sf"
    assert read_run(path) == {"9:1": [("9:2", 0.75), ("9:1", 0.5)], "8:3": [("8:7", 0.25)]}
    # An independent reader sees the same run.
    assert {(r.query_id, r.doc_id, r.score) for r in ir_measures.read_trec_run(str(path))} == {
        ("9:1", "9:2", 0.75), ("9:1", "9:1", 0.5), ("8:3", "8:7", 0.25)
    }


def test_float32_scores_round_trip_exactly(tmp_path) -> None:
    scores, idx = search(_random(3, 16, 20), _random(40, 16, 21), 10)
    dids = [f"1:{i}" for i in range(40)]
    ranked = [[(dids[i], s) for i, s in zip(ri.tolist(), rs.tolist())] for ri, rs in zip(idx, scores)]
    write_run(tmp_path / "r.txt", ["1:1", "1:2", "1:3"], ranked, "x")
    back = read_run(tmp_path / "r.txt")
    assert np.array_equal(np.array([[s for _, s in back[q]] for q in ["1:1", "1:2", "1:3"]], dtype=np.float32), scores)


def test_read_run_sorts_by_rank(tmp_path) -> None:
    path = tmp_path / "run.txt"
    path.write_text("q1 Q0 b 2 0.9 r\n\nq1 Q0 a 1 0.1 r\nq2 0 c 1 5 r 3\n")
    assert read_run(path) == {"q1": [("a", 0.1), ("b", 0.9)], "q2": [("c", 5.0)]}


@pytest.mark.parametrize(
    ("third_line", "message"),
    [
        ("q1 Q0 c 3 0.1", "expected 6 columns"),
        ("q1 Q0 c three 0.1 r", "rank must be an integer"),
        ("q1 Q0 c 0 0.1 r", "rank must be 1 or more"),
        ("q1 Q0 c 3 high r", "score must be a number"),
        ("q1 Q0 c 3 0.1 r task0", "task_id must be an integer"),
        ("q1 Q0 a 3 0.1 r", "did a is listed twice for qid q1 (first on line 1)"),
        ("q1 Q0 c 2 0.1 r", "rank 2 is used twice for qid q1 (first on line 2)"),
    ],
)
def test_read_run_reports_file_and_line(tmp_path, third_line: str, message: str) -> None:
    path = tmp_path / "bad_run.txt"
    path.write_text(f"q1 Q0 a 1 0.9 r\nq1 Q0 b 2 0.5 r\n{third_line}\n")
    with pytest.raises(MBEIRFormatError) as err:
        read_run(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_read_run_rejects_bytes_that_are_not_utf8(tmp_path) -> None:
    path = tmp_path / "run.txt"
    path.write_bytes(b"q1 Q0 a 1 0.9 r\nq1 Q0 \xff 2 0.5 r\n")
    with pytest.raises(MBEIRFormatError, match=r"run\.txt:2: not valid UTF-8"):
        read_run(path)


def test_write_run_rejects_spaces_and_keeps_old_file(tmp_path) -> None:
    path = tmp_path / "run.txt"
    path.write_text("old\n")
    with pytest.raises(ValueError, match="did 'a b'"):
        write_run(path, ["q1", "q2"], [[("a", 1.0)], [("a b", 1.0)]], "r")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run.txt"]
    with pytest.raises(ValueError, match="2 qids but 1 ranked"):
        write_run(path, ["q1", "q2"], [[("a", 1.0)]], "r")


# ---------------------------------------------------------------------------------------------
# embeddings on disk
# ---------------------------------------------------------------------------------------------


def test_embeddings_round_trip_as_fp16(tmp_path) -> None:
    emb = torch.randn(5, 8)
    ids = ["9:1", "9:2", "9:3", "0:10", "0:11"]
    path = tmp_path / "emb" / "cands.npy"
    save_embeddings(path, emb, ids)
    assert ids_path(path).name == "cands.ids.txt"
    for mmap in (False, True):
        loaded, loaded_ids = load_embeddings(path, mmap=mmap)
        assert loaded.dtype == np.float16 and loaded.shape == (5, 8)
        np.testing.assert_array_equal(loaded, emb.numpy().astype(np.float16))
        assert loaded_ids == ids
    assert sorted(p.name for p in path.parent.iterdir()) == ["cands.ids.txt", "cands.npy"]
    # A memory-mapped fp16 pool goes straight into search.
    scores, idx = search(emb[:2], load_embeddings(path, mmap=True)[0], 1)
    assert idx[:, 0].tolist() == [0, 1]


def test_embeddings_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="3 ids"):
        save_embeddings(tmp_path / "e.npy", np.zeros((2, 4)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="id 'a b' must be non-empty and without whitespace"):
        save_embeddings(tmp_path / "e.npy", np.zeros((2, 4)), ["a b", "c"])
    with pytest.raises(ValueError, match=r"\*\.npy"):
        save_embeddings(tmp_path / "e.bin", np.zeros((2, 4)), ["a", "b"])
    save_embeddings(tmp_path / "e.npy", np.zeros((2, 4)), ["a", "b"])
    ids_path(tmp_path / "e.npy").write_text("a\n")
    with pytest.raises(MBEIRFormatError, match=r"e\.ids\.txt: 1 ids for embeddings of shape \(2, 4\)"):
        load_embeddings(tmp_path / "e.npy")


# ---------------------------------------------------------------------------------------------
# Screened exact search: a bf16/fp16 screen, fp32 re-scoring, proven top k (motivated by `make bench`)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("screen", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("chunk_size", "query_chunk_size"), [(300, 7), (16384, 1024)])
def test_screened_search_returns_the_exact_top_k(screen, chunk_size, query_chunk_size) -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((40, 48)).astype(np.float32)
    c = (rng.standard_normal((2000, 48)) * rng.uniform(0.1, 10, (2000, 1))).astype(np.float32)  # unnormalised
    stats: dict = {}
    scores, idx = search(q, c, 10, screen=screen, chunk_size=chunk_size, query_chunk_size=query_chunk_size, stats=stats)
    ref_scores, ref_idx = _reference(q, c, 10)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
    assert stats["screen"] == str(screen).removeprefix("torch.") and stats["shortlist"] == 10 + SCREEN_EXTRA
    assert stats["rows"] == 40 and stats["rows_redone"] < 40


def test_screen_searches_again_the_rows_it_cannot_settle() -> None:
    # Query 0 ties with 150 copies of its own direction, more than the shortlist holds, so the
    # bound cannot prove the shortlist complete: that row is searched again in float32, and the
    # tie is broken by candidate index. Query 1 has no such tie.
    rng = np.random.default_rng(3)
    c = rng.standard_normal((600, 16)).astype(np.float32)
    tied = np.sort(rng.choice(600, size=150, replace=False))
    c[tied] = 0.0
    c[tied, 0] = rng.uniform(0.5, 2.0, size=150)  # same direction, different lengths
    q = np.stack([np.eye(16, dtype=np.float32)[0], rng.standard_normal(16).astype(np.float32)])
    stats: dict = {}
    scores, idx = search(q, c, 5, screen=torch.bfloat16, chunk_size=64, stats=stats)
    assert stats["rows_redone"] == 1
    assert idx[0].tolist() == tied[:5].tolist()
    np.testing.assert_allclose(scores[0], 1.0, atol=1e-6)
    np.testing.assert_array_equal(idx, _reference(q, c, 5)[1])


@pytest.mark.parametrize("screen", [torch.bfloat16, torch.float16])
def test_screen_error_bound_holds(screen) -> None:
    dim = 768
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(64, dim, generator=g), dim=-1)
    c = torch.cat([
        F.normalize(torch.randn(500, dim, generator=g), dim=-1),
        q,  # score 1: the largest rounding of the output
        F.normalize(torch.randn(100, dim, generator=g) ** 9, dim=-1),  # heavy-tailed: a few large entries
        F.normalize(torch.ones(1, dim) + 2.0**-9, dim=-1),  # every entry rounds the same way
    ])
    approx = (q.to(screen) @ c.to(screen).T).double()  # what the screen ranks by
    exact = q.double() @ c.double().T
    assert (approx - exact).abs().max().item() <= screen_error(screen, dim)


def test_default_search_is_exact_and_rejects_unknown_screens() -> None:
    rng = np.random.default_rng(5)
    q, c = rng.standard_normal((8, 32)).astype(np.float32), rng.standard_normal((500, 32)).astype(np.float32)
    np.testing.assert_array_equal(search(q, c, 10)[1], _reference(q, c, 10)[1])
    with pytest.raises(ValueError, match="screen"):
        search(q, c, 10, screen=torch.float64)
