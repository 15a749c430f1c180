"""The one rule that turns a batch's labels + index candidates into its active classes.

Every sampler (annoy, hnsw, exact, random) feeds this same function, so they differ only
in the candidates they find. The active set is laid out as::

    [ positives (sorted unique labels) | nearest negatives (rank order) | uniform fill ]

and always has exactly ``sample_num`` entries, except when the batch alone has more
distinct labels than that (then every positive is kept and nothing else is added).
Negatives are taken round-robin over the batch by rank: first every query's best
candidate, then every query's second best, ... so each query contributes its hardest
negatives before any query contributes its easier ones. Everything is vectorised numpy.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


def auto_neighbours(sample_num: int, batch_size: int, num_classes: int) -> int:
    """Candidates per query when ``sampler.k`` is 0: enough for the round-robin to fill up.

    A batch of B queries needs about (S - B) negatives, i.e. ceil(S / B) per query; twice
    that absorbs duplicates between queries of one cluster, and +1 absorbs each query's
    own class (usually its best match, but already a positive).
    """
    per_query = 2 * math.ceil(sample_num / max(batch_size, 1)) + 1
    return int(max(1, min(per_query, num_classes)))


def _first_occurrence_unique(ids: np.ndarray) -> np.ndarray:
    """Unique values of ``ids`` in the order they first appear (np.unique sorts)."""
    if ids.size == 0:
        return ids
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)]


def _uniform_fill(taken: np.ndarray, count: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct class ids drawn uniformly from those not in ``taken``.

    With few classes taken (the usual case: 1000 of 1M) rejection sampling touches only
    O(count) memory; when most classes are taken, drawing from the explicit complement is
    cheaper and cannot loop.
    """
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    free = num_classes - taken.size
    if count > free:
        raise ValueError(f"cannot draw {count} classes from the {free} not yet active")
    if free <= 4 * count or num_classes <= 65536:
        complement = np.setdiff1d(np.arange(num_classes, dtype=np.int64), taken, assume_unique=True)
        return rng.choice(complement, size=count, replace=False).astype(np.int64)
    picked = np.empty(0, dtype=np.int64)
    while picked.size < count:
        draw = rng.integers(0, num_classes, size=2 * (count - picked.size) + 16, dtype=np.int64)
        draw = _first_occurrence_unique(np.concatenate([picked, draw]))
        picked = draw[~np.isin(draw, taken)]
    return picked[:count]


def select_active_classes(labels: np.ndarray, candidates: np.ndarray | None, sample_num: int,
                          num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Active class ids (S,) int64 and the batch's labels remapped into them (B,) int64.

    ``candidates`` is (B, k) int64, best first, -1 for "none found" (or None / k = 0: no
    index). Positives come first in sorted order, so ``active[local_labels] == labels``.
    A label of -1 marks a query whose positive is not among these classes (the sharded
    classifier indexes one shard, and a sample's class may live on another rank): it adds
    no positive, its candidates still count, and its local label stays -1.
    When ``sample_num >= num_classes`` the active set is every class in order (the
    candidates are ignored) and the labels are returned as they are. When the batch has
    more distinct labels than ``sample_num``, all of them are returned (more than
    ``sample_num``); the caller decides how loudly to say so. This is :class:`SelectionRule`
    with every option at its default (all free slots to the index, deterministic top-k).
    """
    drawn = _draw(labels, candidates, None, sample_num, num_classes, rng)
    return drawn.active, drawn.local


@dataclass(frozen=True)
class _Drawn:
    """One batch's active set with each class's probability ``q`` of being in it (positives: 1)."""

    active: np.ndarray
    local: np.ndarray
    q: np.ndarray
    hard: int = 0  # negatives taken from the candidates (they follow the positives in ``active``)


def _checked_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < -1 or labels.max() >= num_classes):
        bad = labels[(labels < -1) | (labels >= num_classes)][0]
        raise ValueError(f"label {bad} is outside [0, {num_classes}) (or -1: no positive here)")
    return labels


def hard_slots(free: int, hard_fraction: float) -> int:
    """Slots of ``free`` (S minus positives) the index's candidates may take: the fraction, rounded half up."""
    return int(min(free, max(0, math.floor(hard_fraction * free + 0.5))))


def _candidate_pool(queries: int, candidates: np.ndarray | None, scores: np.ndarray | None,
                    positives: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Distinct non-positive candidates in round-robin rank order, and each one's best similarity.

    Round-robin over the batch by rank (every query's best, then every query's second best,
    ...) so a query contributes its hardest negatives before any query its easier ones. A
    class several queries found scores its highest similarity: how hard it is for the query
    it is hardest for.
    """
    if candidates is None or not np.size(candidates):
        return np.empty(0, dtype=np.int64), None
    ranked = np.asarray(candidates, dtype=np.int64).reshape(queries, -1).T.ravel()
    keep = (ranked >= 0) & (ranked < num_classes)
    keep &= ~np.isin(ranked, positives)
    ranked = ranked[keep]
    if ranked.size == 0:
        return ranked, None if scores is None else np.empty(0, dtype=np.float64)
    pool, first = np.unique(ranked, return_index=True)
    order = np.argsort(first, kind="stable")
    if scores is None:
        return pool[order], None
    sims = np.asarray(scores, dtype=np.float64).reshape(queries, -1).T.ravel()[keep]
    best = np.full(pool.size, -np.inf)
    np.maximum.at(best, np.searchsorted(pool, ranked), sims)
    return pool[order], best[order]


def score_inclusion(scores: np.ndarray, temperature: float, count: int) -> np.ndarray:
    """Inclusion probabilities pi (sum ``count``, each <= 1) proportional to exp(score / temperature).

    pi_i = min(1, c exp(s_i / T)) with c such that the pi sum to ``count``: the classes so
    hard that their share would exceed 1 are certain, the rest share what is left in
    proportion to their weights (the standard capping of probability-proportional-to-size
    sampling). ``count >= len(scores)``: every class is certain.
    """
    n = scores.size
    if count >= n:
        return np.ones(n)
    if count <= 0:
        return np.zeros(n)
    z = np.asarray(scores, dtype=np.float64) / temperature
    finite = np.isfinite(z)
    z = np.where(finite, z, (z[finite].min() - 1000.0) if finite.any() else 0.0)
    order = np.argsort(-z, kind="stable")
    zs = z[order]  # log-weights, largest first: no weight underflows at a low temperature
    log_suffix = np.logaddexp.accumulate(zs[::-1])[::-1]  # log of the sum of the weights from j on
    k = np.arange(count)
    # the fewest classes capped at 1 such that the largest uncapped one stays below 1
    fits = np.log(count - k) + zs[:count] < log_suffix[:count]
    capped = int(np.argmax(fits)) if fits.any() else count
    pi_sorted = np.ones(n)
    if capped < n:
        pi_sorted[capped:] = np.exp(np.log(count - capped) + zs[capped:] - log_suffix[capped]) if count > capped else 0.0
    pi = np.empty(n)
    pi[order] = np.minimum(pi_sorted, 1.0)
    return pi


def sample_by_inclusion(pi: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a without-replacement sample that holds item i with probability exactly ``pi[i]``.

    Certain items (pi = 1) are taken; the others by systematic sampling in a random order:
    one uniform offset u, and item i is taken when a point of u + Z falls in its stretch of
    the cumulated pi. Each stretch is shorter than 1, so an item is taken at most once, with
    probability its length, and the sample has exactly sum(pi) items.
    """
    certain = np.flatnonzero(pi >= 1.0 - 1e-12)
    maybe = np.flatnonzero((pi < 1.0 - 1e-12) & (pi > 0.0))
    want = int(round(float(pi.sum()))) - certain.size
    if want <= 0 or maybe.size == 0:
        return certain
    order = maybe[rng.permutation(maybe.size)]
    cum = np.cumsum(pi[order])
    cum *= want / cum[-1]
    cum[-1] = want
    u = rng.random()
    hits = np.floor(cum - u) - np.floor(np.concatenate([[0.0], cum[:-1]]) - u)
    return np.sort(np.concatenate([certain, order[hits > 0]]))


def _draw(labels: np.ndarray, candidates: np.ndarray | None, scores: np.ndarray | None, sample_num: int,
          num_classes: int, rng: np.random.Generator, *, hard_fraction: float = 1.0, pick: str = "topk",
          temperature: float = 1.0) -> _Drawn:
    """The selection with every option, and each active class's probability of being active."""
    labels = _checked_labels(labels, num_classes)
    if sample_num >= num_classes:
        return _Drawn(np.arange(num_classes, dtype=np.int64), labels.copy(), np.ones(num_classes))
    known = labels >= 0
    positives = np.unique(labels[known])
    local = np.where(known, np.searchsorted(positives, labels), -1).astype(np.int64)
    free = sample_num - positives.size
    if free <= 0:
        return _Drawn(positives, local, np.ones(positives.size))

    pool, pool_scores = _candidate_pool(labels.size, candidates, scores, positives, num_classes)
    slots = hard_slots(free, hard_fraction)
    if pick == "score" and pool.size:
        if pool_scores is None:
            raise ValueError("candidate_pick=score needs the index's similarities with its candidates")
        pi = score_inclusion(pool_scores, temperature, slots)
        chosen = sample_by_inclusion(pi, rng)
    else:  # top-k: the first `slots` of the round-robin, with certainty
        pi = (np.arange(pool.size) < slots).astype(np.float64)
        chosen = np.arange(min(slots, pool.size))
    negatives = pool[chosen]

    taken = np.concatenate([positives, negatives])
    count = free - negatives.size
    fill = _uniform_fill(np.sort(taken), count, num_classes, rng)
    # P(active) of a negative = P(picked from the pool) + P(not picked) x P(in the uniform fill)
    fill_share = count / max(num_classes - taken.size, 1)
    q_negatives = pi[chosen] + (1.0 - pi[chosen]) * fill_share
    q_fill = np.full(fill.size, fill_share)
    in_pool = np.isin(fill, pool)
    if in_pool.any():
        at = np.searchsorted(pool, fill[in_pool], sorter=np.argsort(pool))
        pool_pi = pi[np.argsort(pool)][at]
        q_fill[in_pool] = pool_pi + (1.0 - pool_pi) * fill_share
    q = np.concatenate([np.ones(positives.size), q_negatives, q_fill])
    return _Drawn(np.concatenate([taken, fill]), local, q, int(negatives.size))


@dataclass(frozen=True)
class Selection:
    """What a selection rule answers for one batch.

    ``active`` (S,) int64 class ids (positives first, sorted), ``local`` (B,) int64 the labels'
    positions in ``active`` (-1: no positive here), and ``logit_adjust``: None, or (S,) float32
    added to the active classes' logits before the loss (a sampled-softmax correction).
    ``log_q`` (S,) float32: log of each class's probability of being active (0: certain; None
    when every class is active), what a coverage estimate weighs by. It
    unpacks and indexes as the pair ``(active, local)`` (what selectors answered before), for
    callers that apply no correction.
    """

    active: np.ndarray
    local: np.ndarray
    logit_adjust: np.ndarray | None = None
    log_q: np.ndarray | None = None
    stats: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.active, self.local))

    def __getitem__(self, index: int) -> np.ndarray:
        return (self.active, self.local)[index]


CANDIDATE_PICKS = ("topk", "score")
CEILINGS = ("off", "positive")

#: Similarities of the batch's queries with classes, under the rows as they are now: ids (B, k)
#: (one list per query, -1: none) -> (B, k), -inf where the id is -1; ids (M,) (the same classes
#: for every query) -> (B, M). The holder of the rows answers it (the store, a shard, a selector).
Scorer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SelectionRule:
    """The one rule from (labels, index answer) to a batch's active classes, as plain fields.

    It is a value (JSON-able with ``dataclasses.asdict``) so that whoever holds the index, the
    trainer or a shard of the parameter server, applies exactly the same rule. ``seed`` and
    the step seed the random draws (``rng_for``): the same request gives the same active set
    wherever it is answered. The fields (``sampler.*`` keys of the same names):

    - ``hard_after``: steps of uniform negatives before the index's answers are used;
    - ``hard_fraction``: share of the free slots (S minus the positives) the index's
      candidates may take; the rest is uniform fill (1.0: the candidates take all they can);
    - ``candidate_pick``: ``topk`` takes the round-robin's first candidates; ``score`` draws
      them without replacement with inclusion probability ~ exp(similarity / ``temperature``);
    - ``logq``: answer ``logit_adjust = -log q`` (see :meth:`select`).
    """

    sample_num: int
    seed: int = 0
    hard_after: int = 0
    hard_fraction: float = 1.0
    candidate_pick: str = "topk"
    temperature: float = 0.05
    logq: bool = False
    ceiling: str = "off"
    ceiling_margin: float = 0.0
    ready_probe: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.sample_num, numbers.Integral) or self.sample_num <= 0:
            problems.append(f"sample_num must be a positive int, got {self.sample_num!r}")
        if not isinstance(self.hard_after, numbers.Integral) or self.hard_after < 0:
            problems.append(f"hard_after must be an int >= 0, got {self.hard_after!r}")
        if not isinstance(self.hard_fraction, numbers.Real) or not 0.0 <= self.hard_fraction <= 1.0:
            problems.append(f"hard_fraction must be in [0, 1], got {self.hard_fraction!r}")
        if self.candidate_pick not in CANDIDATE_PICKS:
            problems.append(f"candidate_pick must be one of {', '.join(CANDIDATE_PICKS)}, got {self.candidate_pick!r}")
        if not isinstance(self.temperature, numbers.Real) or not self.temperature > 0.0:
            problems.append(f"temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.logq, (bool, np.bool_)):
            problems.append(f"logq must be a bool, got {self.logq!r}")
        if self.ceiling not in CEILINGS:
            problems.append(f"ceiling must be one of {', '.join(CEILINGS)}, got {self.ceiling!r}")
        if not isinstance(self.ceiling_margin, numbers.Real) or not math.isfinite(self.ceiling_margin):
            problems.append(f"ceiling_margin must be a finite number, got {self.ceiling_margin!r}")
        if not isinstance(self.ready_probe, numbers.Integral) or self.ready_probe < 0:
            problems.append(f"ready_probe must be an int >= 0, got {self.ready_probe!r}")
        if problems:
            raise ValueError("selection rule: " + "; ".join(problems))

    @classmethod
    def from_config(cls, sampler_cfg, sample_num: int, seed: int) -> "SelectionRule":
        """The rule the ``sampler`` config section describes, for ``sample_num`` classes and fill ``seed``."""
        return cls(sample_num, seed=seed, hard_after=sampler_cfg.hard_after,
                   hard_fraction=float(sampler_cfg.hard_fraction), candidate_pick=sampler_cfg.candidate_pick,
                   temperature=float(sampler_cfg.temperature), logq=bool(sampler_cfg.logq),
                   ceiling=sampler_cfg.ceiling, ceiling_margin=float(sampler_cfg.ceiling_margin),
                   ready_probe=int(sampler_cfg.ready_probe))

    @property
    def needs_scorer(self) -> bool:
        """Whether the rule reads the current rows at all (the ceiling, the readiness test): its holder
        builds a ``scorer`` for it only then."""
        return self.compares_candidates or self.ready_probe > 0

    @property
    def compares_candidates(self) -> bool:
        """Whether the rule compares each candidate with its query's own class (the ceiling): only then
        must the candidates' similarities be under the current rows (a stale index's re-scored)."""
        return self.ceiling != "off"

    def wants_candidates(self, step: int) -> bool:
        """Whether this step's selection uses the index at all."""
        return step >= self.hard_after and self.hard_fraction > 0.0

    def asking(self, labels: np.ndarray, num_classes: int, step: int, scorer: Scorer | None
               ) -> tuple[np.ndarray, dict]:
        """Which queries ask the index for candidates this step (bool (B,)), and what the rule measured.

        None before ``hard_after`` or with no hard share; with ``ready_probe`` only the queries
        whose own class already scores above every one of that many uniformly drawn classes (the
        others are not yet told apart from random classes: uniform negatives are what they need).
        The holder searches for the asking queries alone (see :func:`find_candidates`).
        """
        labels = np.asarray(labels, dtype=np.int64)
        if not self.wants_candidates(step) or self.sample_num >= num_classes:
            return np.zeros(labels.size, dtype=bool), {}
        if not self.ready_probe or not labels.size:
            return np.ones(labels.size, dtype=bool), {}
        if scorer is None:
            raise ValueError("a selection rule with ready_probe needs a scorer")
        probe = np.random.default_rng([self.seed, max(int(step), 0), 1]).integers(0, num_classes, self.ready_probe)
        best = scorer(np.unique(probe)).max(axis=1)
        ready = _own_scores(labels, scorer) > best
        return ready, {"ready_share": float(ready.mean())}

    def rng_for(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, max(int(step), 0)])

    def select(self, labels: np.ndarray, ids: np.ndarray | None, scores: np.ndarray | None, num_classes: int,
               step: int, scorer: Scorer | None = None, measured: dict | None = None) -> Selection:
        """Active classes of one batch from its labels and the index's (B, k) ids and similarities.

        With a ``ceiling`` the caller gives ``scores`` under the current rows (the holder of an
        index that answers from stale rows re-scores them first) and a ``scorer`` (see
        :data:`Scorer`) for the queries' own classes; ``measured``: what :meth:`asking` measured,
        reported with the answer's own ``stats``. With ``logq`` the answer carries
        ``logit_adjust = -log q`` per active class, q being the
        probability that the class is in the active set under this mixture proposal: 1 for a
        top-k pick, ``fill / free`` for a uniform fill (fill slots over the classes it draws
        from), the inclusion probability (plus the fill's chance) for a score pick. Adding it
        to a negative's logit makes the sampled partition sum ``sum exp(l_i) / q_i``, an
        unbiased estimate of the full softmax's, so the loss and its gradient estimate full
        softmax's instead of one biased toward whatever the proposal favours. Positives get
        0: every label of the batch is in the set with certainty (q = 1, -log q = 0), and
        that is the right weight for a class counted once in the full sum, both as a
        sample's own target and as a negative of the batch's other samples. Giving the target
        its own term (as sampled softmax does when the target is drawn like the negatives)
        would shift the loss by a constant of the proposal, not of the model.
        """
        if not self.wants_candidates(step) or ids is None or not np.size(ids):
            ids = scores = None
        labels = _checked_labels(labels, num_classes)
        stats = dict(measured or {})
        if ids is not None and self.compares_candidates and labels.size and self.sample_num < num_classes:
            if scorer is None or scores is None:
                raise ValueError("a selection rule with a ceiling needs the candidates' similarities and a scorer")
            ids = np.asarray(ids, dtype=np.int64).reshape(labels.size, -1)
            ids, scores, stats["ceiling_dropped"] = _under_ceiling(ids, np.asarray(scores).reshape(ids.shape),
                                                                   labels, scorer, self.ceiling_margin)
        drawn = _draw(labels, ids, scores, self.sample_num, num_classes, self.rng_for(step),
                      hard_fraction=self.hard_fraction, pick=self.candidate_pick, temperature=self.temperature)
        if drawn.active.size >= num_classes:
            return Selection(drawn.active, drawn.local, stats=stats)
        if ids is not None:
            stats["hard_share"] = drawn.hard / max(self.sample_num - np.unique(labels[labels >= 0]).size, 1)
        log_q = np.log(np.clip(drawn.q, 1e-30, 1.0)).astype(np.float32)
        adjust = (0.0 - log_q) if self.logq else None
        return Selection(drawn.active, drawn.local, adjust, log_q, stats=stats)


def reranked(ids: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's candidates in the order of their fresh similarities, best first (-1: last): what
    an index answering from stale rows hands the rule once its holder re-scored them."""
    sims = np.where(ids >= 0, sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(sims, order, 1)


def score_with_rows(queries: np.ndarray, ids: np.ndarray, rows_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """A :data:`Scorer`'s answer from the (already normalised, for cosine) ``queries`` (B, D) and
    ``rows_of(unique ids) -> (U, D)`` values prepared the same way: one read of each distinct class."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim == 1:
        unique, inverse = np.unique(ids, return_inverse=True)
        return (queries @ rows_of(unique).T)[:, inverse]
    valid = ids >= 0
    unique, inverse = np.unique(ids[valid], return_inverse=True)
    out = np.full(ids.shape, -np.inf, dtype=np.float32)
    if unique.size:
        rows = rows_of(unique)
        where = np.nonzero(valid)
        out[where] = np.einsum("nd,nd->n", queries[where[0]], rows[inverse])
    return out


def rows_scorer(features: np.ndarray, metric: str, read: Callable[[np.ndarray], np.ndarray]) -> Scorer:
    """The selection rule's :data:`Scorer`: ``features`` against the current rows ``read(ids)``
    returns (one read per call), both normalised under the cosine metric. Every holder of rows
    (the store, a client of served shards, the sharded classifier's selector) builds it here."""
    from hfs.samplers.base import normalise_rows

    cosine = metric == "cosine"
    features = np.asarray(features, dtype=np.float32)
    queries = normalise_rows(features) if cosine else features

    def rows_of(ids: np.ndarray) -> np.ndarray:
        values = np.asarray(read(ids), dtype=np.float32)
        return normalise_rows(values) if cosine else values

    return lambda ids: score_with_rows(queries, ids, rows_of)


def _own_scores(labels: np.ndarray, scorer: Scorer) -> np.ndarray:
    """Each query's similarity with its own class (+inf for a query without one here: label -1)."""
    own = np.full(labels.size, np.inf)
    known = labels >= 0
    if known.any():
        own[known] = scorer(labels[known][:, None])[:, 0]
    return own


def find_candidates(rule: "SelectionRule", labels: np.ndarray, features: np.ndarray | None, num_classes: int,
                    step: int, search: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                    scorer: Scorer | None) -> tuple[np.ndarray | None, np.ndarray | None, dict]:
    """A step's (B, k) candidates and similarities for :meth:`SelectionRule.select` (None: none), and
    what the rule measured: ``search(features of the asking queries) -> (n, k) ids, similarities``
    is the holder's index (in its fresh form when the rule compares, see ``OwnedIndex.answer``);
    the queries that do not ask get none. One flow for every holder of an index."""
    labels = np.asarray(labels, dtype=np.int64)
    ask, measured = rule.asking(labels, num_classes, step, scorer)
    if features is None or not ask.any():
        return None, None, measured
    found, sims = search(np.asarray(features, dtype=np.float32)[ask])
    if not found.shape[1]:
        return None, None, measured
    ids = np.full((labels.size, found.shape[1]), -1, dtype=np.int64)
    scores = np.full(ids.shape, -np.inf, dtype=np.float32)
    ids[ask], scores[ask] = found, sims
    return ids, scores, measured


def _under_ceiling(ids: np.ndarray, scores: np.ndarray, labels: np.ndarray, scorer: Scorer,
                   margin: float) -> tuple[np.ndarray, np.ndarray, float]:
    """``ids`` and ``scores`` without the candidates that score above their query's own class +
    ``margin`` (each query's remaining candidates move up, in order; -1 / -inf pad), and the share dropped.

    The semi-hard rule (FaceNet): a class the sample is closer to than to its own is, early on,
    any class (nothing is learnt yet: the hardest candidates teach a collapse), and later a
    duplicate of its identity or the true class of a mislabelled sample. A query without a
    positive here (label -1) keeps every candidate.
    """
    own = _own_scores(labels, scorer)
    valid = ids >= 0
    over = valid & (scores > own[:, None] + margin)
    order = np.argsort(over, axis=1, kind="stable")  # kept candidates first, in their order
    kept_ids = np.take_along_axis(np.where(over, -1, ids), order, 1)
    kept_scores = np.take_along_axis(np.where(over, -np.inf, scores), order, 1)
    return kept_ids, kept_scores, float(over.sum() / max(valid.sum(), 1))
