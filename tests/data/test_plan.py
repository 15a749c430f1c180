import numpy as np
import pytest

from hfs.data.plan import LabelPlan, Regime
from hfs.utils.errors import HfsError


def test_clean_plan_is_one_label_per_identity_with_all_views():
    plan = LabelPlan(10, 4, val_views=2)
    identity, view, label = plan.train_items(np.arange(plan.train_size))
    assert plan.train_size == 40 and plan.val_size == 20
    np.testing.assert_array_equal(identity, np.repeat(np.arange(10), 4))
    np.testing.assert_array_equal(view, np.tile(np.arange(4), 10))
    np.testing.assert_array_equal(label, identity)
    identity, view, label = plan.val_items(np.arange(plan.val_size))
    np.testing.assert_array_equal(view, np.tile([4, 5], 10))  # held-out views come after the training views
    np.testing.assert_array_equal(label, identity)


def test_duplicates_give_a_share_of_labels_a_twin_identity_with_views_of_its_own():
    plan = LabelPlan(1000, 5, Regime(duplicates=0.2), val_views=1, seed=3)
    labels = np.arange(1000)
    identity, offset = plan.identity_of(labels)
    twins = np.flatnonzero(identity != labels)
    assert twins.size == 200
    partners = identity[twins]
    assert np.all(identity[partners] == partners)  # a partner is not a twin itself
    assert np.unique(partners).size == 200  # no identity carries three labels
    assert np.all(offset[twins] == 6)  # after the partner's 5 training + 1 held-out views
    ident, view, _ = plan.train_items(np.arange(plan.train_size))
    pairs = set(zip(ident.tolist(), view.tolist()))
    assert len(pairs) == plan.train_size  # every training image is a distinct (identity, view)
    vi, vv, _ = plan.val_items(np.arange(plan.val_size))
    assert not pairs & set(zip(vi.tolist(), vv.tolist()))  # held-out images are never trained on
    assert identity.max() < 1000  # identities from C on stay unseen


def test_label_noise_relabels_the_share_with_another_label_and_spares_held_out_samples():
    plan = LabelPlan(500, 10, Regime(label_noise=0.2), seed=1)
    clean = np.repeat(np.arange(500), 10)
    noisy = plan.train_labels()
    flipped = noisy != clean
    assert 0.18 < flipped.mean() < 0.22
    assert noisy.min() >= 0 and noisy.max() < 500
    np.testing.assert_array_equal(plan.val_items(np.arange(plan.val_size))[2], np.arange(500))
    # a pure function of the sample: a fresh plan and any order of reading agree
    again = LabelPlan(500, 10, Regime(label_noise=0.2), seed=1)
    idx = np.array([4321, 7, 99])
    np.testing.assert_array_equal(again.train_items(idx)[2], noisy[idx])


def test_long_tail_counts_span_min_to_max_and_index_the_samples():
    plan = LabelPlan(2000, 15, Regime(min_views=2), seed=0)
    counts = plan.counts()
    assert counts.min() == 2 and counts.max() == 15
    assert np.median(counts) < 8  # log-uniform: most classes have few images
    identity, view, label = plan.train_items(np.arange(plan.train_size))
    np.testing.assert_array_equal(np.bincount(label, minlength=2000), counts)
    assert view.max() == 14 and np.all(view < counts[label])


@pytest.mark.parametrize("regime,needle", [
    (Regime(duplicates=0.6), "duplicates must be in [0, 0.5]"),
    (Regime(label_noise=1.0), "label_noise must be in [0, 1)"),
    (Regime(min_views=9), "min_views must be in [0, 8]"),
])
def test_out_of_range_settings_name_the_setting(regime, needle):
    with pytest.raises(HfsError, match=needle.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        regime.check(8, lambda field: f"data.synthetic_{field}")
    with pytest.raises(HfsError):
        LabelPlan(10, 8, regime)


def test_out_of_range_indices_raise():
    with pytest.raises(IndexError):
        LabelPlan(3, 2).train_items(np.array([6]))


def test_the_latent_and_synthetic_sources_take_the_regime_from_the_config():
    from hfs.config import load_config
    from hfs.data.datasets import build_datasets

    for source, size in (("latent", 16), ("synthetic", 16)):
        cfg = load_config(None, [f"data.source={source}", f"data.image_size={size}", "data.synthetic_classes=50",
                                 "data.synthetic_images_per_class=6", "data.synthetic_val_per_class=1",
                                 "data.synthetic_duplicates=0.2", "data.synthetic_label_noise=0.3",
                                 "data.synthetic_min_views=2"])
        train, val, classes = build_datasets(cfg)
        counts = train.plan.counts()
        assert classes == 50 and len(train) == counts.sum() and counts.min() >= 2 and len(val) == 50
        labels = train.labels()
        clean = np.repeat(np.arange(50), counts)
        assert 0.1 < (labels != clean).mean() < 0.5  # about 30% mislabelled
        assert int(train[len(train) - 1][1]) == labels[-1]


def test_a_min_views_above_the_images_per_class_names_the_config_key():
    from hfs.config import load_config
    from hfs.data.datasets import build_datasets

    cfg = load_config(None, ["data.source=latent", "data.synthetic_images_per_class=4", "data.synthetic_min_views=9"])
    with pytest.raises(HfsError, match="config key 'data.synthetic_min_views' must be in \\[0, 4\\]"):
        build_datasets(cfg)
