"""The poly schedule is arcface_torch's PolynomialLRWarmup (closed form), step for step."""

import pytest

from hfs.config import OptimConfig
from hfs.train.schedule import lr_at


def _arcface_poly(step: int, base: float, warmup: int, total: int, power: float) -> float:
    """PolynomialLRWarmup._get_closed_form_lr after ``step`` scheduler steps, past the warm-up."""
    return base * (1.0 - (min(total, step) - warmup) / (total - warmup)) ** power


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_poly_decay_matches_the_formula(power):
    base, warmup, total = 0.1, 100, 1000
    o = OptimConfig(lr=base, schedule="poly", power=power, warmup_steps=warmup)
    for step in (100, 101, 250, 550, 999, 1000, 1200):
        assert lr_at(step, o, total) == pytest.approx(_arcface_poly(step, base, warmup, total, power), abs=1e-12)
    assert lr_at(550, o, total) == pytest.approx(base * 0.5 ** power)  # half way through the decay
    assert lr_at(1000, o, total) == 0.0


def test_warmup_is_linear_to_the_base_lr():
    """Step s of the warm-up trains at base * (s + 1) / warmup: arcface_torch's s / warmup one step
    earlier, so that the first step does not run at lr 0."""
    o = OptimConfig(lr=0.4, schedule="poly", power=1.0, warmup_steps=10)
    assert [lr_at(s, o, 110) for s in (0, 4, 9, 10)] == pytest.approx([0.04, 0.2, 0.4, 0.4])


def test_poly_without_warmup_starts_at_the_base_lr():
    o = OptimConfig(lr=0.1, schedule="poly", power=1.0)
    assert lr_at(0, o, 100) == pytest.approx(0.1) and lr_at(75, o, 100) == pytest.approx(0.025)
