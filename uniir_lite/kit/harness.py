"""The notebook harness: manifest, papermill runner, measured-vs-expected report, `.ipynb` pairing.

`make reproduce` and the notebook tests both go through `reproduce` / `run_notebook`.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from uniir_lite.config import load_profile, repo_root
from uniir_lite.env import environment
from uniir_lite.io import write_json_atomic
from uniir_lite.kit.record import MetricCheck, compare_metrics, load_expected, metrics_file

KERNEL = "python3"
# Wall-clock limit per notebook, by profile (the tiny notebooks take about a minute each).
TIMEOUT_S = {"tiny": 600, "gpu": 4 * 3600, "full": 12 * 3600}


def notebooks_dir() -> Path:
    return repo_root() / "notebooks"


def read_manifest(path: Path | None = None) -> list[str]:
    """Notebook names (`NN_topic`) in the order students and `make reproduce` run them."""
    path = path or notebooks_dir() / "manifest.yaml"
    data = yaml.safe_load(Path(path).read_text()) or {}
    names = data.get("notebooks") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: 'notebooks' must be a list of notebook names")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: a notebook is listed twice")
    return names


# ---------------------------------------------------------------------------------------------------
# Pairing: the py:percent source is edited; the .ipynb is generated without outputs.


def paired_ipynb_text(py_path: Path) -> str:
    """The `.ipynb` text generated from a py:percent source: kernel `python3`, stable cell ids."""
    import jupytext

    nb = jupytext.read(py_path, fmt="py:percent")
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": KERNEL}
    nb.metadata["jupytext"] = {"formats": "ipynb,py:percent"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"c{i:03d}"
        if cell.cell_type == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    return jupytext.writes(nb, fmt="ipynb")


def sync_notebooks(directory: Path | None = None) -> list[Path]:
    """Regenerate every `NN_topic.ipynb` from its `.py`; returns the files that changed."""
    directory = directory or notebooks_dir()
    changed = []
    for py in sorted(directory.glob("[0-9][0-9]_*.py")):
        ipynb = py.with_suffix(".ipynb")
        text = paired_ipynb_text(py)
        if not ipynb.is_file() or ipynb.read_text() != text:
            ipynb.write_text(text)
            changed.append(ipynb)
    return changed


# ---------------------------------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class NotebookResult:
    name: str
    seconds: float
    status: str  # "ok", "failed" (a metric missed), "error" (a cell raised), "timeout", "missing",
    # "missing-data" (the profile's data or weights are not on disk: the error says what to fetch)
    output: Path | None = None
    error: str | None = None
    checks: list[MetricCheck] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": round(self.seconds, 2),
            "status": self.status,
            "error": self.error,
            "output": str(self.output) if self.output else None,
            "metrics": {c.name: c.to_json() for c in self.checks},
        }


def _kernel_env() -> dict[str, str]:
    """Environment for the kernel: this interpreter's bin first, offline hubs, quiet libraries."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        JUPYTER_PREFER_ENV_PATH="1",
        # the inline backend: every figure a cell draws is stored in the executed notebook as image/png
        MPLBACKEND="module://matplotlib_inline.backend_inline",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE=env.get("TQDM_DISABLE", "1"),
        UNIIR_KIT_HEADLESS="1",  # viz.interactive draws its default view instead of widgets
    )
    return env


def first_error(output: Path) -> tuple[int, Any, dict] | None:
    """(code cell number, cell, error output) of the first cell that raised in an executed notebook;
    cells are numbered as a reader counts them (papermill's injected cell left out)."""
    import nbformat

    try:
        nb = nbformat.read(output, as_version=4)
    except (OSError, ValueError):
        return None
    code = [c for c in nb.cells if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]
    for index, cell in enumerate(code, 1):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return index, cell, out
    return None


def describe_failure(output: Path) -> str | None:
    """Which cell raised, and what: read from the executed notebook papermill wrote."""
    found = first_error(output)
    if found is None:
        return None
    index, cell, out = found
    first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
    return f"code cell {index}: {out.get('ename')}: {out.get('evalue')}\n    > {first.strip()}"


def figure_problem(output: Path) -> str | None:
    """A notebook whose code draws (`plt.`) but whose executed copy holds no image output shows its
    readers nothing: name it. (A kernel started with a non-inline backend does exactly that.)"""
    import nbformat

    nb = nbformat.read(output, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    draws = any("plt." in c.source for c in code)
    images = sum("image/png" in out.get("data", {}) for c in code for out in c.get("outputs", []))
    if draws and images == 0:
        return f"{output.name}: the code draws figures but the executed notebook holds no image output"
    return None


def run_notebook(
    source: Path, output: Path, parameters: dict[str, Any], timeout_s: float, log: Path | None = None
) -> tuple[str, float, str | None]:
    """Execute one notebook with papermill in a child process. Returns (status, seconds, error)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    params_file = output.with_suffix(".parameters.yaml")
    params_file.write_text(yaml.safe_dump(parameters, sort_keys=False))
    cmd = [
        sys.executable, "-m", "papermill", str(source), str(output),
        "-k", KERNEL, "-f", str(params_file), "--cwd", str(source.parent),
        "--no-progress-bar", "--log-level", "ERROR", "--execution-timeout", str(int(timeout_s)),
    ]  # fmt: skip
    log = log or output.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=_kernel_env(), start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s + 60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout", time.perf_counter() - start, f"timed out after {timeout_s:.0f} s (see {log})"
    seconds = time.perf_counter() - start
    if code == 0:
        return ("error", seconds, problem) if (problem := figure_problem(output)) else ("ok", seconds, None)
    found = first_error(output) if output.is_file() else None
    if found and found[2].get("ename") == "MissingData":  # the message says what to fetch, and how
        return "missing-data", seconds, found[2].get("evalue")
    error = describe_failure(output) if output.is_file() else None
    log_text = log.read_text()
    if error is None:
        error = "papermill failed:\n    " + "\n    ".join(log_text.strip().splitlines()[-5:])
    if "CellTimeoutError" in log_text or "timed out" in log_text:
        return "timeout", seconds, f"timed out after {timeout_s:.0f} s in {error}"
    return "error", seconds, error


@dataclasses.dataclass
class Report:
    profile: str
    results: list[NotebookResult]
    environment: dict[str, Any]
    started: str

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.status == "ok" for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "ok": self.ok,
            "started": self.started,
            "environment": self.environment,
            "notebooks": [r.to_json() for r in self.results],
        }

    def to_markdown(self) -> str:
        env = self.environment
        lines = [
            f"# uniir-kit report: profile `{self.profile}`",
            "",
            f"**{'PASS' if self.ok else 'FAIL'}**: {sum(r.status == 'ok' for r in self.results)} of "
            f"{len(self.results)} notebooks ok. Started {self.started}.",
            "",
            f"Environment: python {env.get('python')}, torch {env.get('torch')}, transformers "
            f"{env.get('transformers')}, open_clip {env.get('open_clip')}, device "
            f"{env.get('cuda') or 'cpu'} ({env.get('cpu_count')} cpus), git {env.get('git')}.",
            "",
            "| notebook | status | seconds |",
            "|---|---|---:|",
        ]
        lines += [f"| {r.name} | {r.status} | {r.seconds:.1f} |" for r in self.results]
        for r in self.results:
            lines += ["", f"## {r.name}: {r.status}", ""]
            if r.error:
                lines += ["```", r.error, "```", ""]
            if r.checks:
                lines += ["| metric | measured | expected | ok |", "|---|---:|---|---|"]
                mark = {True: "pass", False: "**FAIL**"}
                for c in (c for c in r.checks if c.ok is not None):  # unchecked ones stay in report.json
                    value = "missing" if c.value is None else f"{c.value:.4g}"
                    lines.append(f"| {c.name} | {value} | {c.describe_expected()} | {mark[c.ok]} |")
        return "\n".join(lines) + "\n"


def reproduce(
    profile: str = "tiny",
    only: list[str] | None = None,
    nb_dir: Path | None = None,
    expected: Path | None = None,
    out_dir: Path | None = None,
    timeout_s: float | None = None,
    overrides: dict[str, Any] | None = None,
    echo=print,
) -> Report:
    """Run the manifest's notebooks in order, compare their metrics, write report.md and report.json.

    `overrides` replace profile knobs for this run only (`--set DEVICE=cpu`)."""
    nb_dir = Path(nb_dir or notebooks_dir())
    names = read_manifest(nb_dir / "manifest.yaml")
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"not in {nb_dir / 'manifest.yaml'}: {', '.join(unknown)}")
        names = [n for n in names if n in only]
    parameters = {**load_profile(profile), **(overrides or {})}
    if out_dir is not None:
        parameters["OUT_DIR"] = str(out_dir)
    out_dir = Path(parameters["OUT_DIR"])
    out_dir = out_dir if out_dir.is_absolute() else repo_root() / out_dir
    expected_file = Path(expected or repo_root() / "results" / f"expected_{profile}.json")
    expectations = load_expected(expected_file) if expected_file.is_file() else {}
    timeout_s = timeout_s or TIMEOUT_S.get(profile, 3600)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    results = []
    for i, name in enumerate(names, 1):
        source = nb_dir / f"{name}.ipynb"
        output = out_dir / f"{name}.ipynb"
        metrics_path = metrics_file(out_dir, name)
        metrics_path.unlink(missing_ok=True)  # a stale file must not stand in for this run
        echo(f"[{i}/{len(names)}] {name} ...", end=" ", flush=True)
        if not source.is_file():
            result = NotebookResult(name, 0.0, "missing", error=f"{source} does not exist (run `make notebooks`)")
        else:
            status, seconds, error = run_notebook(source, output, parameters, timeout_s)
            result = NotebookResult(name, seconds, status, output, error)
        if result.status == "ok":
            import json

            measured = json.loads(metrics_path.read_text())["metrics"] if metrics_path.is_file() else {}
            if name not in expectations:
                result.status, result.error = "failed", f"no expected values for {name} in {expected_file}"
            elif not measured:
                result.status, result.error = "failed", f"the notebook recorded no metrics ({metrics_path})"
            result.checks = compare_metrics(measured, expectations.get(name, {}))
            misses = [c for c in result.checks if c.ok is False]
            if misses and result.status == "ok":
                result.status = "failed"
                result.error = "metrics out of tolerance: " + "; ".join(
                    f"{c.name} = {'missing' if c.value is None else f'{c.value:.4g}'} (expected {c.describe_expected()})"
                    for c in misses
                )
        echo(f"{result.status} ({result.seconds:.1f} s)")
        if result.error:
            echo("    " + result.error.replace("\n", "\n    "))
        results.append(result)
        if result.status == "missing-data":  # the notebooks after it read the same data: stop here
            echo("    (the remaining notebooks need the same files; fetch them and run again)")
            break

    report = Report(profile, results, environment(), started)
    write_json_atomic(out_dir / "report.json", report.to_json())
    (out_dir / "report.md").write_text(report.to_markdown())
    echo(f"{'PASS' if report.ok else 'FAIL'}: report in {out_dir / 'report.md'}")
    return report


# ---------------------------------------------------------------------------------------------------
# The notebook contract (DESIGN.md), checked by the tests and by `uniir-lite notebooks check`.


def contract_problems(py_path: Path) -> list[str]:
    """What a notebook source breaks of the contract: a `parameters` cell of literal assignments with
    the required knobs, and a last code cell that records metrics under the notebook's own name."""
    import ast

    import jupytext

    from uniir_lite.config import REQUIRED_KNOBS

    name = py_path.stem
    nb = jupytext.read(py_path, fmt="py:percent")
    code = [c for c in nb.cells if c.cell_type == "code"]
    problems = []
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        problems.append(f"{py_path}: needs exactly one code cell tagged 'parameters' (found {len(tagged)})")
    else:
        try:
            tree = ast.parse(tagged[0].source)
        except SyntaxError as e:
            return problems + [f"{py_path}: parameters cell does not parse: {e}"]
        assigned = set()
        for stmt in tree.body:
            ok = isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
            if ok:
                try:
                    ast.literal_eval(stmt.value)
                    assigned.add(stmt.targets[0].id)
                except ValueError:
                    ok = False
            if not ok:
                problems.append(f"{py_path}: parameters cell line {stmt.lineno}: only `NAME = literal` assignments")
        missing = [k for k in REQUIRED_KNOBS if k not in assigned]
        if missing:
            problems.append(f"{py_path}: parameters cell lacks {', '.join(missing)}")
        if code and code[0] is not tagged[0]:
            problems.append(f"{py_path}: the parameters cell must be the first code cell")
    if not code or f'record_metrics("{name}"' not in code[-1].source:
        problems.append(f'{py_path}: the last code cell must call record_metrics("{name}", ...)')
    return problems
