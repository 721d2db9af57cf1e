"""The notebook harness end to end, on small temporary notebooks."""

import json
import textwrap
from pathlib import Path

import pytest

from uniir_lite.data.synthetic import write_benchmark
from uniir_lite.kit import harness
from uniir_lite.kit.record import MetricCheck, compare_metrics, load_expected, record_metrics

NOTEBOOK = '''\
# %% [markdown]
# # A small notebook for the harness tests

# %% tags=["parameters"]
PROFILE = "tiny"
SEED = None
DEVICE = None
DATA_DIR = None
OUT_DIR = None
FACTOR = 2.0

# %%
from uniir_lite import setup, record_metrics
cfg = setup(globals())

# %%
{body}

# %%
record_metrics("{name}", {{"answer": 21 * FACTOR, "seed": cfg.seed}}, cfg)
'''


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory):
    """One synthetic benchmark per test process for the toy notebooks' setup (never the repo's data/,
    which parallel test processes would write at the same time)."""
    global DATA_DIR
    DATA_DIR = str(write_benchmark(tmp_path_factory.mktemp("data") / "tiny", size="tiny", seed=0))
    return DATA_DIR


def make_project(tmp_path: Path, notebooks: dict[str, str], expected: dict) -> Path:
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    for name, body in notebooks.items():
        py = nb_dir / f"{name}.py"
        py.write_text(NOTEBOOK.format(name=name, body=body))
        (nb_dir / f"{name}.ipynb").write_text(harness.paired_ipynb_text(py))
    (nb_dir / "manifest.yaml").write_text("notebooks:\n" + "".join(f"  - {n}\n" for n in notebooks))
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    return nb_dir


def run(tmp_path, nb_dir, **kw):
    lines = []
    report = harness.reproduce(
        "tiny", nb_dir=nb_dir, expected=tmp_path / "expected.json", out_dir=tmp_path / "out",
        timeout_s=kw.pop("timeout_s", 120), echo=lambda *a, **k: lines.append(" ".join(map(str, a))),
        overrides={"DATA_DIR": DATA_DIR, **kw.pop("overrides", {})}, **kw,
    )
    return report, "\n".join(lines)


def test_end_to_end_pass_writes_reports(tmp_path):
    nb_dir = make_project(
        tmp_path, {"90_first": "x = 1", "91_second": "y = 2"},
        {"90_first": {"answer": {"value": 42, "tolerance": 0}, "seed": {"value": 0, "tolerance": 0}},
         "91_second": {"answer": {"min": 40}}},
    )
    report, log = run(tmp_path, nb_dir)
    assert report.ok, log
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [nb["name"] for nb in data["notebooks"]] == ["90_first", "91_second"]
    first = data["notebooks"][0]
    assert first["status"] == "ok" and first["seconds"] > 0
    assert first["metrics"]["answer"] == {"value": 42.0, "expected": 42, "tolerance": 0, "check": "abs", "ok": True,
                                          "over": None, "base": None, "upper": None}
    assert data["environment"]["torch"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "PASS" in md and "| 90_first | ok |" in md and "answer" in md
    # the executed notebook got the profile's parameters injected after the parameters cell
    executed = (tmp_path / "out" / "90_first.ipynb").read_text()
    assert "injected-parameters" in executed


def test_wrong_expected_value_fails_with_readable_message(tmp_path):
    nb_dir = make_project(tmp_path, {"90_first": "x = 1"}, {"90_first": {"answer": {"value": 41, "tolerance": 0.5}}})
    report, log = run(tmp_path, nb_dir)
    assert not report.ok
    assert report.results[0].status == "failed"
    assert "answer = 42 (expected 41 ± 0.5)" in log
    assert "**FAIL**" in (tmp_path / "out" / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["notebooks"][0]["metrics"]["answer"]["ok"] is False


def test_cli_exit_code_on_a_miss(tmp_path, monkeypatch):
    from uniir_lite.kit import cli

    nb_dir = make_project(tmp_path, {"90_first": "x = 1"}, {"90_first": {"answer": {"value": 0, "tolerance": 1}}})
    monkeypatch.setattr(harness, "notebooks_dir", lambda: nb_dir)
    argv = ["reproduce", "--expected", str(tmp_path / "expected.json"), "--out-dir", str(tmp_path / "out"),
            "--set", f"DATA_DIR={DATA_DIR}"]
    assert cli.main(argv) == 1
    (tmp_path / "expected.json").write_text(json.dumps({"90_first": {"answer": {"value": 42, "tolerance": 0}}}))
    assert cli.main(argv) == 0


def test_failing_notebook_reports_notebook_and_cell(tmp_path):
    nb_dir = make_project(
        tmp_path, {"90_ok": "x = 1", "91_broken": "values = [1, 2]\nratio = values[0] / 0"},
        {"90_ok": {"answer": {"value": 42, "tolerance": 0}}, "91_broken": {"answer": {"value": 42, "tolerance": 0}}},
    )
    report, log = run(tmp_path, nb_dir)
    assert [r.status for r in report.results] == ["ok", "error"]
    broken = report.results[1]
    assert "code cell 3: ZeroDivisionError" in broken.error
    assert "values = [1, 2]" in broken.error
    assert "91_broken" in log and "ZeroDivisionError" in log


def test_missing_metrics_and_missing_expectations_fail(tmp_path):
    nb_dir = make_project(tmp_path, {"90_first": "x = 1"}, {"90_first": {"other": {"value": 1, "tolerance": 0}}})
    report, _ = run(tmp_path, nb_dir)
    assert report.results[0].status == "failed"
    assert any(c.name == "other" and c.value is None and c.ok is False for c in report.results[0].checks)

    (tmp_path / "b").mkdir()
    nb_dir = make_project(tmp_path / "b", {"90_first": "x = 1"}, {})
    report, _ = run(tmp_path / "b", nb_dir)
    assert report.results[0].status == "failed" and "no expected values" in report.results[0].error


def test_timeout_is_reported(tmp_path):
    nb_dir = make_project(tmp_path, {"90_slow": "import time\ntime.sleep(60)"}, {"90_slow": {"answer": {"min": 0}}})
    report, _ = run(tmp_path, nb_dir, timeout_s=5)
    assert report.results[0].status == "timeout"


def test_comparator_on_a_fabricated_metrics_file(tmp_path):
    expected_file = tmp_path / "expected.json"
    expected_file.write_text(json.dumps({
        "_about": "comment",
        "05_x": {"recall": {"value": 0.5, "tolerance": 0.05}, "gain": {"min": 0.1}, "error": {"max": 0.2}},
    }))
    metrics = {"recall": 0.56, "gain": 0.15, "error": 0.1, "extra": 3.0}
    checks = {c.name: c for c in compare_metrics(metrics, load_expected(expected_file)["05_x"])}
    assert checks["recall"].ok is False  # 0.06 away, tolerance 0.05
    assert checks["gain"].ok is True and checks["error"].ok is True
    assert checks["extra"].ok is None  # recorded, not checked
    checks = {c.name: c for c in compare_metrics({"recall": 0.54, "gain": 0.05, "error": 0.3}, load_expected(expected_file)["05_x"])}
    assert (checks["recall"].ok, checks["gain"].ok, checks["error"].ok) == (True, False, False)


def test_bad_expected_file_names_the_entry(tmp_path):
    path = tmp_path / "expected.json"
    path.write_text(json.dumps({"05_x": {"recall": {"value": 0.5}}}))
    with pytest.raises(ValueError, match="05_x/recall"):
        load_expected(path)
    path.write_text('{"05_x": ')
    with pytest.raises(ValueError, match=r"expected.json:1"):
        load_expected(path)


def test_record_metrics_writes_json(tmp_path):
    from uniir_lite.config import resolve

    cfg = resolve("tiny", OUT_DIR=str(tmp_path))
    record_metrics("99_unknown", {"a": 1, "b": 0.25}, cfg)
    data = json.loads((tmp_path / "metrics" / "99_unknown.json").read_text())
    assert data == {"notebook": "99_unknown", "profile": "tiny", "metrics": {"a": 1.0, "b": 0.25}}
    with pytest.raises(TypeError, match="'c'"):
        record_metrics("99_unknown", {"c": "text"}, cfg)


def test_contract_checker_finds_broken_notebooks(tmp_path):
    good = tmp_path / "90_good.py"
    good.write_text(NOTEBOOK.format(name="90_good", body="x = 1"))
    assert harness.contract_problems(good) == []
    bad = tmp_path / "91_bad.py"
    bad.write_text(textwrap.dedent('''\
        # %%
        import os

        # %% tags=["parameters"]
        PROFILE = "tiny"
        SEED = os.getpid()

        # %%
        print("no metrics")
    '''))
    problems = "\n".join(harness.contract_problems(bad))
    assert "literal" in problems and "DEVICE" in problems and "first code cell" in problems
    assert 'record_metrics("91_bad"' in problems


def test_figures_are_stored_inline_in_the_executed_notebook(tmp_path):
    draw = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"
    nb_dir = make_project(tmp_path, {"90_draws": draw}, {"90_draws": {"answer": {"min": 0}}})
    report, log = run(tmp_path, nb_dir)
    assert report.ok, log
    executed = json.loads((tmp_path / "out" / "90_draws.ipynb").read_text())
    images = [o for c in executed["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1


def test_a_notebook_that_draws_but_shows_no_figure_fails(tmp_path, monkeypatch):
    # a kernel with a non-interactive backend (what the harness used to start) renders nothing
    blind_env = harness._kernel_env()
    monkeypatch.setattr(harness, "_kernel_env", lambda: {**blind_env, "MPLBACKEND": "Agg"})
    draw = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"
    nb_dir = make_project(tmp_path, {"90_draws": draw}, {"90_draws": {"answer": {"min": 0}}})
    report, log = run(tmp_path, nb_dir)
    assert not report.ok
    assert report.results[0].status == "error"
    assert "no image output" in report.results[0].error


def test_overrides_reach_the_notebook(tmp_path):
    nb_dir = make_project(tmp_path, {"90_first": "x = 1"}, {"90_first": {"seed": {"value": 7, "tolerance": 0}}})
    report, log = run(tmp_path, nb_dir, overrides={"SEED": 7})
    assert report.ok, log


def test_gain_over_another_metric():
    expected = {"trained": {"min_gain_over": "untrained", "min": 0.3}}
    ok, = compare_metrics({"trained": 0.8, "untrained": 0.4}, expected)[:1]
    assert ok.ok and ok.check == "gain" and ok.describe_expected() == ">= untrained (0.4) + 0.3"
    miss, = compare_metrics({"trained": 0.6, "untrained": 0.4}, expected)[:1]
    assert miss.ok is False
    absent, = compare_metrics({"trained": 0.9}, expected)[:1]  # the baseline was not recorded
    assert absent.ok is False


def test_gain_within_a_band_around_another_metric():
    expected = {"random": {"min_gain_over": "chance", "min": -0.02, "max": 0.02}}
    inside, = compare_metrics({"random": 0.045, "chance": 0.03}, expected)[:1]
    assert inside.ok and inside.describe_expected() == "chance (0.03) ± 0.02"
    above, = compare_metrics({"random": 0.06, "chance": 0.03}, expected)[:1]
    below, = compare_metrics({"random": 0.0, "chance": 0.03}, expected)[:1]
    assert above.ok is False and below.ok is False


def test_a_check_reads_back_from_the_report():
    check, = compare_metrics({"trained": 0.8, "untrained": 0.4}, {"trained": {"min_gain_over": "untrained", "min": 0.3}})[:1]
    back = MetricCheck(check.name, **json.loads(json.dumps(check.to_json())))
    assert back == check and back.describe_expected() == ">= untrained (0.4) + 0.3"


def test_gain_without_a_margin_is_rejected(tmp_path):
    (tmp_path / "e.json").write_text(json.dumps({"nb": {"trained": {"min_gain_over": "untrained"}}}))
    with pytest.raises(ValueError, match="nb/trained"):
        load_expected(tmp_path / "e.json")
