"""Atomic file writes: a temp file beside the target, moved into place only when complete, so an
interrupted run never leaves half a file (and the previous version survives a failed write)."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Literal


class AtomicFile:
    """A file written into a hidden temp file beside `path`, moved into place by `commit` (only a
    complete file ever appears under its name) or removed by `discard`. `lines` counts `writeline`s;
    `tmp` is the temp path, for writers that open it themselves (e.g. pyarrow)."""

    def __init__(self, path: str | os.PathLike, mode: Literal["w", "wb"] = "w") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.chmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; the file gets an ordinary file's mode
        self.tmp = Path(tmp)
        self.file: IO = os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": "\n"} if mode == "w" else {}))
        self.lines = 0

    def writeline(self, line: str) -> None:
        self.file.write(line + "\n")
        self.lines += 1

    def commit(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str | os.PathLike, mode: Literal["w", "wb"] = "w") -> Iterator[IO]:
    """Open a temp file beside `path`; on success it replaces `path`, on error it is removed."""
    out = AtomicFile(path, mode)
    try:
        yield out.file
    except BaseException:
        out.discard()
        raise
    out.commit()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
