import pytest

from hfs.utils.atomic import atomic_dir, atomic_write_bytes, atomic_write


def test_atomic_write_replaces_only_on_success(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"one")
    with pytest.raises(RuntimeError):
        with atomic_write(p) as fh:
            fh.write(b"half")
            raise RuntimeError("killed")
    assert p.read_bytes() == b"one"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_dir_keeps_old_version_on_failure(tmp_path):
    d = tmp_path / "snap"
    with atomic_dir(d) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("killed")
    assert (d / "a").read_text() == "1"
    with atomic_dir(d) as tmp:
        (tmp / "a").write_text("3")
    assert (d / "a").read_text() == "3"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["snap"]


def test_atomic_files_get_normal_permissions(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f", b"x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "a").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
