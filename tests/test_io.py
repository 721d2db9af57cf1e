import os
import stat

import pytest

from uniir_lite.io import write_json_atomic, write_text_atomic


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "a" / "f.txt"
    write_text_atomic(path, "one\n")
    write_text_atomic(path, "two\n")
    assert path.read_text() == "two\n"
    assert os.listdir(path.parent) == ["f.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["f.json"]


def test_atomic_file_appears_only_when_committed(tmp_path):
    from uniir_lite.io import AtomicFile

    kept, dropped = AtomicFile(tmp_path / "kept.jsonl"), AtomicFile(tmp_path / "dropped.jsonl")
    for f in (kept, dropped):
        f.writeline('{"a": 1}')
        f.writeline('{"a": 2}')
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []  # nothing visible yet
    kept.commit()
    dropped.discard()
    assert kept.lines == 2 and (tmp_path / "kept.jsonl").read_text() == '{"a": 1}\n{"a": 2}\n'
    assert os.listdir(tmp_path) == ["kept.jsonl"]


def test_an_atomic_file_gets_an_ordinary_files_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "b.txt") == 0o644
