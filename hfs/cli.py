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


@app.command("bench-sampler")
def bench_sampler(
    num_classes: Annotated[int, typer.Option(help="Classes C (ignored with --weights).", min=2)] = 1_000_000,
    dim: Annotated[int, typer.Option(help="Feature dimension D (ignored with --weights).", min=1)] = 256,
    batch_size: Annotated[int, typer.Option(help="Queries per batch B.", min=1)] = 256,
    sample_num: Annotated[int, typer.Option(help="Active classes per batch S.", min=1)] = 1000,
    samplers: Annotated[str, typer.Option(help="Comma-separated samplers to compare.")] = "annoy,hnsw,exact,random",
    weights: Annotated[Optional[Path], typer.Option(help="A (C, D) float .npy of class vectors; default: generated structured weights.")] = None,
    scale: Annotated[float, typer.Option(help="Logit scale s of the exact softmax that coverage is measured against (cosine metric).", min=0.0)] = 64.0,
    batches: Annotated[int, typer.Option(help="Query batches timed and scored per sampler.", min=1)] = 5,
    cluster_size: Annotated[int, typer.Option(help="Generated weights: identities per cluster of similar classes.", min=1)] = 32,
    spread: Annotated[float, typer.Option(help="Generated weights: spread of classes around their cluster centre (in-cluster cosine ~ 1/(1+spread^2)).", min=0.0)] = 1.0,
    noise: Annotated[float, typer.Option(help="Generated queries: distance of a feature from its class vector.", min=0.0)] = 0.7,
    seed: Annotated[int, typer.Option(help="Seed of the generated weights and queries.")] = 0,
    upkeep_steps: Annotated[int, typer.Option(help="Also simulate this many sampled training steps per --upkeep-samplers and report index upkeep (0 = skip).", min=0)] = 0,
    upkeep_samplers: Annotated[str, typer.Option(help="Comma-separated samplers for the upkeep simulation.")] = "annoy,hnsw",
    upkeep_baseline: Annotated[bool, typer.Option(help="Upkeep simulation: also run the same loop with a never-refreshed index, for the measured added wall time.")] = True,
    lr: Annotated[float, typer.Option(help="Upkeep simulation: SGD learning rate on the active rows.", min=0.0)] = 0.1,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON to this file.")] = None,
    config: ConfigOpt = None, set_: SetOpt = [], print_config: PrintConfigOpt = False,
) -> None:
    """Measure the class samplers: build time, query time, recall@k, softmax-mass coverage, memory, upkeep."""
    import json

    from hfs.bench.sampler import SamplerBenchSettings, render_report, run_sampler_bench
    from hfs.utils.atomic import atomic_write_text
    from hfs.utils.log import make_console

    cfg = resolve_config(config, set_, print_config)
    settings = SamplerBenchSettings(
        num_classes=num_classes, dim=dim, batch_size=batch_size, sample_num=sample_num,
        samplers=[s.strip() for s in samplers.split(",") if s.strip()], weights=weights, scale=scale,
        batches=batches, cluster_size=cluster_size, spread=spread, noise=noise, seed=seed,
        upkeep_steps=upkeep_steps, upkeep_samplers=[s.strip() for s in upkeep_samplers.split(",") if s.strip()],
        upkeep_baseline=upkeep_baseline, lr=lr)
    console = make_console()
    report = run_sampler_bench(cfg, settings, console=make_console(stderr=True))
    render_report(report, console)
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(report, indent=2, default=str) + "\n")


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
