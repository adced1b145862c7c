"""Writing files in place of others (`dermsight.files`): errors name the file the user gave, not a temporary one."""

from __future__ import annotations

import pytest

from dermsight.files import temp_folder_beside, written_atomically


def test_errors_name_the_file_asked_for_not_the_temporary_one(tmp_path):
    target = tmp_path / "missing" / "manifest.csv"
    with pytest.raises(FileNotFoundError) as e, written_atomically(target):
        pass
    assert e.value.filename == str(target) and ".manifest.csv." not in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        temp_folder_beside(tmp_path / "missing" / "reports")
    assert e.value.filename == str(tmp_path / "missing" / "reports")


def test_written_atomically_replaces_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), written_atomically(target) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("stopped while writing")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    with written_atomically(target) as tmp, open(tmp, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
