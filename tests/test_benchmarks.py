"""Benchmarks: `make bench` in its CI size writes a valid results file, the README's performance
table comes from such files, and the GPU-only logic runs on CPU. The screened exact search that the
search benchmark led to is tested with the rest of `retrieval` (tests/test_retrieval.py).

No timing is asserted: timings on a shared CI machine say nothing about the code.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from uniir_lite.kit import bench, readme
from uniir_lite.config import repo_root
from uniir_lite.retrieval import search

# ---------------------------------------------------------------------------------------------
# make bench, CI size
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ci_results(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--size", "ci", "--threads", "1", "--out", str(out)],
        cwd=repo_root(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text()), files[0].stem


def test_ci_results_file_has_the_schema(ci_results) -> None:
    doc, stem = ci_results
    bench.check_results(doc)
    assert doc["device"] == stem == bench.device_slug(torch.device("cpu"))
    assert doc["size"] == "ci"
    assert doc["versions"]["torch"] == torch.__version__
    names = [r["name"] for r in doc["results"]]
    assert [n.split()[0] for n in names] == ["embed", "embed", "train", "train", "search"], names
    for r in doc["results"]:
        for key in ("kit", "uniir_recipe", "limit", "ratio_vs_recipe", "fraction_of_limit"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (r["name"], key, r[key])
        assert r["ratio_vs_recipe"] == pytest.approx(
            r["kit"] / r["uniir_recipe"] if r["better"] == "higher" else r["uniir_recipe"] / r["kit"])
    assert doc["matmul_limit"]["tflops"] > 0


def test_ci_results_measure_the_variants_and_memory(ci_results) -> None:
    doc, _ = ci_results
    embed = doc["results"][0]["details"]
    assert embed["flops_per_item"] > 0 and embed["kit_peak_memory_bytes"] > 0
    bf16 = embed["variants"]["bf16 weights"]
    assert bf16["items_per_s"] > 0 and 0.9 < bf16["min_cos_vs_fp32"] <= 1.0 + 1e-6
    train = doc["results"][2]["details"]
    assert math.isfinite(train["kit_loss"]) and math.isfinite(train["recipe_loss"])
    assert train["variants"]["fused AdamW"]["samples_per_s"] > 0


def test_ci_search_recall_is_exact(ci_results) -> None:
    doc, _ = ci_results
    search_row = doc["results"][-1]
    assert search_row["better"] == "lower" and search_row["unit"] == "s"
    d = search_row["details"]
    assert d["recall_at_k"] == 1.0, d
    assert d["misses"] == d["misses_unexplained"] == 0
    assert d["kit_search_stats"]["rows"] == 256


# ---------------------------------------------------------------------------------------------
# The README table
# ---------------------------------------------------------------------------------------------


def _fake_doc(device: str, name: str, kit: float, recipe: float, limit: float) -> dict:
    return {
        "device": device, "device_name": name, "date": "2026-01-02", "size": "small", "versions": {},
        "load": {"loadavg_before": [0.5, 0, 0], "loadavg_after": [1.5, 0, 0]},
        "matmul_limit": {"dtype": "bfloat16", "n": 2048, "tflops": 0.25},
        "skipped": [{"name": "embed ViT-L-14 224px", "why": "too slow here"}],
        "results": [
            bench.result("embed images ViT-B-32 224px", "images/s", kit, recipe, limit, note="a note",
                         variants={"bf16 weights": {"items_per_s": 2 * kit}, "broken": {"error": "out of memory"}}),
            bench.result("search 10x20x768 top-10", "s", 2.0, 6.0, 0.5, better="lower"),
        ],
    }


def test_performance_table_shows_the_files_numbers(tmp_path) -> None:
    (tmp_path / "cpu-test.json").write_text(json.dumps(_fake_doc("cpu-test", "Test CPU", 123.4, 61.7, 1234.0)))
    table = readme.performance_table(tmp_path)
    assert "**Test CPU**, 2026-01-02, `--size small`, bfloat16 matmul 0.25 TFLOP/s, load average 0.5 -> 1.5" in table
    assert "| embed images ViT-B-32 224px | images/s | 123 | 61.7 | 2.00x | 1,234 | 10% | bf16 weights: 2.00x |" in table
    assert "| search 10x20x768 top-10 | s | 2 | 6 | 3.00x | 0.5 | 25% | - |" in table
    assert "- a note" in table and "embed ViT-L-14 224px: not run at this size (too slow here)" in table
    # no GPU file: the goals' GPU gets a row per planned result, none with a number
    assert "**NVIDIA H100**: not yet measured" in table
    for name, unit in bench.planned_results("full"):
        assert f"| {name} | {unit} | not yet measured | not yet measured |" in table


def test_performance_table_uses_a_gpu_file_when_there_is_one(tmp_path) -> None:
    (tmp_path / "cpu-test.json").write_text(json.dumps(_fake_doc("cpu-test", "Test CPU", 1.0, 1.0, 2.0)))
    gpu = _fake_doc("nvidia-h100-80gb-hbm3", "NVIDIA H100 80GB HBM3", 4567.0, 1500.0, 9000.0)
    (tmp_path / "nvidia-h100-80gb-hbm3.json").write_text(json.dumps(gpu))
    table = readme.performance_table(tmp_path)
    assert "not yet measured" not in table
    assert "| embed images ViT-B-32 224px | images/s | 4,567 | 1,500 | 3.04x | 9,000 | 51% | bf16 weights: 2.00x |" in table
    assert table.index("**Test CPU**") < table.index("**NVIDIA H100 80GB HBM3**")  # CPU first


def test_check_results_rejects_a_row_without_the_schema() -> None:
    doc = _fake_doc("cpu-test", "Test CPU", 1.0, 1.0, 2.0)
    del doc["results"][0]["fraction_of_limit"]
    with pytest.raises(ValueError, match="fraction_of_limit"):
        bench.check_results(doc)


# ---------------------------------------------------------------------------------------------
# GPU-only logic, driven on CPU
# ---------------------------------------------------------------------------------------------


def test_largest_batch_is_the_last_that_fits(monkeypatch) -> None:
    monkeypatch.setattr(bench, "_fits", lambda model_fn, b, device, setting: b <= 300)
    assert bench.largest_batch(None, torch.device("cpu")) == 256
    monkeypatch.setattr(bench, "_fits", lambda model_fn, b, device, setting: False)
    assert bench.largest_batch(None, torch.device("cpu")) is None


def test_fits_reports_out_of_memory_as_false(monkeypatch) -> None:
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench, "train_batch", oom)
    assert bench._fits(lambda: torch.nn.Linear(2, 2), 105, torch.device("cpu"), None) is False


@pytest.mark.parametrize("setting", [
    bench.TrainSetting(autocast=torch.float16, grad_scaler=True),  # UniIR's recipe on a GPU
    bench.TrainSetting(autocast=torch.bfloat16, fused_adamw=True, grad_clip=1.0, grad_checkpointing=True),
])
def test_training_settings_of_the_gpu_run_train_on_cpu(setting) -> None:
    torch.manual_seed(0)
    model = bench.build_clip_sf("uniir-clip-tiny", 32, torch.device("cpu"))
    batch = bench.train_batch(model, 4, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    loss = bench._train_loop(model, batch, setting, 10, torch.device("cpu"))()  # GradScaler skips its first steps
    assert math.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it took steps


def test_explain_misses_classifies_each_miss() -> None:
    c = F.normalize(torch.eye(4)[:, :3] + 0.01 * torch.arange(12.0).view(4, 3), dim=-1)  # [4, 3]
    q = c[:2].clone()  # query i is closest to candidate i
    order = (q @ c.T).argsort(dim=1, descending=True).numpy()  # [2, 4]
    ref = order[:, :2].copy()
    kit = ref.copy()
    kit[0, 1] = order[0, 2]  # the kit dropped the reference's 2nd best for a worse one
    out = bench.explain_misses(q, c, kit, ref)
    assert out["recall_at_k"] == pytest.approx(0.75)
    assert out["misses"] == out["misses_unexplained"] == 1
    out = bench.explain_misses(q, c, ref, kit)  # now the "reference" holds the worse one
    assert out["misses"] == out["misses_reference_rounding"] == 1 and out["misses_unexplained"] == 0


def test_gpu_recipe_search_agrees_with_the_kit_on_fp16_inputs() -> None:
    # On a GPU the pool is fp16 (8.6 GB), so its rows are unit vectors only up to fp16 rounding:
    # both searches must normalise them in float32 (UniIR's normalize_L2) to agree.
    cpu = torch.device("cpu")
    q = bench.random_unit_vectors(64, 96, cpu, torch.float16, seed=1, chunk=50)
    c = bench.random_unit_vectors(3000, 96, cpu, torch.float16, seed=2, chunk=1000)
    _, kit_idx = search(q, c, 10)
    _, ref_idx = bench.flat_search_fp32(q, c, 10, query_chunk=16, cand_chunk=1000)
    _, faiss_idx = bench.faiss_flat_search(q, c, 10)
    assert bench.explain_misses(q, c, kit_idx, ref_idx)["recall_at_k"] == 1.0
    assert bench.explain_misses(q, c, kit_idx, faiss_idx)["recall_at_k"] == 1.0


def test_result_orientation_makes_larger_better() -> None:
    up = bench.result("x", "items/s", 30.0, 10.0, 60.0)
    down = bench.result("y", "s", 2.0, 6.0, 1.0, better="lower")
    assert (up["ratio_vs_recipe"], up["fraction_of_limit"]) == (3.0, 0.5)
    assert (down["ratio_vs_recipe"], down["fraction_of_limit"]) == (3.0, 0.5)
    assert bench.result("z", "s", 1.0, None, None)["ratio_vs_recipe"] is None
