"""Selection over several index holders: the top-k merge of their answers, and the rule as a JSON value.

Each shard of a weight store indexes only its own rows and answers its best ``k`` per query
with similarities that are comparable across shards (``ClassSampler.search``), so the best
``k`` over all shards are the best ``k`` of the concatenated answers: :func:`merge_topk`.
The selection rule travels over the wire as the JSON object of its fields
(:func:`rule_to_fields`) and is rebuilt, every field checked against the dataclass's own
annotations (:mod:`hfs.utils.typed`), by :func:`rule_from_fields` — the field list is never
written out here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from hfs.samplers.selection import SelectionRule
from hfs.utils.errors import HfsError
from hfs.utils.typed import field_values


class RuleError(HfsError):
    """A selection rule that cannot be rebuilt from its fields; the text names the field."""


def merge_topk(answers: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` (ids, similarities) per query over several (B, k_i) answers, best first.

    Ids of -1 (nothing found) rank last; ties keep the order of ``answers`` (shard order),
    then each answer's own order, so a merge is deterministic.
    """
    if not answers:
        raise ValueError("merge_topk needs at least one answer")
    queries = answers[0][0].shape[0]
    ids = np.concatenate([np.asarray(a, dtype=np.int64).reshape(queries, -1) for a, _ in answers], axis=1)
    sims = np.concatenate([np.asarray(s, dtype=np.float32).reshape(queries, -1) for _, s in answers], axis=1)
    sims = np.where(ids >= 0, sims, -np.inf).astype(np.float32)
    k = max(0, min(int(k), ids.shape[1]))
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(sims, order, axis=1)


def rule_to_fields(rule: SelectionRule) -> dict[str, Any]:
    """The rule as a JSON object (``dataclasses.asdict``)."""
    return dataclasses.asdict(rule)


def rule_from_fields(fields: Any) -> SelectionRule:
    """A SelectionRule from a JSON object of its fields; unknown, missing or ill-typed fields: RuleError."""
    values = field_values(SelectionRule, fields, "selection rule", error=RuleError, finite=True)
    try:
        return SelectionRule(**values)
    except (TypeError, ValueError) as exc:
        raise RuleError(f"selection rule does not fit: {exc}") from None
