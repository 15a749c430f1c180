import pytest
import torch

from hfs.config import ModelConfig
from hfs.models import BACKBONES, build_backbone
from hfs.utils.errors import HfsError


@pytest.mark.parametrize("size", [32, 112])
def test_tiny_any_size(size):
    net = build_backbone(ModelConfig(arch="tiny", embedding_size=24), size).eval()
    assert net(torch.randn(2, 3, size, size)).shape == (2, 24)


def test_iresnet_and_mobilefacenet_shapes():
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert build_backbone(ModelConfig(arch="iresnet18", embedding_size=128), 112).eval()(x).shape == (2, 128)
        assert build_backbone(ModelConfig(arch="mobilefacenet", embedding_size=64), 112).eval()(x).shape == (2, 64)


def test_iresnet_depths_match_the_family():
    def blocks(name):
        net = BACKBONES.build(name)
        return [len(stage) for stage in net.stages]

    assert blocks("iresnet50") == [3, 4, 14, 3]
    assert blocks("iresnet100") == [3, 13, 30, 3]


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(HfsError, match="model.arch.*iresnet50"):
        build_backbone(ModelConfig(arch="iresnet05"), 112)
