"""Child process of a background index build: rows in, saved index out.

Run as ``python -m hfs.samplers.build_worker SPEC_JSON SOURCE_JSON OUT`` by
``hfs.samplers.refresh.build_in_child``; it exists so that indexes whose build holds the
GIL (annoy's per-item loop) never slow the thread that holds the rows (a store's, a
server's loop). ``SOURCE_JSON`` is ``{"shape": [C, D], "snapshot": PATH}``: a float32 .npy
the holder wrote chunk by chunk.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def build_index_file(spec_json: str, source_json: str, out_path: str) -> None:
    """Build the sampler described by ``spec_json`` over the source's rows and save it atomically."""
    import hfs.samplers  # noqa: F401  (registers the samplers)
    from hfs.samplers.refresh import read_npy_chunks
    from hfs.samplers.registry import SAMPLERS

    spec, source = json.loads(spec_json), json.loads(source_json)
    sampler = SAMPLERS.build(spec["name"], **spec["kwargs"])
    num_rows, dim = source["shape"]
    chunks = read_npy_chunks(source["snapshot"])
    sampler.rebuild(chunks, num_rows, dim)
    tmp = Path(out_path).with_suffix(".partial")
    sampler.save(tmp)
    tmp.replace(out_path)


if __name__ == "__main__":
    build_index_file(*sys.argv[1:4])
