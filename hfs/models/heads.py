"""Margin heads that work on any subset of classifier rows.

``head(features, rows, local_labels) -> logits``: ``rows`` is any (S, D) slice of the
classifier (the whole matrix for FullFC, the active rows for SampledFC, a shard for the
model-parallel FC), ``local_labels`` indexes the positive row of each sample within
``rows``, and ``-1`` means the positive is not among them (no margin for that sample).
The margin touches only the positive logit, so the same head serves every classifier.

``similarity`` is the margin-free score (cosine, or the inner product for plain softmax);
accuracy and validation rank classes by it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hfs.registry import Registry

HEADS: Registry[nn.Module] = Registry("head")


class MarginHead(nn.Module):
    """Base: logits = scale * margin(similarity) with the margin on positives only."""

    scale: float = 1.0

    def similarity(self, features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(B, S) cosine similarity between features and rows."""
        return F.linear(F.normalize(features, dim=1), F.normalize(rows, dim=1))

    def positive_margin(self, cos_pos: torch.Tensor) -> torch.Tensor:
        """The positives' similarity after the margin (subclasses override)."""
        return cos_pos

    def forward(self, features: torch.Tensor, rows: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        return self.logits_and_similarity(features, rows, local_labels)[0]

    def logits_and_similarity(self, features: torch.Tensor, rows: torch.Tensor,
                              local_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the margin-free similarity they came from (one matmul for both)."""
        sim = self.similarity(features, rows)
        # gather/scatter on B positives; label -1 writes its own value back (no host sync).
        cols = local_labels.clamp_min(0).unsqueeze(1)
        pos = sim.gather(1, cols).squeeze(1)
        pos = torch.where(local_labels >= 0, self.positive_margin(pos), pos)
        return sim.scatter(1, cols, pos.unsqueeze(1)) * self.scale, sim


@HEADS.register("softmax")
class SoftmaxHead(MarginHead):
    """Plain linear classifier: logits = features @ rows.T (no normalisation, no margin)."""

    def similarity(self, features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return F.linear(features, rows)

    def logits_and_similarity(self, features: torch.Tensor, rows: torch.Tensor,
                              local_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sim = self.similarity(features, rows)
        return sim, sim


@HEADS.register("cosface")
class CosFaceHead(MarginHead):
    """CosFace / AM-softmax: s * (cos(theta) - m) for the positive, s * cos(theta) otherwise."""

    def __init__(self, scale: float = 64.0, margin: float = 0.35) -> None:
        super().__init__()
        self.scale, self.margin = float(scale), float(margin)

    def positive_margin(self, cos_pos: torch.Tensor) -> torch.Tensor:
        return cos_pos - self.margin


@HEADS.register("arcface")
class ArcFaceHead(MarginHead):
    """ArcFace: s * cos(theta + m) for the positive.

    cos(theta + m) = cos*cos(m) - sin*sin(m), with sin = sqrt(1 - cos^2) clamped so its
    gradient stays finite at theta = 0 and pi. Where theta + m would pass pi the function
    stops being monotonic, so past the threshold cos(pi - m) InsightFace's fallback
    cos - m*sin(m) keeps the penalty decreasing in theta.
    """

    def __init__(self, scale: float = 64.0, margin: float = 0.5) -> None:
        super().__init__()
        self.scale, self.margin = float(scale), float(margin)
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold = math.cos(math.pi - margin)
        self.fallback = math.sin(math.pi - margin) * margin

    def positive_margin(self, cos_pos: torch.Tensor) -> torch.Tensor:
        eps = 10 * torch.finfo(cos_pos.dtype).eps  # keeps 1 - cos^2 > 0 in this dtype
        cos = cos_pos.clamp(-1.0 + eps, 1.0 - eps)
        sin = torch.sqrt(1.0 - cos * cos)
        phi = cos * self.cos_m - sin * self.sin_m
        return torch.where(cos > self.threshold, phi, cos - self.fallback)


def build_head(head_cfg) -> MarginHead:
    """The margin head named by ``head_cfg.type`` (softmax ignores scale and margin)."""
    if head_cfg.type == "softmax":
        return HEADS.build("softmax")
    return HEADS.build(head_cfg.type, scale=head_cfg.scale, margin=head_cfg.margin)
