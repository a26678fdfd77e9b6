"""Atomic writes: the target holds the old content or the new one, never a part, and no temporary is left."""

import json

import pytest

from dsee_dist.utils.files import atomic_directory, atomic_path, write_json_atomic, write_text_atomic


def test_text_and_json_writes_replace_the_target(tmp_path):
    target = tmp_path / "sub" / "state.json"
    write_json_atomic(target, {"step": 1})
    write_json_atomic(target, {"step": 2})
    assert json.loads(target.read_text()) == {"step": 2}
    write_text_atomic(tmp_path / "latest", "step_2")
    assert (tmp_path / "latest").read_text() == "step_2"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["latest", "state.json", "sub"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("failed half way")
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    with atomic_directory(target) as tmp:
        (tmp / "c.txt").write_text("3")
    assert [p.name for p in target.iterdir()] == ["c.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
