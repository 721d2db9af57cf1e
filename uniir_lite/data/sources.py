"""Where a profile's data comes from: the synthetic benchmark (`tiny`, `gpu`) or real M-BEIR (`full`).

`data_root(cfg)` is what every notebook's setup returns as `cfg.data_root`. Taught in notebook 00.
"""

from __future__ import annotations

from pathlib import Path

from uniir_lite.data.mbeir import EVAL_PAIRS, global_pool_path, instructions_path, query_path, union_train_path

# The size of the real M-BEIR download (its dataset card's file listing).
MBEIR_HUB = "TIGER-Lab/M-BEIR"
MBEIR_IMAGES_GB = 169  # mbeir_images.tar.gz, four parts (48.3 + 48.3 + 48.3 + 24.4 GB)
MBEIR_GLOBAL_POOL_GB = 2.43  # the 5.6M-candidate global test pool, the largest of the jsonl files


class MissingData(FileNotFoundError):
    """The profile's data is not on disk. The message says what to fetch, how big it is, and how.

    In a notebook it is shown as its message alone, without a traceback (IPython calls
    `_render_traceback_`): the message is the whole story."""

    def _render_traceback_(self) -> list[str]:
        return [f"MissingData: {self}"]


def mbeir_missing(root: str | Path) -> list[str]:
    """The M-BEIR files and folders `root` lacks (relative paths); empty when it looks complete."""
    root = Path(root)
    needed = [instructions_path(root), union_train_path(root), global_pool_path(root, "test"),
              query_path(root, "test", EVAL_PAIRS[0].name), root / "mbeir_images"]
    return [str(p.relative_to(root)) for p in needed if not p.exists()]


def require_mbeir(root: str | Path) -> Path:
    """`root` if it holds M-BEIR, else a `MissingData` error with the download instructions."""
    root = Path(root)
    missing = mbeir_missing(root)
    if missing:
        lacks = "which does not exist" if not root.exists() else f"which lacks {', '.join(missing)}"
        raise MissingData(
            f"the full profile reads the real M-BEIR from DATA_DIR={root}, {lacks}.\n"
            f"Fetch M-BEIR (about {MBEIR_IMAGES_GB} GB of images in four tar parts, plus the queries, pools and "
            f"qrels as jsonl, the largest the {MBEIR_GLOBAL_POOL_GB} GB global pool; extracting the images takes hours):\n"
            f"    git lfs install && git clone https://huggingface.co/datasets/{MBEIR_HUB} {root}\n"
            f"    cd {root} && cat mbeir_images.tar.gz.part-0* | tar -xzf -\n"
            f"or point the run at a copy you have: `make reproduce PROFILE=full SET=\"DATA_DIR=/path/to/M-BEIR\"` "
            f"(in a notebook: DATA_DIR = \"/path/to/M-BEIR\"). Check a copy with `uniir-lite data validate DIR`. "
            f"Without it, the tiny profile runs everything offline on the synthetic benchmark."
        )
    return root


def data_root(cfg) -> Path:
    """The M-BEIR-format directory a notebook reads: for the synthetic sizes, the synthetic benchmark
    (written once into `DATA_DIR`, then reused); for `DATA_SIZE: full`, the real M-BEIR in `DATA_DIR`."""
    from uniir_lite.data.synthetic import SIZES, write_benchmark

    if cfg.data_size in SIZES:
        return write_benchmark(cfg.data_dir, size=cfg.data_size, seed=cfg.seed)
    if cfg.data_size == "full":
        return require_mbeir(cfg.data_dir)
    raise ValueError(f"DATA_SIZE={cfg.data_size!r}: choose 'full' (real M-BEIR) or a synthetic size ({', '.join(SIZES)})")
