"""Every notebook of the manifest, executed headless through papermill in the tiny profile.

They share one output folder in manifest order, so later notebooks load what earlier ones saved (the
train-or-load pattern); each metric is checked against results/expected_tiny.json by the same
comparator as `make reproduce`.
"""

import pytest

from uniir_lite import harness


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
