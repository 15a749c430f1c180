"""Child process of a background index build: snapshot file in, saved index out.

Run as ``python -m hfs.samplers.build_worker SPEC_JSON SNAPSHOT.npy OUT`` by
``hfs.samplers.refresh.build_in_child``; it exists so that indexes whose build holds the
GIL (annoy's per-item loop) never slow the training thread.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def build_index_file(spec_json: str, snapshot_path: str, out_path: str) -> None:
    """Build the sampler described by ``spec_json`` over the snapshot and save it atomically."""
    import hfs.samplers  # noqa: F401  (registers the samplers)
    from hfs.samplers.base import array_chunks
    from hfs.samplers.registry import SAMPLERS

    spec = json.loads(spec_json)
    sampler = SAMPLERS.build(spec["name"], **spec["kwargs"])
    matrix = np.load(snapshot_path, mmap_mode="r")
    sampler.rebuild(array_chunks(matrix), *matrix.shape)
    tmp = Path(out_path).with_suffix(".partial")
    sampler.save(tmp)
    tmp.replace(out_path)


if __name__ == "__main__":
    build_index_file(*sys.argv[1:4])
