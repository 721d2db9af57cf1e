"""uniir_lite: the small library behind the uniir-kit notebooks.

Public API (imported lazily so the command line starts fast):
- `setup(PROFILE, **knobs)`: the setup cell of every notebook (resolve profile, seed, device).
- `record_metrics(notebook, metrics, cfg)`: the last cell of every notebook.
- modules: config, env, record, harness, data.mbeir, data.synthetic, retrieval, metrics, instructions.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {"setup": "uniir_lite.env", "record_metrics": "uniir_lite.record", "resolve": "uniir_lite.config"}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'uniir_lite' has no attribute {name!r}")
