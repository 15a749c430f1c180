"""The selection rule's options (issue 12 §4): hard_fraction, score picks, the log-Q correction."""

import dataclasses
import json
import math

import numpy as np
import pytest

from hfs.config import ConfigError, load_config
from hfs.samplers.selection import (Selection, SelectionRule, hard_slots, sample_by_inclusion, score_inclusion,
                                    select_active_classes)

LABELS = np.array([7, 3, 7, 9])  # three distinct positives
IDS = np.array([[7, 11, 12, 20], [3, 13, 11, 21], [7, 14, 15, 22], [9, 16, 17, 23]])
SIMS = np.array([[0.9, 0.8, 0.7, 0.1], [0.9, 0.85, 0.6, 0.2], [0.9, 0.3, 0.2, 0.15], [0.9, 0.5, 0.4, 0.05]])
POOL_ORDER = [11, 13, 14, 16, 12, 15, 17, 20, 21, 22, 23]  # round-robin, positives and repeats dropped


def _valid(chosen: Selection, labels: np.ndarray, sample_num: int) -> None:
    assert len(chosen.active) == sample_num == len(np.unique(chosen.active))
    np.testing.assert_array_equal(chosen.active[chosen.local], labels)


def test_defaults_keep_the_rule_of_before_and_travel_as_json():
    rule = SelectionRule(12, seed=5)
    for step in (0, 3):
        chosen = rule.select(LABELS, IDS, SIMS, 1000, step)
        active, local = select_active_classes(LABELS, IDS, 12, 1000, rule.rng_for(step))
        np.testing.assert_array_equal(chosen.active, active)
        np.testing.assert_array_equal(chosen.local, local)
        assert chosen.logit_adjust is None
    wire = json.loads(json.dumps(dataclasses.asdict(rule)))
    assert SelectionRule(**wire) == rule
    cfg = load_config(None, ["fc.sample_num=12", "sampler.ceiling=off"]).sampler
    assert SelectionRule.from_config(cfg, 12, 5) == rule
    # the configured default adds the ceiling to the plain rule
    assert SelectionRule.from_config(load_config(None, []).sampler, 12, 5) == SelectionRule(12, seed=5, ceiling="positive")


def test_selection_unpacks_as_the_pair_selectors_answered_before():
    active, local = Selection(np.arange(3), np.array([1]))
    assert active.tolist() == [0, 1, 2] and local.tolist() == [1]
    assert Selection(np.arange(3), np.array([1]))[1].tolist() == [1]


@pytest.mark.parametrize("free,fraction,slots", [(16, 0.5, 8), (5, 0.5, 3), (5, 0.3, 2), (7, 1.0, 7),
                                                 (7, 0.0, 0), (1, 0.4, 0), (1, 0.5, 1), (100, 0.29, 29)])
def test_hard_slots_round_half_up(free, fraction, slots):
    assert hard_slots(free, fraction) == slots


def test_hard_fraction_gives_the_index_its_share_and_the_rest_uniform():
    rule = SelectionRule(3 + 10, hard_fraction=0.5)  # 10 free slots: 5 from the index, 5 uniform
    chosen = rule.select(LABELS, IDS, SIMS, 1_000_000, step=1)
    _valid(chosen, LABELS, 13)
    assert chosen.active[:3].tolist() == [3, 7, 9]
    assert chosen.active[3:8].tolist() == POOL_ORDER[:5]
    assert not set(chosen.active[8:].tolist()) & set(POOL_ORDER)  # a million classes: the fill misses the pool


def test_hard_fraction_zero_never_asks_the_index():
    rule = SelectionRule(13, hard_fraction=0.0)
    assert not rule.wants_candidates(10)
    chosen = rule.select(LABELS, IDS, SIMS, 1_000_000, step=1)
    _valid(chosen, LABELS, 13)
    np.testing.assert_array_equal(chosen.active, select_active_classes(LABELS, None, 13, 1_000_000,
                                                                       rule.rng_for(1))[0])


def test_score_inclusion_is_proportional_to_exp_score_capped_at_one():
    scores = np.array([0.9, 0.8, 0.5, 0.4, 0.1])
    pi = score_inclusion(scores, 1.0, 2)
    assert pi.sum() == pytest.approx(2.0) and pi.max() <= 1.0
    np.testing.assert_allclose(pi / pi[0], np.exp(scores - scores[0]))  # nothing capped at T = 1
    pi = score_inclusion(scores, 0.05, 2)  # the hardest would get more than 1: certain, the rest share one
    assert pi[0] == 1.0 and pi.sum() == pytest.approx(2.0)
    np.testing.assert_allclose(pi[1:], np.exp(scores[1:] / 0.05) / np.exp(scores[1:] / 0.05).sum())
    pi = score_inclusion(np.array([2.0, 0.0, 0.0, 0.0]), 0.5, 2)  # one certain, one shared by three
    assert pi[0] == 1.0
    np.testing.assert_allclose(pi[1:], [1 / 3] * 3)
    np.testing.assert_array_equal(score_inclusion(scores, 0.1, 9), np.ones(5))
    np.testing.assert_array_equal(score_inclusion(scores, 0.1, 0), np.zeros(5))


def test_sample_by_inclusion_draws_exactly_sum_pi_with_those_probabilities():
    pi = score_inclusion(np.array([0.9, 0.8, 0.5, 0.4, 0.1, 0.0]), 0.3, 3)
    rng = np.random.default_rng(0)
    hits = np.zeros(pi.size)
    draws = 6000
    for _ in range(draws):
        picked = sample_by_inclusion(pi, rng)
        assert picked.size == 3 == np.unique(picked).size
        hits[picked] += 1
    np.testing.assert_allclose(hits / draws, pi, atol=0.025)


def test_score_pick_is_deterministic_per_step_and_takes_the_share_from_the_pool():
    rule = SelectionRule(13, candidate_pick="score", temperature=0.2, hard_fraction=0.5, seed=4)
    a, b = rule.select(LABELS, IDS, SIMS, 1_000_000, 6), rule.select(LABELS, IDS, SIMS, 1_000_000, 6)
    np.testing.assert_array_equal(a.active, b.active)
    _valid(a, LABELS, 13)
    assert set(a.active[3:8].tolist()) <= set(POOL_ORDER)
    others = [rule.select(LABELS, IDS, SIMS, 1_000_000, step).active[3:8] for step in range(20)]
    assert len({tuple(o) for o in others}) > 1  # a draw, not a fixed list


def test_score_pick_at_a_low_temperature_is_the_most_similar():
    rule = SelectionRule(8, candidate_pick="score", temperature=1e-4)  # 5 free slots
    chosen = rule.select(LABELS, IDS, SIMS, 1000, 0)
    assert sorted(chosen.active[3:].tolist()) == sorted([13, 11, 16, 12, 17])  # sims .85 .8 .5 .7 .4


def test_score_pick_needs_similarities():
    with pytest.raises(ValueError, match="similarities"):
        SelectionRule(8, candidate_pick="score").select(LABELS, IDS, None, 1000, 0)


def _frequency(rule: SelectionRule, num_classes: int, steps: int) -> tuple[np.ndarray, Selection]:
    counts = np.zeros(num_classes)
    for step in range(steps):
        chosen = rule.select(LABELS, IDS, SIMS, num_classes, step)
        counts[chosen.active] += 1
    return counts / steps, chosen


@pytest.mark.parametrize("pick", ["topk", "score"])
def test_logq_is_minus_log_of_how_often_each_class_is_active(pick):
    """On a small case the adjustment matches the measured probability of being active."""
    rule = SelectionRule(3 + 8, candidate_pick=pick, temperature=0.2, hard_fraction=0.5, logq=True)
    frequency, last = _frequency(rule, 40, 3000)
    q = np.exp(-last.logit_adjust.astype(np.float64))
    assert last.logit_adjust.dtype == np.float32 and last.logit_adjust.shape == (11,)
    np.testing.assert_array_equal(last.logit_adjust[:3], 0.0)  # positives: certain
    np.testing.assert_allclose(frequency[last.active], q, atol=0.03)
    if pick == "topk":
        np.testing.assert_array_equal(last.logit_adjust[3:7], 0.0)  # the top-4 picks are certain
        fill_q = 4 / (40 - 7)  # 4 fill slots over the 33 classes not yet taken
        np.testing.assert_allclose(last.logit_adjust[7:], -math.log(fill_q), rtol=1e-6)


def test_logq_off_or_every_class_active_means_no_adjustment():
    assert SelectionRule(11, hard_fraction=0.5).select(LABELS, IDS, SIMS, 40, 0).logit_adjust is None
    assert SelectionRule(40, logq=True).select(LABELS, IDS, SIMS, 40, 0).logit_adjust is None


@pytest.mark.parametrize("field,value", [("hard_fraction", 1.5), ("hard_fraction", -0.1),
                                         ("candidate_pick", "best"), ("temperature", 0.0),
                                         ("logq", "yes"), ("sample_num", 0), ("hard_after", -1)])
def test_rule_rejects_bad_fields_by_name(field, value):
    with pytest.raises(ValueError, match=f"selection rule: {field} must"):
        SelectionRule(**{"sample_num": 10, field: value})


@pytest.mark.parametrize("override,needle", [
    ("sampler.hard_fraction=1.5", "sampler.hard_fraction' must be <= 1"),
    ("sampler.hard_fraction=-0.5", "sampler.hard_fraction' must be >= 0"),
    ("sampler.candidate_pick=best", "sampler.candidate_pick"),
    ("sampler.temperature=0", "sampler.temperature' must be > 0"),
    ("sampler.logq=maybe", "sampler.logq"),
])
def test_config_rejects_bad_values_by_key(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert needle in str(info.value)


def test_selector_applies_the_configured_rule():
    from hfs.samplers import build_selector

    class Matrix:
        def __init__(self, weights):
            self.weights = weights

        def shape(self, matrix):
            return self.weights.shape

        def iter_chunks(self, matrix, rows):
            for first in range(0, len(self.weights), rows):
                yield first, self.weights[first:first + rows]

        def reader_spec(self):
            return None

    cfg = load_config(None, ["sampler.type=exact", "sampler.background=false", "sampler.exact_device=cpu",
                             "sampler.hard_fraction=0.5", "sampler.candidate_pick=score", "sampler.logq=true",
                             "sampler.temperature=0.1", "fc.sample_num=20", "sampler.ceiling=off"])
    weights = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    selector = build_selector(cfg.sampler, store=Matrix(weights), num_classes=200, sample_num=20,
                              queries_per_step=4, seed=3, metric="cosine")
    assert selector.rule == SelectionRule(20, seed=3, hard_fraction=0.5, candidate_pick="score", temperature=0.1,
                                          logq=True)
    chosen = selector.select(weights[[1, 2, 3, 4]] + 0.01, np.array([1, 2, 3, 4]), 0)
    assert len(chosen.active) == 20 and chosen.logit_adjust.shape == (20,)
    selector.close()


# --------------------------------------------------------------------------- adaptive allocation


def test_selection_carries_log_q_whether_or_not_logq_adjusts():
    chosen = SelectionRule(11, hard_fraction=0.5).select(LABELS, IDS, SIMS, 40, 0)
    assert chosen.logit_adjust is None and chosen.log_q.shape == (11,)
    np.testing.assert_array_equal(chosen.log_q[:7], 0.0)  # positives and top-k picks: certain
    np.testing.assert_allclose(chosen.log_q[7:], math.log(4 / 33), rtol=1e-6)
    assert SelectionRule(40).select(LABELS, IDS, SIMS, 40, 0).log_q is None  # every class active


@pytest.mark.parametrize("key,value", [("hard_fraction", "2"), ("candidate_pick", "best"), ("temperature", "0")])
def test_cli_rejects_a_bad_option_in_one_error_line(key, value):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "hfs", "train", "--set", f"sampler.{key}={value}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"sampler.{key}" in lines[0]
