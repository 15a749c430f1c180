"""Backbones behind one registry: IResNet (18/34/50/100), MobileFaceNet, a tiny CPU net, and an MLP.

The image nets map a (B, 3, H, W) batch in [-1, 1] to a (B, embedding_size) feature; ``mlp``
maps (B, image_size) vectors (``data.source: latent``, the embedding-level benchmark regime). The
face-recognition nets end in InsightFace's embedding head (BN -> Dropout -> FC -> BN) and
size their last FC from the input size, so 112x112 (the standard) and other sizes both work.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from hfs.registry import Registry

BACKBONES: Registry[nn.Module] = Registry("backbone")


def _down(size: int, times: int) -> int:
    """Spatial size after ``times`` stride-2 3x3 convs with padding 1 (ceil halving)."""
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


def _init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs/linears and unit BN, as InsightFace initialises its nets."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class EmbeddingHead(nn.Module):
    """BN -> Dropout -> Flatten -> FC -> BN: InsightFace's "E" output block.

    The final BN has a fixed unit scale (only a shift is learned), which keeps the
    feature norm from collapsing or exploding under margin losses.
    """

    def __init__(self, channels: int, spatial: int, embedding_size: int, dropout: float) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(channels * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)

    def reset_bn_scale(self) -> None:
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.bn(x))
        return self.features(self.fc(torch.flatten(x, 1)))


# --------------------------------------------------------------------------- IResNet


class IBasicBlock(nn.Module):
    """Improved residual block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN (+ shortcut)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch, eps=1e-5),
            nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_ch, eps=1e-5),
            nn.PReLU(out_ch),
            nn.Conv2d(out_ch, out_ch, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_ch, eps=1e-5),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_ch, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class IResNet(nn.Module):
    """ArcFace's IResNet: a 3x3 stem at full resolution, then four stride-2 stages (64-512 ch)."""

    widths = (64, 128, 256, 512)

    def __init__(self, layers: Sequence[int], embedding_size: int = 512, image_size: int = 112,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64, eps=1e-5),
                                  nn.PReLU(64))
        stages, in_ch = [], 64
        for width, depth in zip(self.widths, layers):
            blocks = [IBasicBlock(in_ch, width, stride=2)]
            blocks += [IBasicBlock(width, width, stride=1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.head = EmbeddingHead(in_ch, _down(image_size, 4), embedding_size, dropout)
        _init_weights(self)
        self.head.reset_bn_scale()
        # Zero the last BN of each residual branch so every block starts as the identity.
        for m in self.modules():
            if isinstance(m, IBasicBlock):
                nn.init.zeros_(m.body[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def _iresnet(layers: Sequence[int]):
    def build(embedding_size: int = 512, image_size: int = 112, dropout: float = 0.0) -> nn.Module:
        return IResNet(layers, embedding_size, image_size, dropout)

    return build


for _name, _layers in (("iresnet18", (2, 2, 2, 2)), ("iresnet34", (3, 4, 6, 3)),
                       ("iresnet50", (3, 4, 14, 3)), ("iresnet100", (3, 13, 30, 3))):
    BACKBONES.register(_name)(_iresnet(_layers))


# --------------------------------------------------------------------------- MobileFaceNet


class ConvBNPReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(out_ch), nn.PReLU(out_ch))


class ConvBN(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(out_ch))


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear project."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.body = nn.Sequential(ConvBNPReLU(in_ch, expand), ConvBNPReLU(expand, expand, 3, stride, 1, groups=expand),
                                  ConvBN(expand, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


def _residual_stack(channels: int, depth: int, expand: int) -> nn.Sequential:
    return nn.Sequential(*[DepthWise(channels, channels, expand, 1, residual=True) for _ in range(depth)])


class MobileFaceNet(nn.Module):
    """MobileFaceNet (Chen et al. 2018) as InsightFace's `mbf`: bottlenecks + global depthwise conv.

    The global depthwise conv (GDC) replaces global pooling: a per-channel kernel as large
    as the final feature map, so each spatial position gets its own learned weight.
    """

    def __init__(self, embedding_size: int = 512, image_size: int = 112, dropout: float = 0.0,
                 blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 2) -> None:
        super().__init__()
        c64, c128 = 64 * scale, 128 * scale
        layers: list[nn.Module] = [ConvBNPReLU(3, c64, 3, 2, 1)]
        if blocks[0] == 1:
            layers.append(ConvBNPReLU(c64, c64, 3, 1, 1, groups=c64))
        else:
            layers.append(_residual_stack(c64, blocks[0], 128))
        layers += [DepthWise(c64, c64, 128, 2, residual=False), _residual_stack(c64, blocks[1], 128),
                   DepthWise(c64, c128, 256, 2, residual=False), _residual_stack(c128, blocks[2], 256),
                   DepthWise(c128, c128, 512, 2, residual=False), _residual_stack(c128, blocks[3], 256),
                   ConvBNPReLU(c128, 512)]
        self.body = nn.Sequential(*layers)
        spatial = _down(image_size, 4)
        self.gdc = ConvBN(512, 512, spatial, 1, 0, groups=512)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.gdc(self.body(x)), 1)
        return self.features(self.fc(self.dropout(x)))


@BACKBONES.register("mobilefacenet")
def mobilefacenet(embedding_size: int = 512, image_size: int = 112, dropout: float = 0.0) -> nn.Module:
    return MobileFaceNet(embedding_size, image_size, dropout)


# --------------------------------------------------------------------------- tiny


class TinyNet(nn.Module):
    """Three stride-2 conv blocks + adaptive pooling: trains in seconds on CPU at any input size."""

    def __init__(self, embedding_size: int = 64, image_size: int = 32, dropout: float = 0.0,
                 widths: Sequence[int] = (16, 32, 64), pooled: int = 4) -> None:
        super().__init__()
        layers, in_ch = [], 3
        for width in widths:
            layers += [nn.Conv2d(in_ch, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width)]
            in_ch = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(pooled))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_ch * pooled * pooled, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(self.dropout(torch.flatten(self.body(x), 1))))


@BACKBONES.register("tiny")
def tiny(embedding_size: int = 64, image_size: int = 32, dropout: float = 0.0) -> nn.Module:
    return TinyNet(embedding_size, image_size, dropout)


class MLPNet(nn.Module):
    """Vectors -> embedding: two hidden layers (Linear-BN-PReLU) and a BN'd embedding layer.

    For inputs that are already vectors (``data.source: latent``), where a step's cost is the
    classifier's, as at millions of identities; ``image_size`` is the input vector's length.
    """

    def __init__(self, embedding_size: int = 64, in_features: int = 64, dropout: float = 0.0,
                 hidden: int = 256) -> None:
        super().__init__()
        layers, width = [], in_features
        for _ in range(2):
            layers += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.PReLU(hidden)]
            width = hidden
        self.body = nn.Sequential(*layers, nn.Dropout(p=dropout))
        self.fc = nn.Linear(width, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"mlp backbone takes (batch, {self.fc.in_features}) vectors, got shape {tuple(x.shape)}")
        return self.features(self.fc(self.body(x)))


@BACKBONES.register("mlp")
def mlp(embedding_size: int = 64, image_size: int = 64, dropout: float = 0.0) -> nn.Module:
    return MLPNet(embedding_size, image_size, dropout)


def build_backbone(model_cfg, image_size: int) -> nn.Module:
    """The backbone named by ``model_cfg.arch`` for ``image_size`` inputs."""
    from hfs.utils.errors import HfsError

    try:
        factory = BACKBONES.get(model_cfg.arch)
    except KeyError as exc:
        raise HfsError(f"config key 'model.arch': {exc.args[0]}") from None
    return factory(embedding_size=model_cfg.embedding_size, image_size=image_size, dropout=model_cfg.dropout)
