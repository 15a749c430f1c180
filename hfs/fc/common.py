"""What both classifier layers share: the step output and scoring against all classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from hfs.models.heads import MarginHead


@dataclass
class FCOutput:
    """One micro-batch through the classifier layer.

    ``correct`` counts samples whose positive has the highest margin-free score among the
    rows the step saw (all classes for FullFC, the active set for SampledFC).
    """

    loss: torch.Tensor
    correct: torch.Tensor
    active: int


def loss_and_correct(head: MarginHead, features: torch.Tensor, rows: torch.Tensor, local_labels: torch.Tensor,
                     logit_adjust: torch.Tensor | np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the head's logits in float32, and the top-1 hit count.

    ``logit_adjust`` (S,): added to every sample's logits of the S rows after the head's scale
    and margin (the selection rule's sampled-softmax correction, ``sampler.logq``); it
    changes the loss only, never the hit count (a margin-free score, like validation's).
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        logits, sim = head.logits_and_similarity(features.float(), rows.float(), local_labels)
        loss = F.cross_entropy(adjusted(logits, logit_adjust), local_labels, ignore_index=-1)
        correct = (sim.detach().argmax(dim=1) == local_labels).sum()
    return loss, correct


def adjusted(logits: torch.Tensor, logit_adjust: torch.Tensor | np.ndarray | None) -> torch.Tensor:
    """``logits`` (N, S) plus the per-row ``logit_adjust`` (S,), or as they are when it is None."""
    if logit_adjust is None:
        return logits
    return logits + torch.as_tensor(logit_adjust, dtype=logits.dtype, device=logits.device)[None, :]


def init_rows(num_rows: int, dim: int, init: str, std: float, seed: int) -> torch.Tensor:
    """A seeded classifier initialisation (gaussian, uniform in [-std, std], or zeros)."""
    gen = torch.Generator().manual_seed(seed)
    if init == "gaussian":
        return torch.randn(num_rows, dim, generator=gen) * std
    if init == "uniform":
        return (torch.rand(num_rows, dim, generator=gen) * 2 - 1) * std
    return torch.zeros(num_rows, dim)


#: score-matrix entries one block of :func:`predict_all_classes` may hold (256 MB of float32).
MAX_SCORE_ENTRIES = 1 << 26


@torch.no_grad()
def predict_all_classes(head: MarginHead, features: torch.Tensor,
                        chunks: Iterable[tuple[int, np.ndarray | torch.Tensor]],
                        max_scores: int = MAX_SCORE_ENTRIES) -> torch.Tensor:
    """Top-1 class over every class, scanning the matrix chunk by chunk (never whole in memory).

    Features are scored in blocks of at most ``max_scores`` / chunk rows, so 100K held-out
    samples against a 65,536-row chunk do not ask for a 26 GB score matrix.
    """
    best_score = torch.full((features.shape[0],), -float("inf"), device=features.device)
    best_id = torch.full((features.shape[0],), -1, dtype=torch.long, device=features.device)
    features = features.float()
    for first, rows in chunks:
        rows_t = torch.as_tensor(rows, device=features.device).float()
        block = max(1, max_scores // max(len(rows_t), 1))
        for start in range(0, features.shape[0], block):
            stop = start + block
            score, idx = head.similarity(features[start:stop], rows_t).max(dim=1)
            better = score > best_score[start:stop]
            best_score[start:stop] = torch.where(better, score, best_score[start:stop])
            best_id[start:stop] = torch.where(better, idx + first, best_id[start:stop])
    return best_id
