"""The store's momentum stays lazy: sparse updates map only the pages of the rows they touch."""

from __future__ import annotations

import numpy as np

from hfs.paramserver.matrix import lazy_zeros
from hfs.utils.process import rss_mb


def test_lazy_zeros_is_a_writable_zeroed_float32_array():
    a = lazy_zeros((1000, 16))
    assert a.shape == (1000, 16) and a.dtype == np.float32 and not a.any()
    a[3] = 1.5
    assert a[3].sum() == 24.0 and a.sum() == 24.0


def test_writing_random_rows_maps_only_their_pages():
    # 256 MiB of momentum; 200 random rows written. With 2 MiB huge pages this mapped
    # (nearly) all of it; with 4 KiB pages it maps about 200 pages.
    rows, dim = 524_288, 128
    a = lazy_zeros((rows, dim))
    before = rss_mb()
    picked = np.random.default_rng(0).choice(rows, 200, replace=False)
    a[picked] = 1.0
    assert rss_mb() - before < 32
    assert a[picked].all() and a.sum() == 200 * dim
