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
    loss, correct, _ = loss_correct_and_logits(head, features, rows, local_labels, logit_adjust)
    return loss, correct


def loss_correct_and_logits(head: MarginHead, features: torch.Tensor, rows: torch.Tensor, local_labels: torch.Tensor,
                            logit_adjust: torch.Tensor | np.ndarray | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`loss_and_correct`, and the head's logits before the adjustment (detached), for a
    coverage measurement."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        logits, sim = head.logits_and_similarity(features.float(), rows.float(), local_labels)
        loss = F.cross_entropy(adjusted(logits, logit_adjust), local_labels, ignore_index=-1)
        correct = (sim.detach().argmax(dim=1) == local_labels).sum()
    return loss, correct, logits.detach()


@torch.no_grad()
def negative_mass_coverage(logits: torch.Tensor, local_labels: torch.Tensor, log_q: torch.Tensor | np.ndarray) -> float:
    """Estimated share of the full softmax's negative mass that the active negatives hold, batch mean.

    Per sample: sum of exp(logit) over the active classes except its own positive, over the
    Horvitz-Thompson estimate of the same sum over ALL classes, sum of exp(logit) / q
    (``log_q``: each active class's log probability of being active). Only classes that can
    be missed (q < 1: the uniform fill, score picks) tell anything about the classes that
    were; with none of them there is nothing to estimate from, and the answer is NaN.
    """
    log_q = torch.as_tensor(log_q, dtype=logits.dtype, device=logits.device)
    if not bool((log_q < 0).any()):
        return float("nan")
    logits = logits.float().clone()
    has = torch.nonzero(local_labels >= 0, as_tuple=True)[0]
    logits[has, local_labels[has]] = -float("inf")
    held = torch.logsumexp(logits, dim=1)
    estimated = torch.logsumexp(logits - log_q[None, :], dim=1)
    share = torch.exp(held - estimated)
    share = share[torch.isfinite(share)]
    return float(share.mean()) if share.numel() else float("nan")


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


@torch.no_grad()
def predict_all_classes(head: MarginHead, features: torch.Tensor,
                        chunks: Iterable[tuple[int, np.ndarray | torch.Tensor]]) -> torch.Tensor:
    """Top-1 class over every class, scanning the matrix chunk by chunk (never whole in memory)."""
    best_score = torch.full((features.shape[0],), -float("inf"), device=features.device)
    best_id = torch.full((features.shape[0],), -1, dtype=torch.long, device=features.device)
    features = features.float()
    for first, rows in chunks:
        rows_t = torch.as_tensor(rows, device=features.device).float()
        score, idx = head.similarity(features, rows_t).max(dim=1)
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_id = torch.where(better, idx + first, best_id)
    return best_id
