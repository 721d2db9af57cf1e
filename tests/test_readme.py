"""`make readme`: the notebook table and the figures come from a recorded run, never typed in.

Each test builds a small checkout (manifest, pages with their blocks) and a run of another checkout
(report.json, parameters files, figures/tiny/), and points `readme` at them."""

import json

import pytest
import yaml

from uniir_lite.config import repo_root
from uniir_lite.kit import readme
from uniir_lite.kit.record import load_expected

MANIFEST = {
    "notebooks": ["00_alpha", "01_beta"],
    "notebooks_info": [
        {"name": "00_alpha", "teaches": "the alpha lesson", "hardware": {"tiny": "CPU", "gpu": "CPU", "full": "CPU"}},
        {"name": "01_beta", "teaches": "the beta lesson", "hardware": {"tiny": "CPU", "gpu": "1 GPU", "full": "1 GPU"}},
    ],
}
HEADLINES = {"00_alpha": {"pool_size": "pool size"}, "01_beta": {"recall@5": "Recall@5", "loss_drop": "loss drop"}}
FIGURES = (("01_curves.png", "Beta's training curves."), ("00_pool.png", "Alpha's pool."))


def _metric(value, expected=None, tolerance=None, check=None, ok=None):
    return {"value": value, "expected": expected, "tolerance": tolerance, "check": check, "ok": ok}


def _report(recall=0.873):
    return {
        "profile": "tiny", "ok": True, "started": "2026-01-02T03:04:05+00:00",
        "environment": {"cuda": None, "cpu_count": 2, "git": "abc1234"},
        "notebooks": [
            {"name": "00_alpha", "seconds": 24.81, "status": "ok",
             "metrics": {"pool_size": _metric(3970.0, 3970, 0, "abs", True)}},
            {"name": "01_beta", "seconds": 42.05, "status": "ok",
             "metrics": {"recall@5": _metric(recall, 0.873, 0.07, "abs", True),
                         "loss_drop": _metric(3.187, 2.0, None, "min", True),
                         "unchecked": _metric(0.5)}},
        ],
    }


@pytest.fixture
def kit(tmp_path, monkeypatch):
    """A checkout with a manifest and the three pages; `readme` reads and writes it."""
    root = tmp_path / "kit"
    for folder in ("profiles", "notebooks", "results", "benchmarks/results"):
        (root / folder).mkdir(parents=True)
    (root / "notebooks" / "manifest.yaml").write_text(yaml.safe_dump(MANIFEST))
    (root / "README.md").write_text("# kit\n\n<!-- BEGIN notebooks -->\n<!-- END notebooks -->\n\n"
                                    "<!-- BEGIN figures -->\n<!-- END figures -->\n")
    (root / "results" / "README.md").write_text("<!-- BEGIN metrics -->\n<!-- END metrics -->\n")
    (root / "benchmarks" / "README.md").write_text("<!-- BEGIN performance -->\n<!-- END performance -->\n")
    monkeypatch.setattr(readme, "repo_root", lambda: root)
    monkeypatch.setattr(readme, "HEADLINES", HEADLINES)
    monkeypatch.setattr(readme, "FIGURES", FIGURES)
    return root


def _run(tmp_path, report=None, fig_dir="figures/tiny", sizes=(1000, 2000)):
    """A passing run of another checkout: runs/tiny/report.json, its parameters files, its figures."""
    root = tmp_path / "run"
    (root / "profiles").mkdir(parents=True, exist_ok=True)
    out = root / "runs" / "tiny"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report or _report()))
    for name in MANIFEST["notebooks"]:
        (out / f"{name}.parameters.yaml").write_text(yaml.safe_dump({"OUT_DIR": "runs/tiny", "FIG_DIR": str(fig_dir)}))
    figures = root / fig_dir
    figures.mkdir(parents=True, exist_ok=True)
    for (name, _), size in zip(FIGURES, sizes):
        (figures / name).write_bytes(name.encode() + bytes(size))
    return out / "report.json", figures


def test_the_table_holds_the_recorded_headlines_and_minutes(kit, tmp_path):
    report, _ = _run(tmp_path)
    readme.record_run(report)
    table = readme.notebook_table()
    header, rule, alpha, beta = table.splitlines()
    assert "headline numbers, `tiny` run: measured (expected)" in header and "tiny, on cpu (2 cores)" in header
    assert alpha == ("| 00 | [00_alpha](notebooks/00_alpha.ipynb) | the alpha lesson | "
                     "pool size **3,970** (3970 ± 0) | 0.4 min, CPU | not yet measured, CPU | not yet measured, CPU |")
    assert ("| Recall@5 **0.873** (0.873 ± 0.07); loss drop **3.19** (>= 2) | "
            "0.7 min, CPU | not yet measured, 1 GPU |") in beta
    assert "unchecked" not in table

    # the numbers follow the report: another run, another table
    report, _ = _run(tmp_path, _report(recall=0.91))
    readme.record_run(report)
    assert "Recall@5 **0.91** (0.873 ± 0.07)" in readme.notebook_table()


def test_without_a_recorded_run_the_table_says_so(kit):
    table = readme.notebook_table()
    assert table.count("not yet measured") == 2 * 4  # headline + 3 profiles, per notebook
    assert "no recorded `tiny` run yet" in readme.figures_block()


@pytest.mark.parametrize("key, why", [("unchecked", "recorded but not checked"), ("typo", "not recorded")])
def test_a_headline_that_is_not_a_checked_metric_is_an_error(kit, tmp_path, monkeypatch, key, why):
    report, _ = _run(tmp_path)
    monkeypatch.setattr(readme, "HEADLINES", {**HEADLINES, "01_beta": {key: "a number"}})
    with pytest.raises(ValueError, match=f"01_beta/{key}: {why}"):
        readme.record_run(report)
    # nothing was written: neither the measured numbers nor the figures
    assert not readme.measured_path().exists() and not (kit / "figures").exists()
    # and the table refuses it as well, for a run recorded before the headline was declared
    monkeypatch.setattr(readme, "HEADLINES", HEADLINES)
    readme.record_run(report)
    with pytest.raises(ValueError, match=f"01_beta/{key}"):
        readme.notebook_table({**HEADLINES, "01_beta": {key: "a number"}})


def test_a_headline_of_a_notebook_not_in_the_manifest_is_an_error(kit, tmp_path):
    readme.record_run(_run(tmp_path)[0])
    with pytest.raises(ValueError, match="02_gamma"):
        readme.notebook_table({**HEADLINES, "02_gamma": {"x": "x"}})


def test_figures_are_copied_from_the_runs_fig_dir_and_shown(kit, tmp_path):
    report, figures = _run(tmp_path)
    readme.record_run(report)
    for name, _ in FIGURES:
        assert (kit / "figures" / name).read_bytes() == (figures / name).read_bytes()
    assert readme.update_readme()
    text = (kit / "README.md").read_text()
    assert text.index("![01_curves](figures/01_curves.png)") < text.index("![00_pool](figures/00_pool.png)")
    assert "*Beta's training curves.*" in text
    assert "From the recorded `tiny` run (cpu (2 cores), 2026-01-02, git abc1234)" in text


def test_an_absolute_fig_dir_is_followed(kit, tmp_path):
    report, figures = _run(tmp_path, fig_dir=tmp_path / "elsewhere" / "figs")
    assert readme.run_figure_dir(report, "tiny") == figures
    readme.record_run(report)
    assert (kit / "figures" / "00_pool.png").read_bytes() == (figures / "00_pool.png").read_bytes()


def test_a_missing_or_oversized_figure_is_an_error(kit, tmp_path):
    report, figures = _run(tmp_path, sizes=(1000, readme.MAX_FIGURE_BYTES + 1))
    with pytest.raises(ValueError, match="00_pool.png.*over the 150,000"):
        readme.record_run(report)
    (figures / "00_pool.png").unlink()
    with pytest.raises(FileNotFoundError, match="00_pool.png"):
        readme.record_run(report)
    assert not readme.measured_path().exists() and not (kit / "figures").exists()


def test_stale_pages_and_figures_are_detected(kit, tmp_path):
    report, _ = _run(tmp_path)
    readme.record_run(report)
    assert "README.md" in readme.stale_pages()  # recorded, not yet rendered
    readme.update_readme()
    assert readme.stale_pages() == []
    assert not readme.update_readme()  # idempotent

    (kit / "figures" / "00_pool.png").write_bytes(b"edited by hand")
    assert readme.stale_pages() == ["figures/00_pool.png"]
    (kit / "figures" / "00_pool.png").unlink()
    assert readme.stale_pages() == ["figures/00_pool.png"]

    readme.record_run(_run(tmp_path, _report(recall=0.5))[0])  # a new run: the table is stale again
    assert readme.stale_pages() == ["README.md", "results/README.md"]
    readme.update_readme()
    assert readme.stale_pages() == []


def test_a_declared_figure_that_was_never_copied_is_stale(kit, tmp_path, monkeypatch):
    readme.record_run(_run(tmp_path)[0])
    readme.update_readme()
    monkeypatch.setattr(readme, "FIGURES", FIGURES + (("01_more.png", "More."),))
    assert readme.stale_pages() == ["README.md", "figures/01_more.png"]


def test_the_kits_headlines_are_checked_metrics_of_expected_tiny():
    """The declared headlines themselves: one or two per notebook of the manifest, each checked."""
    manifest = yaml.safe_load((repo_root() / "notebooks" / "manifest.yaml").read_text())
    expected = load_expected(repo_root() / "results" / f"expected_{readme.README_PROFILE}.json")
    assert set(readme.HEADLINES) == {entry["name"] for entry in manifest["notebooks_info"]}
    for notebook, keys in readme.HEADLINES.items():
        assert 1 <= len(keys) <= 2, notebook
        assert set(keys) <= set(expected[notebook]), f"{notebook}: {set(keys) - set(expected[notebook])}"
    assert 2 <= len(readme.FIGURES) <= 3
