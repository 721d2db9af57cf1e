"""The `uniir-lite` command. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import sys


def _reproduce(args: argparse.Namespace) -> int:
    from uniir_lite.config import parse_overrides
    from uniir_lite.kit.harness import reproduce

    report = reproduce(
        args.profile, only=args.only, expected=args.expected, out_dir=args.out_dir, timeout_s=args.timeout,
        overrides=parse_overrides(args.set),
    )
    return 0 if report.ok else 1


def _notebooks(args: argparse.Namespace) -> int:
    from uniir_lite.kit.harness import contract_problems, notebooks_dir, paired_ipynb_text, sync_notebooks

    if args.action == "sync":
        changed = sync_notebooks()
        print(f"regenerated {len(changed)} notebook(s)" + "".join(f"\n  {p.name}" for p in changed))
        return 0
    stale = [
        py.name for py in sorted(notebooks_dir().glob("[0-9][0-9]_*.py"))
        if not py.with_suffix(".ipynb").is_file() or py.with_suffix(".ipynb").read_text() != paired_ipynb_text(py)
    ]  # fmt: skip
    problems = [f"{name}: the paired .ipynb is out of date; run `make notebooks`" for name in stale]
    problems += [p for py in sorted(notebooks_dir().glob("[0-9][0-9]_*.py")) for p in contract_problems(py)]
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def _readme(args: argparse.Namespace) -> int:
    from uniir_lite.kit.readme import record_run, update_readme

    if args.record:
        print(f"recorded the run in {record_run(args.record)}")
    changed = update_readme()
    print("README.md updated" if changed else "README.md already up to date")
    return 0


def _data_validate(args: argparse.Namespace) -> int:
    from uniir_lite.data.validate import validate_command

    return validate_command(args.dir, args.pairs, max_show=args.max_show)


def _data_synth(args: argparse.Namespace) -> int:
    from uniir_lite.data.synthetic import synth_command

    return synth_command(args.out, args.size, args.seed, force=args.force)


def _eval_run(args: argparse.Namespace) -> int:
    from uniir_lite.metrics import eval_run_command

    return eval_run_command(args.run, args.qrels, args.pool, args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniir-lite", description="uniir-kit: notebooks and tools for UniIR / M-BEIR.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reproduce", help="run every notebook of a profile and write runs/<profile>/report.md")
    p.add_argument("--profile", default="tiny")
    p.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run only these notebooks (names from the manifest)")
    p.add_argument("--expected", help="expected-values file (default results/expected_<profile>.json)")
    p.add_argument("--out-dir", help="where executed notebooks, metrics and the report go (default: the profile's OUT_DIR)")
    p.add_argument("--timeout", type=float, help="seconds per notebook")
    p.add_argument("--set", action="append", metavar="KNOB=VALUE",
                   help="override a profile knob for this run only, e.g. --set DEVICE=cpu (repeatable)")
    p.set_defaults(func=_reproduce)

    p = sub.add_parser("notebooks", help="regenerate (sync) or check the paired .ipynb files")
    p.add_argument("action", choices=["sync", "check"])
    p.set_defaults(func=_notebooks)

    p = sub.add_parser("readme", help="regenerate the README's measured tables")
    p.add_argument("--record", metavar="REPORT_JSON", help="first record the wall times and metrics of this report.json")
    p.set_defaults(func=_readme)

    data = sub.add_parser("data", help="M-BEIR data: validate a directory, write the synthetic benchmark")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("validate", help="check an M-BEIR directory (or a subset); one line per problem")
    p.add_argument("dir")
    p.add_argument("--pairs", nargs="+", metavar="PAIR", help="only these pairs, e.g. cirr_task7 mscoco_task0")
    p.add_argument("--max-show", type=int, default=20, help="problems to print before summarising")
    p.set_defaults(func=_data_validate)
    p = data_sub.add_parser("synth", help="write the synthetic benchmark in the M-BEIR layout")
    p.add_argument("out")
    p.add_argument("--size", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rewrite even if the directory is up to date")
    p.set_defaults(func=_data_synth)

    p = sub.add_parser("eval-run", help="score a TREC run file against M-BEIR qrels (the paper's table)")
    p.add_argument("--run", required=True)
    p.add_argument("--qrels", required=True)
    p.add_argument("--pool", help="candidate pool jsonl, for the modality-error rate")
    p.add_argument("--json", action="store_true", help="print one JSON object per (dataset, task) pair")
    p.set_defaults(func=_eval_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"uniir-lite: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
