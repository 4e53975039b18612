from __future__ import annotations

import os

import pytest

from phileo.fsutil import atomic_path, atomic_write_json, read_json


def test_atomic_path_publishes_only_complete_files(tmp_path):
    target = tmp_path / "sub" / "chunk.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        assert not target.exists(), "the final name must not appear before the block ends"
        assert tmp.parent == target.parent and tmp.name.startswith(".")
    assert target.read_bytes() == b"partial"
    assert os.stat(target).st_mode & 0o040, "files on shared scratch are group-readable"


def test_atomic_path_failure_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "manifest.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{broken")
            raise RuntimeError("killed mid-write")
    assert read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_read_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found: .*nope.json"):
        read_json(tmp_path / "nope.json", what="manifest")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json is not valid JSON.*delete it"):
        read_json(tmp_path / "bad.json")
