import pytest

from hfs.registry import Registry


def test_registry_builds_and_suggests():
    reg: Registry[int] = Registry("backbone")

    @reg.register("iresnet50")
    def make(x=1):
        return x

    assert reg.build("iresnet50", x=3) == 3
    with pytest.raises(KeyError, match="did you mean 'iresnet50'"):
        reg.get("iresnet5")
    with pytest.raises(ValueError, match="twice"):
        reg.register("iresnet50")(make)
