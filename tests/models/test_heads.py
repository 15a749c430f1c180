import math

import pytest
import torch

from hfs.config import HeadConfig
from hfs.models.heads import HEADS, ArcFaceHead, CosFaceHead, build_head


def _unit(v):
    v = torch.tensor(v, dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


def _setup():
    # Two 2-D features and three rows at known angles: cos values are easy to write by hand.
    feats = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)  # angles 0 and 90 deg
    rows = torch.stack([_unit([1.0, 0.0]), _unit([1.0, 1.0]), _unit([0.0, 1.0])]) * 5
    return feats, rows


def test_softmax_is_plain_inner_product():
    feats, rows = _setup()
    logits = HEADS.build("softmax")(feats, rows, torch.tensor([0, 2]))
    assert torch.allclose(logits, feats @ rows.T)


def test_cosface_margin_on_positive_only():
    feats, rows = _setup()
    s, m = 10.0, 0.35
    logits = CosFaceHead(s, m)(feats, rows, torch.tensor([1, 2]))
    c = math.cos(math.pi / 4)
    expected = torch.tensor([[1.0, c - m, 0.0], [0.0, c, 1.0 - m]], dtype=torch.float64) * s
    assert torch.allclose(logits, expected, atol=1e-12)


def test_arcface_matches_cos_theta_plus_m():
    feats, rows = _setup()
    s, m = 8.0, 0.5
    logits = ArcFaceHead(s, m)(feats, rows, torch.tensor([1, 2]))
    c = math.cos(math.pi / 4)
    expected = torch.tensor([[1.0, math.cos(math.pi / 4 + m), 0.0],
                             [0.0, c, math.cos(0.0 + m)]], dtype=torch.float64) * s
    assert torch.allclose(logits, expected, atol=1e-5)


def test_arcface_fallback_past_threshold_and_finite_gradients():
    # theta near pi (cos = -1) and exactly 0 (cos = 1): finite output and gradients.
    head = ArcFaceHead(64.0, 0.5)
    feats = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    logits = head(feats, rows, torch.tensor([0, 0]))
    m = 0.5
    # cos=-1 is below cos(pi - m): fallback cos - m*sin(m).
    assert logits[0, 0].item() == pytest.approx(64 * (-1.0 - math.sin(math.pi - m) * m), rel=1e-5)
    # float32 at theta = 0: the clamp that keeps the gradient finite costs ~1e-3 relative.
    assert logits[1, 0].item() == pytest.approx(64 * math.cos(m), rel=2e-3)
    logits.sum().backward()
    assert torch.isfinite(feats.grad).all() and torch.isfinite(rows.grad).all()


def test_minus_one_label_means_no_margin():
    feats, rows = _setup()
    for head in (CosFaceHead(10.0, 0.3), ArcFaceHead(10.0, 0.3)):
        with_none = head(feats, rows, torch.tensor([-1, -1]))
        assert torch.allclose(with_none, head.similarity(feats, rows) * 10.0)
        mixed = head(feats, rows, torch.tensor([-1, 2]))
        assert torch.allclose(mixed[0], with_none[0])
        assert mixed[1, 2] < with_none[1, 2]


def test_build_head_from_config():
    assert isinstance(build_head(HeadConfig(type="arcface", scale=30.0, margin=0.2)), ArcFaceHead)
    with pytest.raises(KeyError, match="unknown head"):
        HEADS.get("arcfase")
