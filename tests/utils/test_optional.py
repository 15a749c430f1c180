import pytest

from hfs.utils.errors import HfsError
from hfs.utils.optional import require


def test_present_module_is_returned():
    assert require("json", "x", "pip install json").dumps([1]) == "[1]"


def test_missing_module_is_one_line_with_install_hint():
    with pytest.raises(HfsError) as info:
        require("hfs_no_such_module", "sampler 'annoy'", "pip install annoy", "or pick sampler.type=random")
    assert str(info.value) == ("sampler 'annoy' needs the hfs_no_such_module package: pip install annoy "
                               "(or pick sampler.type=random)")


def test_install_hint_never_names_hfs_on_the_public_index():
    """Issue 15 item 10: `pip install 'hfs[plot]'` installs an unrelated package."""
    from hfs.utils.optional import install_hint

    hint = install_hint("matplotlib", "plot")
    assert "hfs[" not in hint and hint.startswith("pip install matplotlib") and "-e '.[plot]'" in hint
