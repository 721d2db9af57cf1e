"""Writing the whole synthetic benchmark: the manifest, `write_benchmark` and `uniir-lite data synth`.

Taught in notebook 00. `_generate` runs the ten dataset builders in UniIR's dataset-id order,
then writes the union files and the instructions, and records what it wrote in `synthetic.json`
so the same call on the same directory writes nothing the second time.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from uniir_lite.data.mbeir import (
    DATASET_NAMES, EVAL_PAIRS, TASKS, PathLike, global_pool_path, instructions_path, query_path, union_train_path,
    write_instructions,
)
from uniir_lite.data.synthetic.composed import _cirr, _fashioniq
from uniir_lite.data.synthetic.datasets import (
    _edis, _fashion200k, _infoseek, _mscoco, _nights, _oven, _visualnews, _webqa, _wiki,
)
from uniir_lite.data.synthetic.texts import INSTRUCTIONS
from uniir_lite.data.synthetic.writer import SIZES, SynthSize, _write_unions, _Writer
from uniir_lite.io import write_text_atomic

GENERATOR = "uniir_lite.data.synthetic"
GENERATOR_VERSION = 2  # bumped whenever the same seed and size would write different files
MANIFEST = "synthetic.json"
# What write_benchmark owns inside its directory (and may delete to regenerate).
_OUTPUTS = ("query", "cand_pool", "qrels", "instructions", "mbeir_images")


def _resolve(size: str | SynthSize) -> SynthSize:
    if isinstance(size, SynthSize):
        return size
    if size not in SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; choose one of {', '.join(SIZES)}")
    return SIZES[size]


def _read_manifest(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); delete it or choose another "
                         f"directory") from None
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR:
        raise ValueError(f"{path}:1: not written by {GENERATOR}; choose another directory")
    return manifest


def _clear(root: Path, previous: dict | None) -> None:
    """Remove an earlier synthetic benchmark; refuse to touch a directory that holds anything else."""
    present = [name for name in _OUTPUTS if (root / name).exists()]
    if present and previous is None:
        raise FileExistsError(
            f"{root} already holds {', '.join(present)} but no {MANIFEST}, so it is not a synthetic "
            f"benchmark and nothing there is overwritten; choose a new or empty directory")
    for name in present:
        shutil.rmtree(root / name)


def _dumps(obj: dict) -> str:
    return json.dumps(obj, indent=2) + "\n"


def _generate(root: Path, size: SynthSize, seed: int, image_px: int, progress: bool, force: bool) -> bool:
    """Write the benchmark unless `root` already holds this one; True when it was (re)written."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(image_px, int) or image_px < 16:
        raise ValueError(f"image_px must be an integer of at least 16, got {image_px!r}")
    identity = {"generator": GENERATOR, "version": GENERATOR_VERSION, "size": size.name, "seed": seed,
                "image_px": image_px, "sizes": asdict(size)}
    manifest = root / MANIFEST
    previous = _read_manifest(manifest)
    if (not force and previous is not None and previous.get("complete")
            and {key: previous.get(key) for key in identity} == identity):
        return False
    root.mkdir(parents=True, exist_ok=True)
    _clear(root, previous)
    # Written first, so an interrupted run is recognised (and cleaned) as ours next time.
    write_text_atomic(manifest, _dumps({**identity, "complete": False}))
    b = _Writer(root, size, seed, image_px)
    try:
        wiki = _wiki(b)
        roles: list[tuple[str, Callable[[], None]]] = [  # in UniIR's dataset-id order
            ("VisualNews", lambda: _visualnews(b)), ("Fashion200K", lambda: _fashion200k(b)),
            ("WebQA", lambda: _webqa(b, wiki)), ("EDIS", lambda: _edis(b)), ("NIGHTS", lambda: _nights(b)),
            ("OVEN", lambda: _oven(b, wiki)), ("INFOSEEK", lambda: _infoseek(b, wiki)),
            ("FashionIQ", lambda: _fashioniq(b)), ("CIRR", lambda: _cirr(b)), ("MSCOCO", lambda: _mscoco(b)),
        ]
        for name, role in roles:
            role()
            b.commit(keep=[b.train_pool])  # the union train pool fills across all datasets
            if progress:
                print(f"synthetic {size.name}: {name} written ({b.images} images so far)", flush=True)
        b.commit()
        factors = _write_unions(b)
        write_instructions(instructions_path(root), [
            (TASKS[p.task_id].query_modality, TASKS[p.task_id].cand_modality, DATASET_NAMES[p.dataset_id],
             p.dataset_id, list(INSTRUCTIONS[p.name])) for p in EVAL_PAIRS
        ])
    except BaseException:
        b.discard()
        raise
    write_text_atomic(manifest, _dumps({**identity, "complete": True, "upsample": factors, "images": b.images,
                                        "files": dict(sorted(b.lines.items()))}))
    return True


def write_benchmark(out_dir: PathLike, size: str | SynthSize = "tiny", seed: int = 0, image_px: int = 64,
                    progress: bool = False) -> Path:
    """Write the synthetic benchmark in M-BEIR's layout under `out_dir` and return that path.

    Taught in notebook 00. Records stream to disk as they are made and every file (images too)
    appears atomically; the same seed gives byte-identical files. When `out_dir/synthetic.json`
    already records this generator version, size, seed and image size, nothing is written.
    """
    _generate(Path(out_dir), _resolve(size), seed, image_px, progress, force=False)
    return Path(out_dir)


def ensure_benchmark(data_dir: PathLike, size: str | SynthSize, seed: int) -> Path:
    """The notebooks' setup call: the benchmark at `data_dir`, written only if not there yet.

    Taught in notebook 00.
    """
    return write_benchmark(data_dir, size, seed)


def synth_command(out: str, size: str, seed: int, force: bool = False) -> int:
    """`uniir-lite data synth OUT --size tiny --seed 0 [--force]`: write it and print one summary line."""
    start = time.perf_counter()
    try:
        spec = _resolve(size)
        written = _generate(Path(out), spec, seed, 64, progress=False, force=force)
        manifest = _read_manifest(Path(out) / MANIFEST) or {}
    except (ValueError, OSError) as e:  # FileExistsError is an OSError
        print(f"error: {e}")
        return 1
    files = manifest["files"]
    union = files[union_train_path(".").as_posix()]
    tests = sum(files[query_path(".", "test", p.name).as_posix()] for p in EVAL_PAIRS)
    pool = files[global_pool_path(".", "test").as_posix()]
    print(f"{'wrote' if written else 'already there:'} synthetic {spec.name} benchmark (seed {seed}) "
          f"in {out}: {union:,} union training queries, {tests:,} test queries, {pool:,} global test candidates, "
          f"{manifest['images']:,} images, {time.perf_counter() - start:.1f} s")
    return 0
