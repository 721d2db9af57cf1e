"""The `uniir-lite` command, driven as a user would: a child process per call."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

MINI = Path(__file__).parent / "fixtures" / "mbeir_mini"


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "uniir_lite", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "uniir-lite"
    assert script.is_file()
    assert "reproduce" in subprocess.run([script, "--help"], capture_output=True, text=True).stdout


def test_data_validate_ok_and_broken(tmp_path):
    ok = cli("data", "validate", MINI)
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok.stdout + ok.stderr
    broken = tmp_path / "mini"
    shutil.copytree(MINI, broken)
    queries = broken / "query" / "test" / "mbeir_cirr_task7_test.jsonl"
    lines = queries.read_text().splitlines()
    lines[1] = lines[1].replace('"image,text"', '"image+text"')
    queries.write_text("\n".join(lines) + "\n")
    (broken / "mbeir_images" / "cirr_images" / "test" / "tgt1.jpg").unlink()
    bad = cli("data", "validate", broken)
    assert bad.returncode == 1
    assert f"{queries}:2:" in bad.stdout and "image+text" in bad.stdout
    assert "tgt1.jpg" in bad.stdout


def test_eval_run_json(tmp_path):
    qrels = tmp_path / "qrels.txt"
    qrels.write_text(
        (MINI / "qrels/test/mbeir_mscoco_task3_test_qrels.txt").read_text()
        + (MINI / "qrels/test/mbeir_cirr_task7_test_qrels.txt").read_text()
    )
    run = tmp_path / "run.txt"
    ranked = {
        "9:6": ["9:8", "9:2", "8:1", "8:2", "8:3"],  # first positive at rank 2
        "8:1": ["8:3", "9:2", "9:3", "9:4", "9:5", "9:6", "8:2"],  # positive at rank 7
        "8:2": ["8:3", "8:1"],  # its positive, 8:3, at rank 1
    }
    run.write_text("".join(f"{q} Q0 {d} {r} {10 - r} test\n" for q, ds in ranked.items() for r, d in enumerate(ds, 1)))
    out = cli("eval-run", "--run", run, "--qrels", qrels, "--json")
    assert out.returncode == 0, out.stderr
    rows = {(r["dataset"], r["task_id"]): r for r in json.loads(out.stdout)}
    assert set(rows) == {("MSCOCO", 3), ("CIRR", 7)}
    mscoco, cirr = rows[("MSCOCO", 3)], rows[("CIRR", 7)]
    assert set(mscoco) == {"dataset", "task_id", "n_queries", "metrics"}
    assert set(mscoco["metrics"]) == {"recall@1", "recall@5", "recall@10", "fractional_recall@5", "ndcg@10"}
    assert (mscoco["n_queries"], mscoco["metrics"]["recall@1"], mscoco["metrics"]["recall@5"]) == (1, 0.0, 1.0)
    assert mscoco["metrics"]["fractional_recall@5"] == 0.2  # 1 of its 5 positives in the top 5
    assert cirr["n_queries"] == 2
    assert (cirr["metrics"]["recall@5"], cirr["metrics"]["recall@10"]) == (0.5, 1.0)
    table = cli("eval-run", "--run", run, "--qrels", qrels)
    assert table.returncode == 0 and "Average" in table.stdout
    missing = cli("eval-run", "--run", tmp_path / "nope.txt", "--qrels", qrels)
    assert missing.returncode == 2 and "nope.txt" in missing.stderr


def test_data_synth_writes_a_valid_benchmark(tmp_path):
    out = cli("data", "synth", tmp_path / "synth", "--size", "tiny", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "synth" / "synthetic.json").read_text())["seed"] == 3
    assert cli("data", "validate", tmp_path / "synth").returncode == 0
