"""Files written whole or not at all (`freevlm.files`): what replaces a file appears only once complete, and a
write that fails leaves the old file and no temporary beside it."""

import pytest

from freevlm.files import atomic_path, write_text_atomic


def test_a_complete_write_replaces_the_file(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("old")
    with atomic_path(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old"  # not yet: a reader still sees the whole old file
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]
    write_text_atomic(path, "newer")
    assert path.read_text() == "newer"


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="crash"), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]
