"""Every notebook of the manifest, executed headless through papermill in the tiny profile.

They share one output folder in manifest order, so later notebooks load what earlier ones saved (the
train-or-load pattern); each metric is checked against results/expected_tiny.json by the same
comparator as `make reproduce`.
"""

import pytest

from uniir_lite.kit import harness


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs_tiny")


@pytest.mark.notebook
@pytest.mark.parametrize("name", harness.read_manifest())
def test_notebook_runs_and_meets_expectations(name, out_dir):
    lines = []
    report = harness.reproduce("tiny", only=[name], out_dir=out_dir, echo=lambda *a, **k: lines.append(" ".join(map(str, a))))
    result = report.results[0]
    assert result.status == "ok", "\n".join(lines)


@pytest.mark.notebook
def test_full_profile_without_mbeir_stops_at_setup_with_what_to_fetch(tmp_path):
    """`make reproduce PROFILE=full DEVICE=cpu` on a machine without M-BEIR: one clear message."""
    lines = []
    report = harness.reproduce("full", out_dir=tmp_path / "out", echo=lambda *a, **k: lines.append(" ".join(map(str, a))),
                               overrides={"DEVICE": "cpu", "DATA_DIR": str(tmp_path / "no-mbeir")})
    assert [r.status for r in report.results] == ["missing-data"]  # the first notebook, then it stops
    assert "git clone https://huggingface.co/datasets/TIGER-Lab/M-BEIR" in report.results[0].error
    assert "Traceback" not in (tmp_path / "out" / f"{report.results[0].name}.ipynb").read_text()
