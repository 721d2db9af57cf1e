"""The project's static contract: pins, notebook pairs, manifest, README tables, CI script."""

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from uniir_lite.kit import harness, readme
from uniir_lite.config import KNOBS, load_profile, profile_names
from uniir_lite.kit.record import load_expected

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_lock_pins_every_dependency_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    pins = lock_pins()
    for text in requirements:
        req = Requirement(text)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is in pyproject.toml but not pinned in requirements.lock (run `make lock`)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} breaks {text!r}"


def test_environment_yml_delegates_to_the_lock():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = [d for d in env["dependencies"] if isinstance(d, dict)]
    assert sorted(conda) == ["pip", "python=3.11"], "conda packages beyond python and pip would drift from the lock"
    assert pip == [{"pip": ["-r requirements.lock", "-e ."]}]
    assert "Python 3.11" in (ROOT / "requirements.lock").read_text().splitlines()[0]


def test_profiles_define_every_knob():
    assert profile_names() == ["full", "gpu", "tiny"]
    for name in profile_names():
        values = load_profile(name)
        assert values["PROFILE"] == name
        assert set(values) == set(KNOBS), f"profiles/{name}.yaml: {set(values) ^ set(KNOBS)}"


def test_manifest_lists_exactly_the_notebooks():
    manifest = harness.read_manifest()
    assert manifest == sorted(manifest), "notebooks run in their numbered order"
    assert manifest == [p.stem for p in NOTEBOOK_SOURCES]
    info = yaml.safe_load((ROOT / "notebooks" / "manifest.yaml").read_text())["notebooks_info"]
    assert [entry["name"] for entry in info] == manifest


@pytest.mark.parametrize("py", NOTEBOOK_SOURCES, ids=lambda p: p.stem)
def test_notebook_pair_in_sync_and_without_outputs(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.is_file(), f"{ipynb.name} missing: run `make notebooks`"
    assert ipynb.read_text() == harness.paired_ipynb_text(py), f"{ipynb.name} is out of sync: run `make notebooks`"
    for cell in json.loads(ipynb.read_text())["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


@pytest.mark.parametrize("py", NOTEBOOK_SOURCES, ids=lambda p: p.stem)
def test_notebook_contract(py):
    assert harness.contract_problems(py) == []
    expected = load_expected(ROOT / "results" / "expected_tiny.json")
    assert expected.get(py.stem), f"results/expected_tiny.json has no metrics for {py.stem}"


def test_readme_tables_are_generated():
    assert readme.stale_pages() == [], "generated tables are stale: run `make readme`"
    text = (ROOT / "README.md").read_text()
    assert "make reproduce" in text and "make test" in text


def test_ci_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in script and re.search(r"^make test$", script, re.M)


def test_every_taught_in_names_a_notebook_of_the_manifest():
    import re

    have = {name[:2] for name in harness.read_manifest()}
    dangling = []
    for path in sorted((ROOT / "uniir_lite").rglob("*.py")):
        for match in re.finditer(r"[Tt]aught in notebooks? ((?:\d\d|and|or|,|-|–|\s)+)", path.read_text()):
            dangling += [f"{path.relative_to(ROOT)}: notebook {nn}" for nn in re.findall(r"\d\d", match.group(1))
                         if nn not in have]
    assert dangling == []


# The library's layers: a module may import only from its own layer or the layers before it. The
# first holds what knows no model (formats, search, metrics, plotting); the kit's tooling sits on top.
LAYERS = [
    ("config", "env", "io", "viz", "checkpoints", "data", "instructions", "losses", "retrieval", "metrics"),
    ("models",),
    ("train",),
    ("recipes",),
    ("fusion",),
    ("multitask",),
    ("evaluation",),
    ("kit",),
]


def _layer(module: str) -> int | None:
    first = module.split(".")[1] if module.startswith("uniir_lite.") else None
    return next((i for i, names in enumerate(LAYERS) if first in names), None)


def test_library_imports_never_go_back_up_the_layers():
    import ast

    package = Path(__file__).parents[1] / "uniir_lite"
    back_edges = []
    for path in package.rglob("*.py"):
        module = "uniir_lite." + ".".join(path.relative_to(package).with_suffix("").parts)
        here = _layer(module)
        if here is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for target in targets:
                there = _layer(target)
                if there is not None and there > here:
                    back_edges.append(f"{module} imports {target}")
    assert not back_edges, back_edges
