"""uniir_lite: the small library behind the uniir-kit notebooks.

Public API (imported lazily so the command line starts fast):
- `setup(globals())`: the setup cell of every notebook (profile and knobs, seed, device, plot style, data).
- `record_metrics(notebook, metrics, cfg)`: the last cell of every notebook.
- the lessons' modules: config, env, data (mbeir, validate, synthetic, sources, torch_data, images),
  models, fusion, instructions, losses, train, checkpoints, retrieval, metrics, evaluation, viz.

The kit's own tooling (notebook harness, recorder/comparator, README rendering, benchmarks, the
`uniir-lite` command) lives apart, in `uniir_lite.kit`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {"setup": "uniir_lite.env", "record_metrics": "uniir_lite.kit.record", "resolve": "uniir_lite.config"}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'uniir_lite' has no attribute {name!r}")
