"""The shared chart style: one look for `hfs verify --plot` and the benchmark charts."""

import sys

import pytest

from hfs.utils.errors import HfsError


def test_figure_applies_the_house_style_and_save_png_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    from hfs.utils.plotting import STYLE, figure, save_png

    with figure(1, 2, figsize=(4, 2)) as (fig, axes):
        assert len(axes) == 2 and matplotlib.rcParams["grid.alpha"] == STYLE["grid.alpha"]
        axes[0].plot([1, 2], [3, 4])
        out = save_png(fig, tmp_path / "sub" / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.rcParams["grid.alpha"] != STYLE["grid.alpha"] or STYLE["grid.alpha"] == 1.0  # style is scoped
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["c.png"]  # no temp file left behind


def test_missing_matplotlib_names_who_needs_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    from hfs.utils.plotting import figure

    with pytest.raises(HfsError, match=r"my-script needs the matplotlib package: pip install matplotlib \(or, in the hfs checkout, pip install -e '\.\[plot\]'\)"):
        with figure(needed_by="my-script"):
            pass
