"""Atomic writes leave nothing under the final name, and what a killed writer leaves behind is
found by `remove_stale` (the phantom's resume relies on it: its kill -9 test failed when the
temporary names and the clean-up disagreed)."""
from cxr.atomic import TEMP_PREFIX, remove_stale, replacing, write_atomic


def test_a_killed_writer_leaves_a_temporary_file_that_remove_stale_finds(tmp_path):
    target = tmp_path / "CXR1_IM-0001-1001.png"
    writing = replacing(target)
    tmp = writing.__enter__()  # a SIGKILL now: the block never ends, its clean-up never runs
    tmp.write_bytes(b"half an image")
    assert tmp.parent == tmp_path and tmp.name.startswith(TEMP_PREFIX) and tmp.suffix == ".png"
    assert not target.exists()
    assert remove_stale(tmp_path) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_finished_write_leaves_only_the_file(tmp_path):
    write_atomic(tmp_path / "a.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert remove_stale(tmp_path) == 0
