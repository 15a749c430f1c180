"""The seed-style server (benchmark-only reimplementation): its wire behaviour and its maths."""

import threading

import numpy as np

from hfs.bench.seed_paramserver import SeedStyleClient, serve
from hfs.utils.process import free_port


def test_fire_and_forget_pushes_apply_lazy_sgd_with_summed_duplicates():
    port = free_port()
    server = threading.Thread(target=serve, args=(port,), daemon=True)
    server.start()
    client = SeedStyleClient(f"tcp://127.0.0.1:{port}", timeout_s=20)
    try:
        lr, mu, wd = 0.1, 0.9, 0.01
        client.add_matrix("fc", (6, 3))
        client.update_params(lr=lr, momentum=mu, weight_decay=wd)
        w = client.get_value_by_rows("fc", np.arange(6, dtype=np.int64)).copy()
        buf = np.zeros_like(w)
        rows = np.array([4, 1, 4], dtype=np.int64)  # row 4 twice: its gradients add up
        grads = np.arange(9, dtype=np.float32).reshape(3, 3) / 10
        for _ in range(2):
            client.update_by_rows("fc", rows, grads)  # no reply: the next read waits behind it
            g = np.zeros_like(w)
            np.add.at(g, rows, grads)
            touched = np.unique(rows)
            g = g[touched] + wd * w[touched]
            buf[touched] = mu * buf[touched] + g
            w[touched] -= lr * buf[touched]
        got = client.get_value_by_rows("fc", np.arange(6, dtype=np.int64))
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7)  # untouched rows (lazy rule) did not move
    finally:
        client.stop_server()
        server.join(20)
        client.close()
    assert not server.is_alive()
