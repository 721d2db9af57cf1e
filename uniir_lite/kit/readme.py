"""README tables generated from measured files, never typed in.

`make readme` records the wall times and metrics of the latest passing `make reproduce`
(runs/<profile>/report.json) into `results/measured.json` and regenerates the blocks between
`<!-- BEGIN name -->` and `<!-- END name -->` of each page in `PAGES`: the notebook table in
README.md, the checked metrics in results/README.md, and the performance tables in
benchmarks/README.md (from the files that `make bench` writes to `benchmarks/results/`).
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
    from uniir_lite.kit.record import MetricCheck

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


GPU_GOAL_DEVICE = ("nvidia-h100", "NVIDIA H100")  # (file-name prefix, name): where the goals are set


def _num(x: float | None, fmt: str | None = None) -> str:
    """3 significant digits without exponents (0.0439, 2.5, 142, 2,880); `fmt` overrides."""
    if x is None:
        return "-"
    if fmt:
        return fmt.format(x)
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _fastest_candidate(row: dict) -> str:
    """The candidate setting (`details.variants`) with the highest throughput, relative to the kit."""
    speeds = {name: v.get("items_per_s") or v.get("samples_per_s")
              for name, v in row.get("details", {}).get("variants", {}).items()}
    speeds = {name: x for name, x in speeds.items() if x}
    if not speeds or not row["kit"] or row["better"] != "higher":
        return "-"
    name = max(speeds, key=speeds.get)
    return f"{name}: {speeds[name] / row['kit']:.2f}x"


def performance_table(results_dir: str | Path | None = None) -> str:
    """One table per results file of `benchmarks/results/` (measured numbers only), and "not yet
    measured" rows for the GPU the goals are set on while it has no file."""
    from uniir_lite.kit.bench import load_results, planned_results

    docs = load_results(results_dir or repo_root() / "benchmarks" / "results")
    header = ["| benchmark | unit | kit | UniIR recipe | kit vs recipe | limit | of limit | fastest candidate vs kit |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    out = []
    for doc in docs:
        load = doc.get("load", {})
        before, after = (load.get(k, [None])[0] for k in ("loadavg_before", "loadavg_after"))
        limit = doc.get("matmul_limit", {})
        out += [f"**{doc.get('device_name', doc['device'])}**, {doc['date']}, `--size {doc.get('size', '?')}`, "
                f"{limit.get('dtype', '?')} matmul {_num(limit.get('tflops'))} TFLOP/s, "
                f"load average {_num(before, '{:.1f}')} -> {_num(after, '{:.1f}')} "
                f"(`benchmarks/results/{doc['device']}.json`)", ""] + header
        for r in doc["results"]:
            out.append(f"| {r['name']} | {r['unit']} | {_num(r['kit'])} | {_num(r['uniir_recipe'])} | "
                       f"{_num(r['ratio_vs_recipe'], '{:.2f}x')} | {_num(r['limit'])} | "
                       f"{_num(r['fraction_of_limit'] and 100 * r['fraction_of_limit'], '{:.0f}%')} | "
                       f"{_fastest_candidate(r)} |")
        notes = list(dict.fromkeys(r["note"] for r in doc["results"] if r.get("note")))  # once each
        notes += [f"{s['name']}: not run at this size ({s['why']})" for s in doc.get("skipped", [])]
        out += [""] + [f"- {n}" for n in notes] + [""]
    prefix, name = GPU_GOAL_DEVICE
    if not any(doc["device"].startswith(prefix) for doc in docs):
        out += [f"**{name}**: not yet measured (`make bench` on a machine with one)", ""] + header
        out += [f"| {bench_name} | {unit} | not yet measured | not yet measured | - | - | - | - |"
                for bench_name, unit in planned_results("full")]
        out.append("")
    return "\n".join(out).rstrip("\n")


BLOCKS = {"notebooks": notebook_table, "metrics": metrics_table, "performance": performance_table}
# Which generated blocks each page holds (paths relative to the checkout).
PAGES = {"README.md": ("notebooks",), "results/README.md": ("metrics",), "benchmarks/README.md": ("performance",)}


def render(text: str, blocks: tuple[str, ...] = tuple(BLOCKS), page: str = "README.md") -> str:
    for name in blocks:
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"{page} has no '<!-- BEGIN {name} -->' ... '<!-- END {name} -->' block")
        text = pattern.sub(lambda m: m.group(1) + BLOCKS[name]() + "\n" + m.group(2), text)
    return text


def stale_pages() -> list[str]:
    """The pages whose generated blocks differ from what `make readme` would write."""
    root = repo_root()
    return [page for page, blocks in PAGES.items()
            if render((root / page).read_text(), blocks, page) != (root / page).read_text()]


def update_readme() -> bool:
    """Regenerate the blocks of every page in `PAGES`; True when one changed."""
    changed = False
    for page, blocks in PAGES.items():
        path = repo_root() / page
        old = path.read_text()
        new = render(old, blocks, page)
        if new != old:
            path.write_text(new)
            changed = True
    return changed
