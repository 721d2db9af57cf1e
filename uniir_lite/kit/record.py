"""Recording a notebook's key metrics, and comparing them with the expected values.

The last code cell of every notebook calls `record_metrics`; `results/expected_<profile>.json` holds the
expected values, and the tests, the notebook's own table and `report.md` all use `compare_metrics`.

An expectation is one of
    {"value": v, "tolerance": t}   |measured - v| <= t
    {"min": a}                      measured >= a   (e.g. "trained recall beats chance by a margin")
    {"max": b}                      measured <= b
    {"min_gain_over": "other", "min": g}   measured - measured["other"] >= g   (a lesson's margin, e.g.
                                    trained beats untrained by g, computed from two recorded keys;
                                    with "max": h also <= h, e.g. "within 0.02 of chance")
Keys starting with "_" are comments. Recorded metrics without an expectation are kept in the
metrics file but left out of the report and the notebook's table.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from pathlib import Path
from typing import Any, Mapping

from uniir_lite.config import Config, repo_root
from uniir_lite.io import write_json_atomic


@dataclasses.dataclass(frozen=True)
class MetricCheck:
    name: str
    value: float | None  # None: not recorded
    expected: float | None  # the value or bound; None: no expectation
    tolerance: float | None
    check: str | None  # "abs", "min", "max", "gain" or None
    ok: bool | None  # None: recorded but not checked
    over: str | None = None  # "gain": the metric the gain is measured over
    base: float | None = None  # "gain": that metric's recorded value
    upper: float | None = None  # "gain": the largest gain allowed (None: no upper bound)

    def to_json(self) -> dict[str, Any]:
        """The check as a report records it (all fields but the name; `MetricCheck(name, **it)` reads it back)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}

    def describe_expected(self) -> str:
        if self.check == "gain":  # the baseline's recorded value beside its name
            over = self.over if self.base is None else f"{self.over} ({_fmt(self.base)})"
            if self.upper is None:
                sign = "-" if self.expected < 0 else "+"
                return f">= {over} {sign} {_fmt(abs(self.expected))}"
            if self.upper == -self.expected:
                return f"{over} ± {_fmt(self.upper)}"
            return f"{over} + {_fmt(self.expected)} to {_fmt(self.upper)}"
        if self.check == "abs":
            return f"{_fmt(self.expected)} ± {_fmt(self.tolerance)}"
        if self.check == "min":
            return f">= {_fmt(self.expected)}"
        if self.check == "max":
            return f"<= {_fmt(self.expected)}"
        return "-"


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.4g}"
    return str(int(x)) if float(x).is_integer() else str(x)


def expected_path(profile: str) -> Path:
    return repo_root() / "results" / f"expected_{profile}.json"


def load_expected(path: Path | str) -> dict[str, dict[str, dict[str, float]]]:
    """Read an expected-values file; a malformed entry is an error naming the notebook and metric."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    out = {}
    for notebook, metrics in data.items():
        if notebook.startswith("_"):
            continue
        out[notebook] = {}
        for name, spec in metrics.items():
            if name.startswith("_"):
                continue
            if not isinstance(spec, dict) or not (
                ("value" in spec and "tolerance" in spec) or "min" in spec or "max" in spec
            ) or ("min_gain_over" in spec and "min" not in spec):
                raise ValueError(
                    f"{path}: {notebook}/{name}: expected {{'value', 'tolerance'}}, {{'min'}}, {{'max'}} or "
                    f"{{'min_gain_over', 'min'[, 'max']}}, got {spec!r}"
                )
            out[notebook][name] = spec
    return out


def compare_metrics(measured: Mapping[str, float], expected: Mapping[str, Mapping[str, float]]) -> list[MetricCheck]:
    """One check per expected metric (missing ones fail), then the recorded but unchecked ones."""
    checks = []
    for name, spec in expected.items():
        value = measured.get(name)
        if "min_gain_over" in spec:
            over = spec["min_gain_over"]
            base = measured.get(over)
            upper = spec.get("max")
            ok = (_is_number(value) and _is_number(base) and value - base >= spec["min"] - 1e-12
                  and (upper is None or value - base <= upper + 1e-12))
            checks.append(MetricCheck(name, value, spec["min"], None, "gain", bool(ok), over, base, upper))
            continue
        if "min" in spec:
            kind, bound, tol = "min", spec["min"], None
        elif "max" in spec:
            kind, bound, tol = "max", spec["max"], None
        else:
            kind, bound, tol = "abs", spec["value"], spec["tolerance"]
        if not _is_number(value):
            ok = False
        elif kind == "min":
            ok = value >= bound
        elif kind == "max":
            ok = value <= bound
        else:
            ok = abs(value - bound) <= tol + 1e-12
        checks.append(MetricCheck(name, value, bound, tol, kind, bool(ok)))
    for name, value in measured.items():
        if name not in expected:
            checks.append(MetricCheck(name, value, None, None, None, None))
    return checks


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not math.isnan(x)


def metrics_file(out_dir: Path, notebook: str) -> Path:
    return Path(out_dir) / "metrics" / f"{notebook}.json"


def record_metrics(notebook: str, metrics: Mapping[str, float], cfg: Config) -> None:
    """The last cell of every notebook: write `OUT_DIR/metrics/<notebook>.json` and show the metrics
    beside their expected values from `results/expected_<profile>.json`.

    Values are plain floats (tensors and NumPy scalars are converted).
    """
    clean = {name: _to_float(name, v) for name, v in metrics.items()}
    write_json_atomic(
        metrics_file(cfg.out_dir, notebook), {"notebook": notebook, "profile": cfg.profile, "metrics": clean}
    )
    path = expected_path(cfg.profile)
    expected = load_expected(path).get(notebook, {}) if path.is_file() else {}
    _display(notebook, compare_metrics(clean, expected), clean)


def _to_float(name: str, value: Any) -> float:
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}") from None


def checks_table_html(checks: list[MetricCheck]) -> str:
    mark = {True: "✅", False: "❌", None: ""}
    rows = "".join(
        f"<tr><td>{html.escape(c.name)}</td><td>{_fmt(c.value)}</td><td>{html.escape(c.describe_expected())}</td>"
        f"<td>{mark[c.ok]}</td></tr>"
        for c in checks
    )
    return f"<table><tr><th>metric</th><th>measured</th><th>expected</th><th></th></tr>{rows}</table>"


def _display(notebook: str, checks: list[MetricCheck], metrics: Mapping[str, float]) -> None:
    """The checked metrics as a table (every recorded one stays in the JSON bundle and the file)."""
    checks = [c for c in checks if c.ok is not None]
    text = "\n".join(f"{c.name:32s} {_fmt(c.value):>10s}   {c.describe_expected()}" for c in checks)
    bundle = {
        "text/plain": text,
        "text/html": checks_table_html(checks),
        "application/json": {
            "notebook": notebook,
            "metrics": dict(metrics),
        },
    }
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        get_ipython = None
    if get_ipython is None or get_ipython() is None:  # outside Jupyter
        print(text)
    else:
        display(bundle, raw=True)
