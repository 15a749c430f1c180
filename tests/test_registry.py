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


def test_config_choices_name_exactly_what_the_registries_hold():
    """`head.type`, `fc.mode`, `sampler.type`, `fc.init` and the update rules repeat names that live
    in the code that builds them (config sits below those layers and cannot import them)."""
    import hfs.fc.factories  # noqa: F401  (registers the classifier modes)
    from hfs.config import key_rules
    from hfs.fc.layer import CLASSIFIERS
    from hfs.models import HEADS
    from hfs.paramserver.catchup import UPDATE_RULES
    from hfs.paramserver.matrix import INITS
    from hfs.samplers import SAMPLERS

    expected = {"head.type": HEADS.names(), "fc.mode": CLASSIFIERS.names(), "sampler.type": SAMPLERS.names(),
                "fc.init": INITS, "paramserver.update_rule": UPDATE_RULES, "fc.sharded_momentum": UPDATE_RULES}
    for key, names in expected.items():
        assert sorted(key_rules(key)["choices"]) == sorted(names), key


def test_filling_the_registries_imports_no_optional_package_and_starts_nothing():
    import subprocess
    import sys

    code = ("import sys, threading\n"
            "import hfs.fc.factories, hfs.models, hfs.samplers, hfs.paramserver.store\n"
            "heavy = [m for m in ('annoy', 'hnswlib', 'zmq', 'numba', 'faiss', 'matplotlib') if m in sys.modules]\n"
            "print(heavy, threading.active_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "1"]
