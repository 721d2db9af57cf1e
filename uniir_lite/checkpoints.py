"""Saving and loading the kit's own models: safetensors weights + a JSON config, written atomically.

Never pickles: a checkpoint of the kit cannot run code when loaded. (The released UniIR `.pth`
files are pickles; nothing in the kit reads them yet.) Taught in notebook 01.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_checkpoint(directory: str | Path, model: torch.nn.Module, config: dict[str, Any]) -> Path:
    """Write `model.safetensors` and `config.json` into `directory`, replacing it only when complete."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        # safetensors refuses shared storage (tied weights); contiguous copies are what gets saved
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def has_checkpoint(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / WEIGHTS).is_file() and (directory / CONFIG).is_file()


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, config) of a checkpoint written by `save_checkpoint`."""
    directory = Path(directory)
    if not has_checkpoint(directory):
        raise FileNotFoundError(f"{directory}: no checkpoint ({WEIGHTS} + {CONFIG}) here")
    return load_file(directory / WEIGHTS), json.loads((directory / CONFIG).read_text())
