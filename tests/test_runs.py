import os
import stat

import pandas as pd
import pytest

from mixcls.runs import atomic_write_csv, atomic_write_json, atomic_write_text


def test_atomic_writes_leave_no_temporary_and_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {"k": 1})
        atomic_write_csv(tmp_path / "c.csv", pd.DataFrame({"a": [1]}))
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.csv"]
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_json(target, {"v": 1})

    class Boom:
        def to_csv(self, path, **kwargs):
            open(path, "w").write("half")
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write_csv(target, Boom())
    assert target.read_text().strip().startswith("{") and len(list(tmp_path.iterdir())) == 1
