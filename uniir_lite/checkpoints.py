"""Saving and loading the kit's own models: safetensors weights + a JSON config, written atomically.

Never pickles: a checkpoint of the kit cannot run code when loaded. (The released UniIR `.pth`
files are pickles; nothing in the kit reads them yet.) `train_or_load` is the one train-or-load of
the kit: every model family's `train_or_load_*` is a few lines over it. Taught in notebook 01.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple, Union

import pandas as pd
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


# ---------------------------------------------------------------------------------------------
# The one train-or-load
# ---------------------------------------------------------------------------------------------

Log = Union[pd.DataFrame, dict[str, pd.DataFrame]]


class Trained(NamedTuple):
    model: torch.nn.Module  # in eval mode, on the device asked for
    log: Log  # the training log: a DataFrame, or {part: DataFrame} for a model trained in parts
    saved: dict[str, Any]  # the checkpoint's config.json: recipe, complete, log, and the family's extras
    loaded: bool  # True: read from disk, False: trained by this call


def as_json(recipe: Any) -> Any:
    """A recipe (dataclass or dict) as JSON would give it back: tuples become lists, keys strings."""
    if dataclasses.is_dataclass(recipe) and not isinstance(recipe, type):
        recipe = dataclasses.asdict(recipe)
    return json.loads(json.dumps(recipe))


def _log_to_json(log: Log) -> Any:
    if isinstance(log, dict):
        return {name: part.to_dict(orient="records") for name, part in log.items()}
    return log.to_dict(orient="records")


def _log_from_json(records: Any) -> Log:
    if isinstance(records, dict):
        return {name: pd.DataFrame(part) for name, part in records.items()}
    return pd.DataFrame(records or [])


def saved_log(directory: str | Path) -> Log:
    """The training log kept in a checkpoint written by `train_or_load`."""
    return _log_from_json(load_checkpoint(directory)[1].get("log"))


def data_identity(root: str | Path | None) -> dict[str, Any] | None:
    """What a model was trained on, as train-or-load compares it: for the synthetic benchmark, its
    manifest's identity (generator version, size, seed, image size), so a checkpoint trained on
    another version of the benchmark is not reused; None for real M-BEIR (a fixed release) or no root."""
    manifest = Path(root) / "synthetic.json" if root is not None else None
    if manifest is None or not manifest.is_file():
        return None
    written = json.loads(manifest.read_text())
    return {k: written.get(k) for k in ("generator", "version", "size", "seed", "image_px", "sizes")}


def train_or_load(
    directory: str | Path,
    recipe: Any,
    build: Callable[[], torch.nn.Module],
    train: Callable[[torch.nn.Module], Log],
    device: str | torch.device = "cpu",
    force: bool = False,
    extra: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
    data: str | Path | None = None,
) -> Trained:
    """Load the model of `recipe` from `directory`, or train it and save it there.

    `build()` makes the untrained model (the same recipe gives the same weights); `train(model)`
    trains it in place and returns its log. The checkpoint is reused when it is complete, its
    recipe equals `recipe` (compared as JSON) and it was trained on the same data (`data`, the
    M-BEIR-format root: `data_identity`), unless `force`. A trained model is saved atomically
    (`save_checkpoint`) with one schema: {"recipe", "data", "complete": True, "log", **extra(model)},
    so a run killed while saving leaves the old checkpoint or none, never half of one.
    """
    wanted, trained_on = as_json(recipe), data_identity(data)
    model = build()
    if has_checkpoint(directory) and not force:
        state, saved = load_checkpoint(directory)
        if saved.get("complete") and saved.get("recipe") == wanted and saved.get("data") == trained_on:
            model.load_state_dict(state)
            return Trained(model.to(device).eval(), _log_from_json(saved.get("log")), saved, True)
    log = train(model)
    saved = {"recipe": wanted, "data": trained_on, "complete": True, "log": _log_to_json(log),
             **(extra(model) if extra else {})}
    save_checkpoint(directory, model, saved)
    return Trained(model.to(device).eval(), log, saved, False)
