"""The `hfs` command line: one short function per subcommand, no logic.

Each command reads the config (``--config``, ``--set``), then calls a library function.
Heavy imports (torch, zmq, annoy, ...) happen inside the commands so `hfs --help` is instant.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from hfs.config import ConfigError, HfsConfig, load_config
from hfs.utils.errors import HfsError

app = typer.Typer(
    name="hfs",
    help="Massive classification (100K-10M classes) with dynamic class selection (HF-softmax).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

log = logging.getLogger("hfs")

# Options shared by every command that takes a config.
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (see configs/).")]
SetOpt = Annotated[List[str], typer.Option("--set", "-s", help="Override a key: section.key=value (repeatable).")]
PrintConfigOpt = Annotated[bool, typer.Option("--print-config", help="Print the resolved config and exit.")]


def resolve_config(config: Optional[Path], sets: List[str], print_config: bool) -> HfsConfig:
    """Load defaults + file + overrides; with --print-config, show the result and exit 0."""
    cfg = load_config(config, sets or [])
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        raise typer.Exit(0)
    return cfg


@app.callback()
def _root(verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output.")] = 0) -> None:
    """hfs: train classifiers over 100K-10M classes without paying for the whole softmax."""
    from hfs.utils.log import setup_logging

    setup_logging(verbose)


@app.command("show-config")
def show_config(config: ConfigOpt = None, set_: SetOpt = [], keys: Annotated[bool, typer.Option(
        "--keys", help="List every key with its type, default and meaning instead.")] = False) -> None:
    """Print the resolved config (defaults, then --config, then --set) as YAML."""
    from hfs.config import describe_keys

    if keys:
        for key, tp, default, text in describe_keys():
            typer.echo(f"{key:36s} {tp:10s} {default!r:14s} {text}")
        return
    typer.echo(resolve_config(config, set_, False).to_yaml(), nl=False)


@app.command("serve-params")
def serve_params(
    config: ConfigOpt = None,
    set_: SetOpt = [],
    print_config: PrintConfigOpt = False,
    host: Annotated[Optional[str], typer.Option(help="Address to listen on (default paramserver.host, 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port of shard 0; shard i listens on port + i (default paramserver.port).")] = None,
    shards: Annotated[Optional[int], typer.Option(help="Start N shard processes, each owning a contiguous row range.")] = None,
    snapshot_dir: Annotated[Optional[Path], typer.Option(help="Snapshot folder (default paramserver.snapshot_dir, else <train.output_dir>/store).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Restore this snapshot at start: 'latest' or a snapshot name.")] = None,
    secret_file: Annotated[Optional[Path], typer.Option(help="File holding the shared secret that HMAC-signs every message.")] = None,
    insecure: Annotated[bool, typer.Option(help="Allow a non-loopback --host without a secret (anyone who can connect can write).")] = False,
    shard_index: Annotated[int, typer.Option(hidden=True, help="This process's shard (set by --shards).")] = 0,
    num_shards: Annotated[int, typer.Option(hidden=True, help="Shards in the group (set by --shards).")] = 1,
    peers: Annotated[str, typer.Option(hidden=True, help="Comma-separated endpoints of all shards (set by --shards).")] = "",
) -> None:
    """Serve the classifier matrices over ZeroMQ (sparse SGD, synchronous steps, snapshots)."""
    from hfs.paramserver import resolve_secret
    from hfs.paramserver.server import ServeOptions, serve, serve_shards
    from hfs.paramserver.store import ShardSpec

    cfg = resolve_config(config, set_, print_config)
    ps = cfg.paramserver
    opts = ServeOptions(
        host=host or ps.host, port=port or ps.port, shard=ShardSpec(shard_index, num_shards),
        peers=tuple(p for p in peers.split(",") if p),
        snapshot_dir=snapshot_dir or Path(ps.snapshot_dir or Path(cfg.train.output_dir) / "store"),
        keep_snapshots=ps.keep_snapshots, timeout_s=ps.timeout_s, snapshot_every_steps=ps.snapshot_every_steps,
        snapshot_every_s=ps.snapshot_every_s, resume=resume, secret=resolve_secret(ps.secret, secret_file),
        insecure=insecure, max_message_bytes=int(ps.max_message_mb * 2**20))
    count = shards or ps.shards
    if count > 1 and num_shards == 1:
        raise typer.Exit(serve_shards(opts, count, config, set_))
    serve(opts)


@app.command("bench-paramserver")
def bench_paramserver(
    rows: Annotated[int, typer.Option(help="Rows per get/push (the sampled step's active classes).")] = 1000,
    dim: Annotated[int, typer.Option(help="Columns (embedding size).")] = 256,
    num_classes: Annotated[int, typer.Option(help="Rows of the benchmark matrix.")] = 100_000,
    seconds: Annotated[float, typer.Option(help="Seconds per round-trip measurement.")] = 3.0,
    workers: Annotated[int, typer.Option(help="Workers of the synchronous-step measurement.")] = 4,
    sync_steps: Annotated[int, typer.Option(help="Synchronous steps per measurement.")] = 100,
    memory_rows: Annotated[int, typer.Option(help="Rows of the memory check (10000000 needs ~5 GB free).")] = 2_000_000,
    memory_dim: Annotated[int, typer.Option(help="Columns of the memory check.")] = 128,
    out: Annotated[Optional[Path], typer.Option(help="Also write the results as JSON here.")] = None,
) -> None:
    """Measure the store in process vs over loopback, sync-step cost with N workers, and memory."""
    import json

    from hfs.bench.paramserver import BenchConfig, render, run_benchmark
    from hfs.utils.atomic import atomic_write_text
    from hfs.utils.log import make_console, progress

    cfg = BenchConfig(rows=rows, dim=dim, num_classes=num_classes, seconds=seconds, workers=workers,
                      sync_steps=sync_steps, memory_rows=memory_rows, memory_dim=memory_dim)
    with progress(transient=True) as bar:
        results = run_benchmark(cfg, bar)
    render(results, make_console())
    if out:
        atomic_write_text(out, json.dumps(results, indent=1))


def main() -> None:
    """Console entry: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except (ConfigError, HfsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
