"""README tables generated from measured files, never typed in.

`make readme` records the wall times and metrics of the latest passing `make reproduce`
(runs/<profile>/report.json) into `results/measured.json` and regenerates the blocks between
`<!-- BEGIN name -->` and `<!-- END name -->`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from uniir_lite.config import repo_root
from uniir_lite.io import write_json_atomic

PROFILES = ("tiny", "gpu", "full")


def measured_path() -> Path:
    return repo_root() / "results" / "measured.json"


def load_measured() -> dict:
    path = measured_path()
    return json.loads(path.read_text()) if path.is_file() else {}


def record_run(report_json: str | Path) -> Path:
    """Copy the per-notebook seconds and checked metrics of a passing report into results/measured.json."""
    report = json.loads(Path(report_json).read_text())
    if not report.get("ok"):
        raise ValueError(f"{report_json}: the run did not pass; record only from a passing run")
    env = report["environment"]
    measured = load_measured()
    measured[report["profile"]] = {
        "device": env.get("cuda") or f"cpu ({env.get('cpu_count')} cores)",
        "date": report["started"][:10],
        "git": env.get("git"),
        "seconds": {nb["name"]: nb["seconds"] for nb in report["notebooks"]},
        "metrics": {nb["name"]: nb["metrics"] for nb in report["notebooks"]},
    }
    write_json_atomic(measured_path(), measured)
    return measured_path()


def notebook_table() -> str:
    manifest = yaml.safe_load((repo_root() / "notebooks" / "manifest.yaml").read_text())
    measured = load_measured()
    header = "| # | notebook | what it teaches | " + " | ".join(
        f"{p} ({measured[p]['device']})" if p in measured else p for p in PROFILES
    ) + " |"
    lines = [header, "|---|---|---|" + "---:|" * len(PROFILES)]
    for entry in manifest["notebooks_info"]:
        cells = []
        for profile in PROFILES:
            seconds = measured.get(profile, {}).get("seconds", {}).get(entry["name"])
            need = entry["hardware"][profile]
            cells.append(f"{seconds / 60:.1f} min, {need}" if seconds is not None else f"not yet measured, {need}")
        number = entry["name"][:2]
        lines.append(f"| {number} | [{entry['name']}](notebooks/{entry['name']}.ipynb) | {entry['teaches']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_table(profile: str = "tiny") -> str:
    """The checked metrics of each notebook: measured in the recorded run, and the expected range."""
    from uniir_lite.record import MetricCheck

    run = load_measured().get(profile)
    if not run:
        return f"(no recorded `{profile}` run yet: `make reproduce && make readme`)"
    lines = [f"Measured on {run['device']}, {run['date']}, git {run['git']}.", "",
             "| notebook | metric | measured | expected |", "|---|---|---:|---|"]
    for notebook, metrics in run["metrics"].items():
        for name, m in metrics.items():
            if m["ok"] is None:
                continue
            check = MetricCheck(name, m["value"], m["expected"], m["tolerance"], m["check"], m["ok"])
            lines.append(f"| {notebook} | {name} | {m['value']:.4g} | {check.describe_expected()} |")
    return "\n".join(lines)


BLOCKS = {"notebooks": notebook_table, "metrics": metrics_table}


def render(text: str) -> str:
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README.md has no '<!-- BEGIN {name} -->' ... '<!-- END {name} -->' block")
        text = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def update_readme() -> bool:
    path = repo_root() / "README.md"
    old = path.read_text()
    new = render(old)
    if new != old:
        path.write_text(new)
    return new != old
