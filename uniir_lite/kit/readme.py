"""README tables and figures generated from measured files, never typed in.

`make readme` records the wall times and metrics of the latest passing `make reproduce`
(runs/<profile>/report.json) into `results/measured.json`, copies the README's figures (`FIGURES`) of
a `README_PROFILE` run from the run's FIG_DIR into committed `figures/`, and regenerates the blocks
between `<!-- BEGIN name -->` and `<!-- END name -->` of each page in `PAGES`: the notebook table and
the figures in README.md, the checked metrics in results/README.md, and the performance tables in
benchmarks/README.md (from the files that `make bench` writes to `benchmarks/results/`).

The notebook table shows, per notebook, the headline metrics declared in `HEADLINES` (one or two
checked metrics, measured in the recorded `README_PROFILE` run beside their expectation in
results/expected_<profile>.json) and the minutes each profile's recorded run took.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import yaml

from uniir_lite.config import repo_root
from uniir_lite.io import atomic_open, write_json_atomic

PROFILES = ("tiny", "gpu", "full")


def measured_path() -> Path:
    return repo_root() / "results" / "measured.json"


def load_measured() -> dict:
    path = measured_path()
    return json.loads(path.read_text()) if path.is_file() else {}


# The profile whose recorded run gives the README its headline numbers and figures.
README_PROFILE = "tiny"

# What the README's table shows of each notebook: one or two metrics of its recorded run, each with
# the words a newcomer reads for it. Every key must be a *checked* metric (one with an expectation in
# results/expected_<README_PROFILE>.json); `make readme` fails naming a key that is not.
HEADLINES: dict[str, dict[str, str]] = {
    "00_welcome_and_data": {
        "trivial_local_avg_recall": "a trivial bag-of-words model, avg recall on local pools",
        "trivial_global_cross_modal_modality_error@5": "its modality error@5 in the global pool",
    },
    "01_clip": {
        "t2i_recall@5": "text → image Recall@5 after training",
        "zero_shot_colour_acc": "zero-shot colour accuracy",
    },
    "02_blip": {
        "itc_t2i_recall@5": "ITC text → image Recall@5",
        "itm_positive_above_random_negative": "ITM scores the true pair above a random one",
    },
    "03_blip2_qformer": {
        "qformer_vs_transformers_max_abs_diff": "from-scratch Q-Former vs transformers, max abs diff",
        "stage1_i2t_recall@5_trained": "stage 1 image → text Recall@5",
    },
    "04_instructblip": {
        "heldin_colour_aware": "held-in colour question accuracy, instruction-aware",
        "heldin_colour_blind": "instruction-blind",
    },
    "05_uniir_score_fusion": {
        "trained_local_avg": "CLIP_SF avg of the 16 rows (local pools), multi-task trained",
        "zeroshot_local_avg": "before training",
    },
    "06_uniir_feature_fusion": {
        "clip_sf_local_avg": "CLIP_SF avg of the 16 rows (local pools)",
        "clip_ff_local_avg": "CLIP_FF at the same budget",
    },
    "07_instruction_tuning": {
        "instr_global_avg": "avg of the 16 rows in the global pool, with instructions",
        "noinstr_global_avg": "without",
    },
}

# The figures of the README_PROFILE run that README.md shows (file, caption), in order. `make readme`
# copies them from the run's FIG_DIR (figures/<profile>/) to figures/; each must stay under
# MAX_FIGURE_BYTES, since they are committed.
FIGURES: tuple[tuple[str, str], ...] = (
    ("01_training_curves.png",
     "Notebook 01 trains a tiny CLIP: the InfoNCE loss falls from log N, in-batch accuracy climbs "
     "above chance, and the learned temperature moves only a little in so few steps (the notebook says why)."),
    ("06_ff_vs_sf.png",
     "Notebook 06: feature fusion minus score fusion on the same towers (CLIP_FF - CLIP_SF, BLIP_FF - BLIP_SF), "
     "per row of the paper's table, at an equal training budget; a bar left of 0 is a row where score fusion "
     "retrieves better. The notebook sets the 2x2 beside the paper's Table 2."),
    ("07_modality_error.png",
     "Notebook 07: share of the top 5 in the global pool with the wrong modality, with and without "
     "instructions."),
)
MAX_FIGURE_BYTES = 150_000


def figures_dir() -> Path:
    """Where the README's figures are committed."""
    return repo_root() / "figures"


def run_figure_dir(report_json: str | Path, profile: str) -> Path:
    """Where the run of `report_json` saved its figures: the FIG_DIR its notebooks were given (the
    `*.parameters.yaml` beside the report), relative to the checkout that ran them (the nearest folder
    above the report holding `profiles/`, else this one)."""
    report_dir = Path(report_json).resolve().parent
    params = sorted(report_dir.glob("*.parameters.yaml"))
    given = (yaml.safe_load(params[0].read_text()) or {}).get("FIG_DIR") if params else None
    fig_dir = Path(given or f"figures/{profile}")
    if fig_dir.is_absolute():
        return fig_dir
    run_root = next((p for p in report_dir.parents if (p / "profiles").is_dir()), repo_root())
    return run_root / fig_dir


def headline_checks(metrics: dict[str, dict], headlines: dict[str, dict[str, str]] | None = None) -> dict:
    """{notebook: [(label, MetricCheck), ...]} of the declared headlines in a run's recorded metrics
    ({notebook: {metric: {"value", "expected", "tolerance", "check", "ok"}}}); a headline that the run
    did not check (no expectation, or not recorded) is an error naming it."""
    headlines = HEADLINES if headlines is None else headlines
    out, problems = {}, []
    for notebook, keys in headlines.items():
        out[notebook] = []
        for key, label in keys.items():
            m = metrics.get(notebook, {}).get(key)
            if m is None or m.get("ok") is None:
                problems.append(f"{notebook}/{key}: " + ("not recorded" if m is None else "recorded but not checked"))
                continue
            out[notebook].append((label, _check(key, m)))
    if problems:
        raise ValueError("a headline of readme.HEADLINES must be a checked metric of the recorded run: "
                         + "; ".join(problems))
    return out


def _check(name: str, m: dict):
    from uniir_lite.kit.record import MetricCheck

    return MetricCheck(name, **m)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def record_run(report_json: str | Path) -> Path:
    """Copy the per-notebook seconds and checked metrics of a passing report into results/measured.json
    and, for a README_PROFILE run, its FIGURES into figures/. Everything is checked before anything is
    written: a failed run, a headline the run did not check, or a missing or oversized figure."""
    report = json.loads(Path(report_json).read_text())
    if not report.get("ok"):
        raise ValueError(f"{report_json}: the run did not pass; record only from a passing run")
    profile, env = report["profile"], report["environment"]
    metrics = {nb["name"]: nb["metrics"] for nb in report["notebooks"]}
    run = {
        "device": env.get("cuda") or f"cpu ({env.get('cpu_count')} cores)",
        "date": report["started"][:10],
        "git": env.get("git"),
        "seconds": {nb["name"]: nb["seconds"] for nb in report["notebooks"]},
        "metrics": metrics,
    }
    sources = []
    if profile == README_PROFILE:
        headline_checks(metrics)
        fig_dir = run_figure_dir(report_json, profile)
        for name, _ in FIGURES:
            src = fig_dir / name
            if not src.is_file():
                raise FileNotFoundError(f"{src}: a figure of readme.FIGURES that the run did not save")
            if src.stat().st_size > MAX_FIGURE_BYTES:
                raise ValueError(f"{src}: {src.stat().st_size:,} bytes, over the {MAX_FIGURE_BYTES:,} a committed "
                                 "figure may have; pick another in readme.FIGURES or save it smaller")
            sources.append(src)
        run["figures"] = {src.name: _digest(src) for src in sources}
    for src in sources:
        with atomic_open(figures_dir() / src.name, "wb") as f:
            f.write(src.read_bytes())
    measured = load_measured()
    measured[profile] = run
    write_json_atomic(measured_path(), measured)
    return measured_path()


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _headline_cell(checks: list) -> str:
    return "; ".join(f"{label} **{_num(c.value)}** ({c.describe_expected()})" for label, c in checks) or "-"


def notebook_table(headlines: dict[str, dict[str, str]] | None = None) -> str:
    """One row per notebook of the manifest: what it teaches (notebooks/manifest.yaml), its headline
    numbers measured in the recorded README_PROFILE run beside their expectation, and the minutes of
    each profile's recorded run (with what the profile needs)."""
    manifest = yaml.safe_load((repo_root() / "notebooks" / "manifest.yaml").read_text())
    headlines = HEADLINES if headlines is None else headlines
    unknown = sorted(set(headlines) - {entry["name"] for entry in manifest["notebooks_info"]})
    if unknown:
        raise ValueError(f"readme.HEADLINES names notebooks that are not in the manifest: {', '.join(unknown)}")
    measured = load_measured()
    base = measured.get(README_PROFILE)
    checks = headline_checks(base["metrics"], headlines) if base else {}
    header = (f"| # | notebook | what it teaches | headline numbers, `{README_PROFILE}` run: measured (expected) | "
              + " | ".join(f"{p}, on {measured[p]['device']}" if p in measured else p for p in PROFILES) + " |")
    lines = [header, "|---|---|---|---|" + "---:|" * len(PROFILES)]
    for entry in manifest["notebooks_info"]:
        name = entry["name"]
        cells = []
        for profile in PROFILES:
            seconds = measured.get(profile, {}).get("seconds", {}).get(name)
            need = entry["hardware"][profile]
            cells.append(f"{_minutes(seconds)}, {need}" if seconds is not None else f"not yet measured, {need}")
        headline = _headline_cell(checks.get(name, [])) if base else "not yet measured"
        lines.append(f"| {name[:2]} | [{name}](notebooks/{name}.ipynb) | {entry['teaches']} | {headline} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def figures_block() -> str:
    """The FIGURES, as committed in figures/ by the last recorded README_PROFILE run, with captions."""
    run = load_measured().get(README_PROFILE)
    if not run or "figures" not in run:
        return f"(no recorded `{README_PROFILE}` run yet: `make reproduce && make readme`)"
    out = [f"From the recorded `{README_PROFILE}` run ({run['device']}, {run['date']}, git {run['git']}); "
           f"`make readme` copies them from `figures/{README_PROFILE}/` into `figures/`.", ""]
    for name, caption in FIGURES:
        out += [f"![{Path(name).stem}](figures/{name})", "", f"*{caption}*", ""]
    return "\n".join(out).rstrip("\n")


def metrics_table(profile: str = "tiny") -> str:
    """The checked metrics of each notebook: measured in the recorded run, and the expected range."""
    run = load_measured().get(profile)
    if not run:
        return f"(no recorded `{profile}` run yet: `make reproduce && make readme`)"
    lines = [f"Measured on {run['device']}, {run['date']}, git {run['git']}.", "",
             "| notebook | metric | measured | expected |", "|---|---|---:|---|"]
    for notebook, metrics in run["metrics"].items():
        for name, m in metrics.items():
            if m["ok"] is None:
                continue
            lines.append(f"| {notebook} | {name} | {m['value']:.4g} | {_check(name, m).describe_expected()} |")
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


BLOCKS = {"notebooks": notebook_table, "figures": figures_block, "metrics": metrics_table,
          "performance": performance_table}
# Which generated blocks each page holds (paths relative to the checkout).
PAGES = {"README.md": ("notebooks", "figures"), "results/README.md": ("metrics",),
         "benchmarks/README.md": ("performance",)}


def render(text: str, blocks: tuple[str, ...] = tuple(BLOCKS), page: str = "README.md") -> str:
    for name in blocks:
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"{page} has no '<!-- BEGIN {name} -->' ... '<!-- END {name} -->' block")
        text = pattern.sub(lambda m: m.group(1) + BLOCKS[name]() + "\n" + m.group(2), text)
    return text


def stale_pages() -> list[str]:
    """The pages whose generated blocks differ from what `make readme` would write, and the committed
    figures that are missing or differ from the ones the recorded run copied."""
    root = repo_root()
    stale = [page for page, blocks in PAGES.items()
             if render((root / page).read_text(), blocks, page) != (root / page).read_text()]
    recorded = load_measured().get(README_PROFILE, {}).get("figures", {})
    for name in dict.fromkeys([name for name, _ in FIGURES] + list(recorded)):
        path = figures_dir() / name
        if name not in recorded or not path.is_file() or _digest(path) != recorded[name]:
            stale.append(f"figures/{name}")
    return stale


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
