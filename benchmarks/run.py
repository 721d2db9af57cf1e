"""Run the kit's speed and memory benchmarks and write benchmarks/results/<device>.json.

    python benchmarks/run.py                    # auto: full sizes on a GPU, small on CPU (`make bench`)
    python benchmarks/run.py --size ci --out /tmp/bench   # seconds, for tests
    python benchmarks/run.py --only search --profile runs/bench/profiles

What is measured, and against what, is described in `uniir_lite/kit/bench.py`.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from uniir_lite.kit import bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="auto", choices=["auto", *bench.SIZES],
                        help="auto: full on a GPU, small on CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--only", default="embed,train,search", help="comma-separated subset of embed,train,search")
    parser.add_argument("--out", default=str(bench.RESULTS_DIR), help="folder of the results file")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is steadier on a busy machine)")
    parser.add_argument("--profile", default=None, metavar="DIR", help="also write profiler tables of the kit's paths to DIR")
    args = parser.parse_args(argv)
    parts = tuple(p for p in args.only.split(",") if p)
    unknown = set(parts) - {"embed", "train", "search"}
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    doc = bench.run_all(args.size, args.device, parts, profile_dir=args.profile)
    bench.check_results(doc)
    path = bench.write_results(doc, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
