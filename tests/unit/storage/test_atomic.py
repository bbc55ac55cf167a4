"""Atomic outputs: a failed write leaves the old file/directory untouched and no temp files; a finished one
replaces it; a cache directory keeps whichever writer finished first."""

import pytest

from megatron_mmpl.storage.atomic import atomic_directory, atomic_write

pytestmark = pytest.mark.unit


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_failed_directory_leaves_the_old_one(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        with atomic_directory(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in target.iterdir()) == ["a"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cache_keeps_the_first_writer(tmp_path):
    target = tmp_path / "cache"
    with atomic_directory(target, keep_existing=True) as tmp:
        (tmp / "first").write_text("1")
    with atomic_directory(target, keep_existing=True) as tmp:
        (tmp / "second").write_text("2")
    assert [p.name for p in target.iterdir()] == ["first"] and [p.name for p in tmp_path.iterdir()] == ["cache"]
