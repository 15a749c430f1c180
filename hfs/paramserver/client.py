"""The ZeroMQ client: the WeightStore interface over the wire, shard-aware.

``address`` lists every shard (``tcp://h:p0,tcp://h:p1``), or names one shard of a group
started by ``hfs serve-params --shards N``, whose ``ping`` reply lists its peers. Each
matrix is split by rows in contiguous ranges (shard i owns ``[C*i//N, C*(i+1)//N)``,
:mod:`hfs.paramserver.sharding`), so the client routes rows itself and talks to all shards
in parallel: send every request, then collect every reply.

:class:`ParamClient` only splits requests by rows and merges the replies. The wire is
:mod:`hfs.paramserver.transport`'s: each calling thread has one connection per shard
(:mod:`hfs.paramserver.connection`), which owns its DEALER socket, its shared-memory segment
and its pending push. With ``shared_memory="auto"`` each connection whose server accepts it
(same host) gets its own segment (:mod:`hfs.paramserver.shm`): the arrays of
get/set/push/select requests and their replies travel through it and only headers through
ZeroMQ. A server that cannot map it (another host, or one started with ``shared_memory: off``)
gets frames.

With ``pipeline_pushes`` (the default) ``push_grads`` sends its pushes and returns without
waiting for their replies: each connection's pending push reply is collected by the next
request on that connection (in the same wait as that request's own reply), by
:meth:`ParamClient.flush`, or by ``close()``. A failed push raises ``ServerError`` from the call
that collects it.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

import numpy as np

from hfs.paramserver import protocol as proto
from hfs.paramserver.base import HParams, WeightStore
from hfs.paramserver.connection import ServerError
from hfs.paramserver.sharding import row_bounds
from hfs.paramserver.transport import Transport
from hfs.utils.errors import HfsError

__all__ = ["ParamClient", "ServerError", "parse_address"]

log = logging.getLogger(__name__)

SHARED_MEMORY_MODES = ("auto", "off")


def parse_address(address: str | Sequence[str]) -> list[str]:
    """``tcp://h:p[,tcp://h:p...]`` (or a list of them) -> endpoints; anything else is an error naming the piece."""
    pieces = address.split(",") if isinstance(address, str) else address
    endpoints = [a.strip() for a in pieces if a.strip()]
    if not endpoints:
        raise HfsError("paramserver.address is empty: give tcp://host:port of `hfs serve-params`")
    for ep in endpoints:
        if not ep.startswith("tcp://") or ":" not in ep[6:] or not ep.rsplit(":", 1)[1].isdigit():
            raise HfsError(f"paramserver.address entry {ep!r} is not of the form tcp://host:port")
    return endpoints


def _owned(array: np.ndarray) -> np.ndarray:
    """A reply array the caller may modify: received zmq frames are writable, so no copy is needed."""
    return array if array.flags.writeable else array.copy()


def _peer_for(peer: str, contacted: str) -> str:
    """A peer advertised with a wildcard host is reached at the host we contacted."""
    host = peer[6:].rsplit(":", 1)[0]
    if host in ("0.0.0.0", "*", "[::]"):
        return f"{contacted.rsplit(':', 1)[0]}:{peer.rsplit(':', 1)[1]}"
    return peer


class ParamClient(WeightStore):
    """Talks to one or more `hfs serve-params` shards; safe to use from several threads."""

    def __init__(self, address: str | Sequence[str], *, timeout_s: float = 60.0, connect_timeout_s: float = 10.0,
                 secret: bytes | None = None, shared_memory: str = "auto", pipeline_pushes: bool = True,
                 resume_hint: str = "") -> None:
        if shared_memory not in SHARED_MEMORY_MODES:
            raise HfsError(f"paramserver.shared_memory must be one of {', '.join(SHARED_MEMORY_MODES)}, "
                           f"got {shared_memory!r}")
        self.shared_memory = shared_memory
        self.pipeline_pushes = bool(pipeline_pushes)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.step_timeout_s = timeout_s
        self.resume_hint = resume_hint  # the command that continues the run, named when the server is lost
        self._served_snapshot_dir = ""
        self._worker: str | None = None
        self._shapes: dict[str, tuple[int, int]] = {}
        self._index_specs: dict[str, Any] = {}  # what attach_index sent: the metric and freshness of its answers
        self._wire = Transport(parse_address(address), timeout_s=timeout_s, secret=secret or None,
                               shared_memory=shared_memory != "off", recovery=self._recovery)
        try:
            self._discover()
        except BaseException:
            self.close()
            raise

    @property
    def endpoints(self) -> list[str]:
        return self._wire.endpoints

    @property
    def pipelines_pushes(self) -> bool:
        return self.pipeline_pushes

    def _call(self, requests: Sequence[tuple[int, dict, Sequence[Any]]], timeout_s: float | None = None,
              **kwargs) -> list[proto.Message]:
        return self._wire.call(requests, timeout_s, **kwargs)

    def _all(self, header: dict, timeout_s: float | None = None, arrays: Sequence[np.ndarray] = ()
             ) -> list[proto.Message]:
        """The same request to every shard."""
        return self._call([(i, header, arrays) for i in range(len(self.endpoints))], timeout_s)

    # -- connection -------------------------------------------------------------------
    def _discover(self) -> None:
        """Ping the shards (a group's peers when one shard was named) and check they are the ones asked for."""
        first = self._call([(0, {"op": "ping"}, [])], self.connect_timeout_s)[0].header
        if len(self.endpoints) == 1 and first.get("num_shards", 1) > 1:
            self._wire.reset(self._peers(first))
        headers = [first] if len(self.endpoints) == 1 else \
            [m.header for m in self._all({"op": "ping"}, self.connect_timeout_s)]
        for i, h in enumerate(headers):
            if (h.get("shard"), h.get("num_shards")) != (i, len(self.endpoints)):
                raise HfsError(f"{self.endpoints[i]} reports shard {h.get('shard')} of {h.get('num_shards')}, "
                               f"expected shard {i} of {len(self.endpoints)} (order paramserver.address by shard)")
        self.step_timeout_s = max(float(h.get("step_timeout_s", 0.0)) for h in headers)
        self._served_snapshot_dir = headers[0].get("snapshot_dir", "")
        self._remember_shapes(headers[0].get("matrices", {}))
        log.info("connected to parameter server %s", ",".join(self.endpoints))

    def _peers(self, ping: dict) -> list[str]:
        """Every shard of the group the one contacted shard belongs to (its ping lists them)."""
        peers = ping.get("peers") or []
        if len(peers) != ping["num_shards"]:
            raise HfsError(f"{self.endpoints[0]} is shard {ping.get('shard')} of {ping['num_shards']} but does "
                           "not list its peers: give every shard in paramserver.address")
        return [_peer_for(p, self.endpoints[0]) for p in peers]

    def _remember_shapes(self, matrices: dict) -> None:
        for name, info in matrices.items():
            self._shapes[name] = (int(info["rows"]), int(info["dim"]))

    def _recovery(self) -> str:
        """The commands that bring a lost server and the run back, with this run's real values."""
        serve = f"hfs serve-params --port {self.endpoints[0].rsplit(':', 1)[1]}"
        if len(self.endpoints) > 1:
            serve += f" --shards {len(self.endpoints)}"
        if self._served_snapshot_dir:
            serve += f" --snapshot-dir {self._served_snapshot_dir}"
        text = f"restart it with `{serve} --resume latest`"
        return text + (f", then continue with `{self.resume_hint}`" if self.resume_hint else "")

    # -- routing ------------------------------------------------------------------------
    def _split(self, name: str, rows: np.ndarray) -> list[tuple[int, np.ndarray | None]]:
        """(shard, positions in ``rows``) for every shard; positions None = all rows, one shard."""
        count = len(self.endpoints)
        if count == 1:
            return [(0, None)]
        bounds = row_bounds(self.shape(name)[0], count)
        shard_of = np.searchsorted(bounds[1:-1], rows, side="right")
        order = np.argsort(shard_of, kind="stable")
        cuts = np.cumsum(np.bincount(shard_of, minlength=count))[:-1]
        return list(enumerate(np.split(order, cuts)))

    @staticmethod
    def _rows(rows: Any) -> np.ndarray:
        arr = np.asarray(rows)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise HfsError(f"rows must be a 1-D integer array, got {arr.dtype}{list(arr.shape)}")
        return np.ascontiguousarray(arr, dtype=np.int64)

    # -- WeightStore ----------------------------------------------------------------------
    def register(self, worker: str) -> None:
        self._all({"op": "register", "worker": worker})
        self._worker = worker

    def leave(self, worker: str) -> None:
        self._all({"op": "leave", "worker": worker})
        if worker == self._worker:
            self._worker = None

    def create(self, name: str, num_rows: int, dim: int, *, init: str = "gaussian", std: float = 0.01,
               seed: int = 0, exist_ok: bool = False, update_rule: str | None = None) -> None:
        header = {"op": "create", "matrix": name, "rows": int(num_rows), "dim": int(dim), "init": init,
                  "std": float(std), "seed": int(seed), "exist_ok": bool(exist_ok)}
        if update_rule is not None:
            header["update_rule"] = update_rule
        self._all(header)
        self._shapes[name] = (int(num_rows), int(dim))

    def shape(self, name: str) -> tuple[int, int]:
        if name not in self._shapes:
            self._remember_shapes(self.ping()[0].get("matrices", {}))
        if name not in self._shapes:
            raise ServerError(f"parameter server {self.endpoints[0]}: no matrix named {name!r}")
        return self._shapes[name]

    def last_applied(self, name: str) -> int:
        """The newest step any shard applied (shards of one job apply the same steps)."""
        steps = [reply.get("matrices", {}).get(name, {}).get("last_applied") for reply in self.ping()]
        if any(step is None for step in steps):
            raise ServerError(f"parameter server {self.endpoints[0]}: no matrix named {name!r}")
        return max(int(step) for step in steps)

    def get_rows(self, name: str, rows: np.ndarray, step: int | None = None) -> np.ndarray:
        rows = self._rows(rows)
        header = {"op": "get", "matrix": name}
        if step is not None:
            header["step"] = int(step)
        timeout = None if step is None else max(self.timeout_s, self.step_timeout_s + 5.0)
        parts = self._split(name, rows)
        if parts[0][1] is None:
            return _owned(self._call([(0, header, [rows])], timeout)[0].arrays[0])
        asked = [(s, pos) for s, pos in parts if pos.size]
        replies = self._call([(s, header, [rows[pos]]) for s, pos in asked], timeout, copy_out=False) if asked else []
        out = np.empty((rows.size, self.shape(name)[1]), dtype=np.float32)
        for (_, pos), msg in zip(asked, replies):
            out[pos] = msg.arrays[0]
        return out

    def set_rows(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        rows = self._rows(rows)
        values = np.ascontiguousarray(values)
        parts = self._split(name, rows)
        if parts[0][1] is None:
            self._call([(0, {"op": "set", "matrix": name}, [rows, values])])
            return
        self._call([(s, {"op": "set", "matrix": name}, [rows[pos], values[pos]]) for s, pos in parts if pos.size])

    def push_grads(self, name: str, rows: np.ndarray, grads: np.ndarray, step: int, *,
                   worker: str | None = None) -> None:
        """Every shard gets a push (possibly empty) so each one can complete the step. With
        ``pipeline_pushes`` this returns once they are sent; see :meth:`flush`."""
        rows = self._rows(rows)
        grads = np.ascontiguousarray(grads)
        header = {"op": "push", "matrix": name, "step": int(step)}
        if worker or self._worker:
            header["worker"] = worker or self._worker
        parts = self._split(name, rows)
        defer = self.pipeline_pushes
        if parts[0][1] is None:
            self._call([(0, header, [rows, grads])], defer=defer)
            return
        self._call([(s, header, [rows[pos], grads[pos]]) for s, pos in parts], defer=defer)

    def flush(self) -> None:
        """Wait for the replies of this thread's pushes sent without waiting (``pipeline_pushes``);
        the first failed one raises ServerError naming its step."""
        self._wire.flush()

    def set_hparams(self, name: str, hparams: HParams) -> None:
        self._all({"op": "hparams", "matrix": name, "lr": float(hparams.lr), "momentum": float(hparams.momentum),
                   "weight_decay": float(hparams.weight_decay)})

    def iter_chunks(self, name: str, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        num_rows = self.shape(name)[0]
        bounds = row_bounds(num_rows, len(self.endpoints))
        for first in range(0, num_rows, max(1, int(chunk_rows))):
            stop = min(first + chunk_rows, num_rows)
            asks = []
            for shard in range(len(self.endpoints)):
                lo, hi = max(first, int(bounds[shard])), min(stop, int(bounds[shard + 1]))
                if lo < hi:
                    asks.append((shard, {"op": "get", "matrix": name, "start": lo, "stop": hi}, []))
            replies = self._call(asks)
            yield first, (_owned(replies[0].arrays[0]) if len(replies) == 1
                          else np.concatenate([m.arrays[0] for m in replies]))

    # -- the index, owned by the shards ------------------------------------------------
    def attach_index(self, name: str, spec: Any) -> bool:
        """Every shard keeps an index over its own rows (``spec``: an IndexSpec); True if any started a build."""
        replies = self._all({"op": "index", "matrix": name, "spec": spec.to_json()})
        self._index_specs[name] = spec
        return any(bool(m.header.get("attached")) for m in replies)

    def select(self, name: str, features: np.ndarray, labels: np.ndarray, step: int, rule: Any, k: int,
               *, with_rows: bool = True) -> tuple[Any, np.ndarray | None]:
        """One round trip to a single shard (selection and rows together); with several shards,
        every shard's candidates in parallel, merged by similarity, the rule applied here, then
        one parallel ``get`` of the active rows."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        labels = self._rows(labels)
        k = int(max(0, min(int(k), self.shape(name)[0])))
        header = {"op": "select", "matrix": name, "step": int(step), "k": k}
        timeout = max(self.timeout_s, self.step_timeout_s + 5.0)
        if len(self.endpoints) == 1 and with_rows:
            return self._select_with_rows(header, features, labels, rule, timeout)
        chosen = self._select_merged(header, features, labels, rule, timeout)
        return chosen, (self.get_rows(name, chosen.active, step) if with_rows else None)

    def _select_with_rows(self, header: dict, features: np.ndarray, labels: np.ndarray, rule: Any,
                          timeout: float) -> tuple[Any, np.ndarray]:
        """The one shard applies the rule and answers the selection with its rows."""
        from hfs.samplers.selection import Selection
        from hfs.samplers.shards import rule_to_fields

        reply = self._call([(0, dict(header, rows=True, rule=rule_to_fields(rule)), [features, labels])], timeout)[0]
        arrays = reply.arrays
        adjust = _owned(arrays[3]) if reply.header.get("logit_adjust") and len(arrays) > 3 else None
        return Selection(_owned(arrays[0]), _owned(arrays[1]), adjust), _owned(arrays[2])

    def _select_merged(self, header: dict, features: np.ndarray, labels: np.ndarray, rule: Any, timeout: float):
        """The rule's flow here (``find_candidates``, then the rule) over every shard's candidates for
        the queries that ask, merged by similarity (re-ranked under the shards' rows at this step when
        the rule compares and the index answers from old ones)."""
        from hfs.samplers.registry import SAMPLERS
        from hfs.samplers.selection import find_candidates, reranked
        from hfs.samplers.shards import merge_topk

        name, step, k = header["matrix"], header["step"], header["k"]
        num_rows = self.shape(name)[0]
        spec = self._index_specs.get(name)
        metric = spec.kwargs.get("metric", "cosine") if spec else "cosine"
        stale = spec is None or not SAMPLERS.get(spec.sampler).fresh_scores

        def search(asking: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Every shard's best rows for the asking queries, merged by similarity."""
            unlabelled = np.full(len(asking), -1, dtype=np.int64)
            replies = self._all(dict(header, rows=False), timeout, [asking, unlabelled])
            ids, sims = merge_topk([(m.arrays[0], m.arrays[1]) for m in replies], k)
            if ids.shape[1] and rule.compares_candidates and stale:
                ids, sims = reranked(ids, self._scorer(name, asking, metric, step)(ids))
            return ids, sims

        scorer = self._scorer(name, features, metric, step) if rule.needs_scorer else None
        ids, sims, measured = find_candidates(rule, labels, features, num_rows, int(step), search, scorer)
        return rule.select(labels, ids, sims, num_rows, int(step), scorer, measured)

    def _scorer(self, name: str, features: np.ndarray, metric: str, step: int):
        """The selection rule's scorer over the shards' rows as step ``step`` sees them (one ``get`` per call)."""
        from hfs.samplers.selection import rows_scorer

        return rows_scorer(features, metric, lambda ids: self.get_rows(name, ids, step))

    def index_stats(self, name: str) -> dict:
        """Every shard's index of ``name`` (``shards``), and over all shards: builds (summed),
        drift (mean), index_ready (all), bg_share (summed)."""
        shards = [stats["store"].get("indexes", {}).get(name, {}) for stats in self.server_stats()]
        if not any(shards):
            return {}
        return {"shards": shards, "builds": sum(int(s.get("builds", 0)) for s in shards),
                "rebuilds": sum(int(s.get("builds", 0)) for s in shards),
                "drift": float(np.mean([s.get("drift", 0.0) for s in shards])),
                "index_ready": all(s.get("index_ready", False) for s in shards),
                "bg_share": float(sum(s.get("bg_share", 0.0) for s in shards)),
                "bg_cpu_seconds": float(sum(s.get("bg_cpu_seconds", 0.0) for s in shards))}

    def snapshot(self, tag: str | None = None) -> str:
        header = {"op": "snapshot"}
        if tag:
            header["tag"] = tag
        names = [m.header["name"] for m in self._all(header, max(self.timeout_s, 600.0))]
        if len(set(names)) != 1:
            raise HfsError(f"shards wrote differently named snapshots ({', '.join(names)}): their steps differ")
        return names[0]

    def restore(self, tag: str = "latest") -> int:
        steps = [int(m.header["step"]) for m in self._all({"op": "restore", "tag": tag}, max(self.timeout_s, 600.0))]
        if len(set(steps)) != 1:
            raise HfsError(f"shards restored snapshots of different steps ({', '.join(map(str, steps))}); "
                           "restore a named snapshot every shard has")
        self._shapes.clear()
        self._remember_shapes(self.ping()[0].get("matrices", {}))
        return steps[0]

    def ping(self) -> list[dict]:
        """Every shard's ping reply (shard, peers, matrices, step timeout)."""
        return [m.header for m in self._all({"op": "ping"})]

    def server_stats(self) -> list[dict]:
        return [m.header["stats"] for m in self._all({"op": "stats"})]

    def stats(self) -> dict:
        wire = self._wire
        ops = {}
        for op, lat in wire.latency.items():
            ms = np.asarray(lat) * 1e3
            ops[op] = {"requests": wire.counts[op], "p50_ms": float(np.percentile(ms, 50)),
                       "p99_ms": float(np.percentile(ms, 99))}
        return {"client": {"endpoints": list(self.endpoints), "bytes_sent": wire.bytes["sent"],
                           "bytes_received": wire.bytes["received"], "ops": ops},
                "shards": self.server_stats()}

    def shutdown(self) -> None:
        """Ask every shard to take its final snapshot and stop."""
        self._all({"op": "shutdown"})
        self._wire.drop_segments()  # a stopping server unmaps them: nothing to detach at close

    def close(self) -> None:
        """Collect this thread's pending pushes (a failed one still raises, after the cleanup),
        ask each shard to unmap this thread's segments (best effort, briefly), release all."""
        if self._wire.closed:
            return
        try:
            self.flush()
        finally:
            try:
                self._wire.detach()
            finally:
                self._wire.close()
