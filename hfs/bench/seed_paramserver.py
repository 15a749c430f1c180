"""A benchmark-only reimplementation of the seed project's parameter server, for comparison.

The seed (HF-softmax, github.com/yl-1993/hfsoftmax, ``paramserver/paramserver.py`` and
``models/ext_layers/paramclient.py``) is Python 2 code that needs h5py and prints a line per
message; this module rewrites its *wire behaviour and server logic* from reading it, so
`hfs bench-paramserver` can time it beside `hfs serve-params` in the same run. It is not
product code and shares nothing with `hfs.paramserver`. What it keeps from the seed:

- a ROUTER front socket proxied (``zmq.proxy``, its own thread) to one worker thread over
  ``inproc``; the client is a DEALER;
- a request is a JSON header frame, then for every array a JSON ``{dtype, shape}`` frame and
  a raw data frame (rows int64, values float32);
- ``get_value_by_rows`` answers with two messages, the array's JSON meta and then its data;
- ``update_by_rows`` is fire-and-forget (no reply); the worker merges the gradients into a
  dict row by row in a Python loop (a copy of each row), and when every registered client has
  pushed, stacks the dict and applies SGD with momentum and weight decay to those rows only
  (the seed's only rule, today's ``lazy``), in float32;
- clients ``register`` first (fire-and-forget too).

Left out: the per-message ``print`` calls (they only make the seed slower), snapshots (h5py),
matrix init options. Run a server with ``python -m hfs.bench.seed_paramserver PORT``.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

import numpy as np


def _meta(arr: np.ndarray) -> bytes:
    return json.dumps({"dtype": str(arr.dtype), "shape": list(arr.shape)}).encode()


def _array(meta: bytes, data: Any) -> np.ndarray:
    spec = json.loads(meta)
    return np.frombuffer(data, dtype=spec["dtype"]).reshape(spec["shape"])


class SeedStyleWorker:
    """The seed's worker thread: one message at a time, no replies except to reads."""

    def __init__(self, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-4) -> None:
        self.optim = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        self.weights: dict[str, np.ndarray] = {}
        self.history: dict[str, np.ndarray] = {}
        self.grads: dict[str, dict] = {}
        self.pushed: dict[bytes, dict[str, int]] = {}

    def handle(self, sock, frames: list[bytes]) -> bool:
        """One message; False when asked to stop."""
        ident, msg = frames[0], json.loads(frames[1])
        arrays = [_array(frames[i], frames[i + 1]) for i in range(2, len(frames) - 1, 2)]
        op = msg["op"]
        if op == "stop":
            return False
        if op == "register":
            self.pushed[ident] = {}
        elif op == "add_matrix":
            mid, shape = msg["mid"], msg["shape"]
            self.weights[mid] = np.random.default_rng(0).uniform(-0.1, 0.1, shape).astype(np.float32)
            self.history[mid] = np.zeros(shape, np.float32)
            self._reset(mid)
        elif op == "update_params":
            self.optim.update({k: v for k, v in msg.items() if k != "op"})
        elif op == "get_value_by_rows":
            values = self.weights[msg["mid"]][arrays[0], :]
            sock.send_multipart([ident, _meta(values)])
            sock.send_multipart([ident, values])
        elif op == "update_by_rows":
            self._merge(ident, msg["mid"], arrays[0], arrays[1])
        else:
            raise KeyError(f"unknown op {op!r}")
        return True

    def _reset(self, mid: str) -> None:
        for seen in self.pushed.values():
            seen[mid] = 0
        self.grads[mid] = {}

    def _merge(self, ident: bytes, mid: str, rows: np.ndarray, data: np.ndarray) -> None:
        self.pushed[ident][mid] = 1
        grads = self.grads[mid]
        for i, row in enumerate(rows):  # the seed's per-row Python merge
            if row not in grads:
                grads[row] = np.array(data[i])
            else:
                grads[row] += np.array(data[i])
        if all(seen.get(mid) for seen in self.pushed.values()):
            self._sgd(mid, np.array(list(grads.keys())), np.array(list(grads.values())))
            self._reset(mid)

    def _sgd(self, mid: str, rows: np.ndarray, grad: np.ndarray) -> None:
        weight, history = self.weights[mid], self.history[mid]
        if self.optim["weight_decay"] > 0:
            grad += self.optim["weight_decay"] * weight[rows, :]
        if self.optim["momentum"] > 0:
            grad += history[rows, :] * self.optim["momentum"]
            history[rows, :] = grad
        weight[rows, :] -= self.optim["lr"] * grad


def serve(port: int, host: str = "127.0.0.1") -> None:
    """ROUTER on host:port, proxied to one worker thread, until a client sends ``stop``."""
    import zmq

    ctx = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    front.bind(f"tcp://{host}:{port}")
    back.bind("inproc://seed-backend")

    def proxy() -> None:
        try:
            zmq.proxy(front, back)
        except zmq.ContextTerminated:  # the worker stopped: close the proxy's sockets so term() returns
            front.close()
            back.close()

    proxy_thread = threading.Thread(target=proxy, daemon=True)
    proxy_thread.start()
    sock = ctx.socket(zmq.DEALER)
    sock.connect("inproc://seed-backend")
    worker = SeedStyleWorker()
    while worker.handle(sock, sock.recv_multipart()):
        pass
    sock.close()
    ctx.term()
    proxy_thread.join()


class SeedStyleClient:
    """The seed's client calls used in a training step (DEALER, JSON frames, no acks)."""

    def __init__(self, address: str, timeout_s: float = 60.0) -> None:
        import zmq

        self._zmq = zmq
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)
        self.timeout_ms = int(timeout_s * 1e3)
        self._send({"op": "register"})

    def _send(self, msg: dict, *arrays: np.ndarray) -> None:
        frames: list[Any] = [json.dumps(msg).encode()]
        for arr in arrays:
            frames += [_meta(arr), np.ascontiguousarray(arr)]
        self._sock.send_multipart(frames)

    def _recv(self) -> bytes:
        if not self._sock.poll(self.timeout_ms):
            raise TimeoutError("the seed-style server did not answer")
        return self._sock.recv()

    def add_matrix(self, mid: str, shape: tuple[int, int]) -> None:
        self._send({"op": "add_matrix", "mid": mid, "shape": list(shape)})

    def update_params(self, **optim: float) -> None:
        self._send({"op": "update_params", **optim})

    def get_value_by_rows(self, mid: str, rows: np.ndarray) -> np.ndarray:
        self._send({"op": "get_value_by_rows", "mid": mid}, rows)
        meta = self._recv()
        return _array(meta, self._recv())

    def update_by_rows(self, mid: str, rows: np.ndarray, data: np.ndarray) -> None:
        self._send({"op": "update_by_rows", "mid": mid}, rows, data)

    def stop_server(self) -> None:
        self._send({"op": "stop"})

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
