"""Embedding-level synthetic identities: deterministic, batched = one by one, look-alike clusters."""

import numpy as np
import pytest
import torch

from hfs.config import load_config
from hfs.data.datasets import build_datasets
from hfs.data.latent import LatentGenerator, LatentIdentities, hashed_normals
from hfs.models.backbones import build_backbone


def test_hashed_normals_are_standard_normal_and_pure():
    x = hashed_normals(3, 1, np.arange(20000), 6)
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1.0) < 0.02
    assert abs(np.corrcoef(x[:, 0], x[:, 1])[0, 1]) < 0.03
    np.testing.assert_array_equal(hashed_normals(3, 1, np.array([7, 5]), 6), x[[7, 5]])
    assert not np.allclose(hashed_normals(4, 1, np.array([7]), 6), x[[7]])  # another seed, other numbers


def test_items_are_the_same_one_by_one_batched_and_in_a_new_generator():
    ds = LatentIdentities(LatentGenerator(1, input_dim=16), 50, 4, split="train")
    batch = ds.__getitems__([0, 17, 199])
    again = LatentIdentities(LatentGenerator(1, input_dim=16), 50, 4, split="train")
    for index, (x, label) in zip([0, 17, 199], batch):
        one, one_label = again[index]
        torch.testing.assert_close(x, one)
        assert label == one_label == index // 4 and x.shape == (16,)
    with pytest.raises(IndexError):
        ds[200]


def test_val_views_are_new_samples_of_the_same_identities():
    gen = LatentGenerator(0, input_dim=16)
    train = LatentIdentities(gen, 10, 3, split="train", val_per_class=2)
    val = LatentIdentities(gen, 10, 3, split="val", val_per_class=2)
    assert len(val) == 20 and val.labels().tolist() == np.repeat(np.arange(10), 2).tolist()
    assert not any(torch.equal(val[0][0], train[i][0]) for i in range(3))


def test_look_alikes_share_a_cluster():
    gen = LatentGenerator(0, cluster_size=8)
    z = gen.identity(np.arange(64))
    sim = z @ z.T
    same = np.equal.outer(np.arange(64) // 8, np.arange(64) // 8) & ~np.eye(64, dtype=bool)
    other = ~np.equal.outer(np.arange(64) // 8, np.arange(64) // 8)
    assert sim[same].mean() > 0.5 > sim[other].mean() + 0.3


def test_latent_source_and_mlp_backbone_through_the_config():
    cfg = load_config(None, ["data.source=latent", "data.image_size=24", "data.synthetic_classes=30",
                             "data.synthetic_images_per_class=5", "data.synthetic_val_per_class=1",
                             "model.arch=mlp", "model.embedding_size=8"])
    train, val, classes = build_datasets(cfg)
    assert (len(train), len(val), classes) == (150, 30, 30)
    net = build_backbone(cfg.model, cfg.data.image_size)
    x = torch.stack([train[i][0] for i in range(4)])
    assert net(x).shape == (4, 8)
    with pytest.raises(ValueError, match="vectors"):
        net(torch.zeros(2, 3, 24, 24))
