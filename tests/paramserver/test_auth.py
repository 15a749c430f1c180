"""Shared-secret resolution for hfs serve-params and its clients."""

import pytest


def test_secret_file_errors_name_the_file_and_env_is_the_fallback(tmp_path, monkeypatch):
    from hfs.paramserver import SECRET_ENV, resolve_secret
    from hfs.utils.errors import HfsError

    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(HfsError, match=r"cannot read secret file .*missing\.txt"):
        resolve_secret("", tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(HfsError, match=r"secret file .*empty\.txt is empty"):
        resolve_secret("", empty)
    good = tmp_path / "s.txt"
    good.write_text("s3cret\n")
    assert resolve_secret("from-config", good) == b"s3cret"
    assert resolve_secret("from-config") == b"from-config"
    monkeypatch.setenv(SECRET_ENV, "from-env")
    assert resolve_secret("from-config") == b"from-env"
    assert resolve_secret("") == b"from-env"
