"""Profiles and knob resolution.

Every notebook has a `parameters` cell with the same knob names; `None` means "take the profile's
value". A profile is a YAML file in `profiles/` (tiny, gpu, full); papermill passes the same file as
parameters when notebooks run headless. Taught in notebook 00.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

# Knobs shared by all notebooks. The first five are required in every `parameters` cell.
REQUIRED_KNOBS = ("PROFILE", "SEED", "DEVICE", "DATA_DIR", "OUT_DIR")
KNOBS = REQUIRED_KNOBS + (
    "FIG_DIR",
    "DATA_SIZE",
    "MAX_STEPS",
    "BATCH_SIZE",
    "EVAL_BATCH_SIZE",
    "EMBED_DIM",
    "IMAGE_SIZE",
    "NUM_WORKERS",
    "PRECISION",
    "PRETRAINED",
)
PATH_KNOBS = ("DATA_DIR", "OUT_DIR", "FIG_DIR")


def repo_root() -> Path:
    """The kit's checkout: the folder holding `profiles/` (the library is installed editable)."""
    here = Path(__file__).resolve().parent.parent
    if (here / "profiles").is_dir():
        return here
    for parent in [Path.cwd(), *Path.cwd().parents]:
        if (parent / "profiles").is_dir() and (parent / "uniir_lite").is_dir():
            return parent
    raise FileNotFoundError("cannot find the uniir-kit checkout (a folder with profiles/ and uniir_lite/)")


def profile_names() -> list[str]:
    return sorted(p.stem for p in (repo_root() / "profiles").glob("*.yaml"))


def load_profile(name: str) -> dict[str, Any]:
    """The knob values of profile `name` (`profiles/<name>.yaml`)."""
    path = repo_root() / "profiles" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown profile {name!r}: choose one of {', '.join(profile_names())} ({path} not found)")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}:1: a profile must be a mapping of knob names to values")
    missing = [k for k in KNOBS if k not in values]
    if missing:
        raise ValueError(f"{path}: missing knobs {', '.join(missing)}")
    return values


@dataclasses.dataclass(frozen=True)
class Config:
    """Resolved knobs of one notebook run. Paths are absolute."""

    profile: str
    seed: int
    device: str
    data_dir: Path
    out_dir: Path
    fig_dir: Path
    data_size: str
    max_steps: int
    batch_size: int
    eval_batch_size: int
    embed_dim: int
    image_size: int
    num_workers: int
    precision: str
    pretrained: bool
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    data_root: Path | None = None  # set by `setup`: the M-BEIR-format directory the notebook reads

    @property
    def metrics_dir(self) -> Path:
        return self.out_dir / "metrics"

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`["DEVICE=cpu", "MAX_STEPS=20"]` -> `{"DEVICE": "cpu", "MAX_STEPS": 20}` (values read as YAML).

    Only the shared knobs may be set this way; a typo is an error naming the knobs there are."""
    out = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--set {pair!r}: expected KNOB=VALUE, e.g. DEVICE=cpu")
        if name not in KNOBS:
            raise ValueError(f"--set {pair!r}: {name} is not a knob; the knobs are {', '.join(KNOBS)}")
        out[name] = yaml.safe_load(value) if value.strip() else None
    return out


def resolve(PROFILE: str = "tiny", **knobs: Any) -> Config:
    """Fill every knob left as `None` from the profile; relative paths are taken from the repo root.

    Knobs that are not shared (notebook-specific ones) are kept in `Config.extra`.
    """
    values = load_profile(PROFILE)
    for name, value in knobs.items():
        if value is not None:
            values[name] = value
    root = repo_root()
    for name in PATH_KNOBS:
        path = Path(values[name]).expanduser()
        values[name] = path if path.is_absolute() else root / path
    shared = {k.lower(): values[k] for k in KNOBS if k != "PROFILE"}
    extra = {k: v for k, v in values.items() if k not in KNOBS}
    return Config(profile=PROFILE, extra=extra, **shared)
