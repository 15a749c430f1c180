"""Starting `hfs serve-params`: its options from the config, one shard served here, or a group supervised.

``serve_options`` is the one place :class:`ServeOptions` come from the config; ``serve`` runs
one shard (:class:`~hfs.paramserver.server.ParamServer` over an
:class:`~hfs.paramserver.store.InProcessStore`) until a signal or a ``shutdown`` op, then takes
its final snapshot; ``serve_shards`` starts N shard processes
(:mod:`hfs.paramserver.shard_worker`, options serialised, the secret in the environment),
passes signals on and stops the others when one dies. A non-loopback bind without a shared
secret is refused before anything is bound.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from hfs.paramserver.server import ParamServer
from hfs.paramserver.sharding import ShardSpec
from hfs.paramserver.store import InProcessStore
from hfs.utils.errors import HfsError

if TYPE_CHECKING:
    from hfs.config import HfsConfig

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_allowed(host: str, secret: bytes | None, insecure: bool) -> None:
    """Refuse a non-loopback bind without a shared secret unless --insecure says so."""
    if is_loopback(host) or secret or insecure:
        return
    raise HfsError(f"refusing to listen on {host} without authentication: give --secret-file FILE "
                   "(or set HFS_PS_SECRET) so every message is HMAC-signed, or pass --insecure "
                   "to serve an unauthenticated network port on purpose")


@dataclass
class ServeOptions:
    """Everything `hfs serve-params` needs for one shard process."""

    host: str = "127.0.0.1"
    port: int = 5570
    shard: ShardSpec = ShardSpec()
    peers: tuple[str, ...] = ()
    snapshot_dir: Path | None = None
    keep_snapshots: int = 3
    timeout_s: float = 60.0
    snapshot_every_steps: int = 0
    snapshot_every_s: float = 0.0
    resume: str | None = None
    secret: bytes | None = field(default=None, repr=False)
    insecure: bool = False
    max_message_bytes: int = 1 << 30
    shared_memory: bool = True
    kernel: str = "auto"

    def to_json(self) -> str:
        """Everything but the secret, for a shard process's command line (:meth:`from_json`)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "secret"}
        data.update(shard=[self.shard.index, self.shard.count], peers=list(self.peers),
                    snapshot_dir=str(self.snapshot_dir) if self.snapshot_dir is not None else None)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str, secret: bytes | None) -> "ServeOptions":
        data = json.loads(text)
        data.update(shard=ShardSpec(*data["shard"]), peers=tuple(data["peers"]),
                    snapshot_dir=Path(data["snapshot_dir"]) if data["snapshot_dir"] is not None else None)
        return cls(**data, secret=secret)


def serve_options(cfg: "HfsConfig", *, host: str | None = None, port: int | None = None, resume: str | None = None,
                  secret_file: str | Path | None = None, insecure: bool = False, shard: ShardSpec = ShardSpec(),
                  peers: Sequence[str] = ()) -> ServeOptions:
    """The one place ``ServeOptions`` come from the config (``paramserver`` section; snapshots in
    ``snapshot_dir_for``); ``host``/``port`` stand in for ``paramserver.host``/``port``."""
    from hfs.paramserver import resolve_secret, snapshot_dir_for

    ps = cfg.paramserver
    return ServeOptions(
        host=host or ps.host, port=ps.port if port is None else port, shard=shard, peers=tuple(peers),
        snapshot_dir=snapshot_dir_for(ps, cfg.train.output_dir), keep_snapshots=ps.keep_snapshots,
        timeout_s=ps.timeout_s, snapshot_every_steps=ps.snapshot_every_steps, snapshot_every_s=ps.snapshot_every_s,
        resume=resume, secret=resolve_secret(ps.secret, secret_file), insecure=insecure,
        max_message_bytes=int(ps.max_message_mb * 2**20), shared_memory=ps.shared_memory != "off",
        kernel=ps.kernel)


def serve_params(cfg: "HfsConfig", *, resume: str | None = None, secret_file: str | Path | None = None,
                 insecure: bool = False, shard: ShardSpec = ShardSpec(), peers: Sequence[str] = ()) -> int:
    """`hfs serve-params`: with ``paramserver.shards`` > 1 start and watch that many shard
    processes, else serve here (``shard``/``peers``: one shard of a group started by hand,
    e.g. one per host). Returns the exit code."""
    opts = serve_options(cfg, resume=resume, secret_file=secret_file, insecure=insecure, shard=shard, peers=peers)
    count = cfg.paramserver.shards
    if count > 1 and shard.count == 1:
        return serve_shards(opts, count)
    serve(opts)
    return 0


def shard_snapshot_dir(base: Path | None, shard: ShardSpec) -> Path | None:
    """Each shard of a group keeps its snapshots in its own sub-folder."""
    if base is None or shard.count == 1:
        return base
    return Path(base) / f"shard-{shard.index}-of-{shard.count}"


def _url_host(host: str) -> str:
    """``host`` as a tcp:// endpoint writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def build_server(opts: ServeOptions) -> ParamServer:
    """Check the bind is allowed, open the store (resuming if asked), bind the socket."""
    check_bind_allowed(opts.host, opts.secret, opts.insecure)
    # index builds write to the system temp folder, never to a path a client names
    store = InProcessStore(shard_snapshot_dir(opts.snapshot_dir, opts.shard), keep_snapshots=opts.keep_snapshots,
                           timeout_s=opts.timeout_s, snapshot_every_steps=opts.snapshot_every_steps,
                           snapshot_every_s=opts.snapshot_every_s, shard=opts.shard, index_workdir="",
                           kernel=opts.kernel)
    if opts.resume:
        _resume(store, opts.resume)
    return ParamServer(store, f"tcp://{_url_host(opts.host)}:{opts.port}", secret=opts.secret,
                       max_message_bytes=opts.max_message_bytes, peers=opts.peers,
                       shared_memory=opts.shared_memory)


def _resume(store: InProcessStore, tag: str) -> None:
    from hfs.paramserver.snapshots import list_snapshots

    if tag in ("latest", "latest-or-new") and (store.snapshot_dir is None or not list_snapshots(store.snapshot_dir)):
        if tag == "latest":  # a mistyped folder must not silently start a fresh matrix
            raise HfsError(f"--resume latest: no snapshot in {store.snapshot_dir}; "
                           "use --resume latest-or-new to start empty when there is none")
        log.info("--resume latest-or-new: no snapshot in %s yet; starting empty", store.snapshot_dir)
        return
    tag = "latest" if tag == "latest-or-new" else tag
    step = store.restore(tag)
    log.info("resumed from snapshot %s at step %d", tag, step)


def serve(opts: ServeOptions) -> None:
    """Run one shard until SIGTERM/SIGINT or a `shutdown` op, then take a final snapshot."""
    from hfs.utils.memory import keep_freed_memory

    keep_freed_memory()  # this process is the shard: reuse request buffers instead of faulting in new pages
    server = build_server(opts)
    previous = {sig: signal.signal(sig, lambda *_: server.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()
        _final_snapshot(server.store)
        server.store.close()


def _final_snapshot(store: InProcessStore) -> None:
    if store.snapshot_dir is None or not store.matrices():
        return
    try:
        log.info("final snapshot %s written", store.snapshot())
    except HfsError as exc:
        log.error("final snapshot failed: %s", exc)


def _package_root() -> str:
    import hfs

    return str(Path(hfs.__file__).resolve().parent.parent)


def start_shard(opts: ServeOptions, index: int, count: int, peers: Sequence[str]) -> subprocess.Popen:
    """Shard ``index`` of ``count`` as a child process running :mod:`hfs.paramserver.shard_worker`
    with these options serialised (the secret in its environment, never its command line)."""
    from hfs.paramserver import SECRET_ENV

    shard_opts = replace(opts, port=opts.port + index, shard=ShardSpec(index, count), peers=tuple(peers))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_package_root(), os.environ.get("PYTHONPATH", "")]))
    if opts.secret:
        env[SECRET_ENV] = opts.secret.decode()
    verbose = str(int(logging.getLogger().isEnabledFor(logging.DEBUG)))
    return subprocess.Popen([sys.executable, "-m", "hfs.paramserver.shard_worker", shard_opts.to_json(), verbose],
                            env=env)


def serve_shards(opts: ServeOptions, count: int) -> int:
    """Start ``count`` shard processes on ports port..port+count-1 and wait for them.

    Each shard gets these options serialised (:func:`start_shard`); the secret travels in
    HFS_PS_SECRET. SIGTERM/SIGINT are passed on to every shard (each takes its final
    snapshot); if one shard dies, the others are stopped too. Returns the worst exit code.
    """
    check_bind_allowed(opts.host, opts.secret, opts.insecure)
    peers = [f"tcp://{_url_host(opts.host)}:{opts.port + i}" for i in range(count)]
    children = [start_shard(opts, i, count, peers) for i in range(count)]
    log.info("started %d shards: %s", count, ", ".join(peers))
    return supervise(children)


def supervise(children: Sequence[subprocess.Popen]) -> int:
    """Wait for every child: SIGTERM/SIGINT are passed on to all of them, and when one exits with
    an error the others are asked to stop (SIGTERM). Returns the worst exit code."""
    stopping = threading.Event()

    def stop_all(sig, _frame) -> None:
        stopping.set()
        _terminate(children)

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while any(child.poll() is None for child in children):
            failed = _failed(children)
            if failed is not None and not stopping.is_set():
                log.error("shard process %d exited with code %d; stopping the others", failed.pid, failed.returncode)
                stop_all(signal.SIGTERM, None)
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return max((abs(c.returncode or 0) for c in children), default=0)


def _failed(children: Sequence[subprocess.Popen]) -> subprocess.Popen | None:
    """The first child that exited with an error, if any."""
    return next((c for c in children if c.poll() not in (None, 0)), None)


def _terminate(children: Sequence[subprocess.Popen]) -> None:
    """SIGTERM to every child still running (each shard takes its final snapshot)."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
