"""Seeding, device choice and the one-line environment summary of every notebook's setup cell.

Taught in notebook 00.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import random
import subprocess
import sys
from typing import Any, Mapping

import numpy as np
import torch

from uniir_lite.config import KNOBS, Config, repo_root, resolve


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def pick_device(name: str | None) -> torch.device:
    """`"auto"` takes CUDA when present; asking for CUDA without one is a clear error."""
    name = (name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"DEVICE={name!r} but torch sees no CUDA device; use the tiny profile or DEVICE='cpu'"
        )
    return torch.device(name)


def git_sha() -> str:
    """Short SHA of the checkout, with '+dirty' when tracked files have uncommitted changes."""
    try:
        root = repo_root()
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"cpu ({torch.get_num_threads()} threads)"


def environment() -> dict[str, Any]:
    """Versions and hardware, recorded in every report."""
    import transformers

    try:
        import open_clip

        open_clip_version = open_clip.__version__
    except ImportError:  # pragma: no cover - part of the pinned stack
        open_clip_version = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "open_clip": open_clip_version,
        "numpy": np.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "git": git_sha(),
    }


def setup(notebook_globals: Mapping[str, Any] | str = "tiny", /, **knobs: Any) -> Config:
    """The setup cell of every notebook: `cfg = uniir_lite.setup(globals())`.

    Reads `PROFILE` and the shared knobs (`KNOBS`) from the notebook's globals (its `parameters`
    cell, plus what papermill injects), fills every `None` from the profile, seeds Python, NumPy and
    torch, picks the device, makes the output folders, applies the plot style and finds the data:
    `cfg.data_root` is the synthetic benchmark (`tiny`, `gpu`; written once, then reused) or the real
    M-BEIR (`full`; missing files raise `MissingData`, which says what to fetch). Prints one line about
    the run. `setup("tiny", MAX_STEPS=10)` does the same outside a notebook.
    """
    from uniir_lite.data.sources import data_root
    from uniir_lite.viz import use_style

    if isinstance(notebook_globals, Mapping):
        profile = notebook_globals.get("PROFILE") or "tiny"
        knobs = {**{k: notebook_globals.get(k) for k in KNOBS if k != "PROFILE"}, **knobs}
    else:
        profile = notebook_globals
    cfg = resolve(profile, **knobs)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    cfg = dataclasses.replace(cfg, device=str(device))
    for path in (cfg.out_dir, cfg.metrics_dir, cfg.fig_dir):
        path.mkdir(parents=True, exist_ok=True)
    use_style()
    print(
        f"uniir-kit | profile {cfg.profile} | {describe_device(device)} | seed {cfg.seed} | "
        f"python {platform.python_version()} torch {torch.__version__} | git {git_sha()}",
        file=sys.stdout,
    )
    return dataclasses.replace(cfg, data_root=data_root(cfg))
