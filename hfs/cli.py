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


@app.command("train")
def train_cmd(
    config: ConfigOpt = None,
    sampled: Annotated[bool, typer.Option("--sampled", help="HF-softmax: same as --set fc.mode=sampled.")] = False,
    sample_num: Annotated[Optional[int], typer.Option(
        "--sample-num", min=1, help="Active classes per step (sets fc.sample_num).")] = None,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", help="Continue from 'latest' (in train.output_dir), a run folder or a checkpoint file.")] = None,
    set_: SetOpt = [],
    print_config: PrintConfigOpt = False,
) -> None:
    """Train a backbone with the full softmax (baseline) or HF-softmax over active classes (--sampled)."""
    sugar = (["fc.mode=sampled"] if sampled else []) + ([f"fc.sample_num={sample_num}"] if sample_num else [])
    cfg = resolve_config(config, sugar + list(set_), print_config)
    from hfs.train.trainer import resume_config, summarize, train

    checkpoint = None
    if resume:
        checkpoint, cfg = resume_config(resume, config is not None, cfg, sugar + list(set_))
    result = train(cfg, resume=checkpoint)
    summarize(result)
    if result.interrupted:
        raise typer.Exit(130)


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
