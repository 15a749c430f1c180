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

from hfs.config import ConfigError, HfsConfig, check_flag, load_config
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
SetOpt = Annotated[List[str], typer.Option("--set", "-s", help=(
    "Override a key: section.key=value (repeatable; applied after --config and after the command's "
    "own flags, so an explicit --set wins)."))]
PrintConfigOpt = Annotated[bool, typer.Option("--print-config", help="Print the resolved config and exit.")]


def overrides(flags: dict[str, object]) -> list[str]:
    """``--set`` items for the flags that were given (None: not given); strings are quoted, so a
    value YAML would read as another type (``yes``, ``2024``) stays the string it was."""
    import json

    return [f"{key}={json.dumps(value) if isinstance(value, (str, list)) else value}"
            for key, value in flags.items() if value is not None]


def key_rule(key: str):
    """A Typer callback checking a flag by the rule of the config key it sets (one rule for both)."""

    def callback(param: typer.CallbackParam, value: Optional[float]):
        if value is not None:
            check_flag(param.opts[0], key, value)
        return value

    return callback


def renamed(value, old_value, flag: str, old_flag: str, default=None):
    """The value of a flag given by its spelling or by its old one (a hidden alias kept so
    existing scripts still run); ``default`` when neither, a usage error when required."""
    if value is not None and old_value is not None:
        raise HfsError(f"{flag} given twice (also as {old_flag})")
    value = old_value if value is None else value
    if value is None and default is None:
        raise HfsError(f"missing option '{flag}'")
    return default if value is None else value


def command_overrides(flags: dict[str, object], sets: List[str]) -> list[str]:
    """Every command's order: its flags first, then --set, so an explicit --set wins."""
    return overrides(flags) + list(sets or [])


def resolve_config(config: Optional[Path], sets: List[str], print_config: bool,
                   flags: Optional[dict[str, object]] = None) -> HfsConfig:
    """Load defaults + file + the flags' overrides + --set; with --print-config, show the result and exit 0."""
    cfg = load_config(config, command_overrides(flags or {}, sets))
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        raise typer.Exit(0)
    return cfg


def training_run(config: Optional[Path], flags: dict[str, object], sets: List[str], resume: Optional[str],
                 print_config: bool, *, world_size: Optional[int]):
    """`hfs train` and `hfs train-dist` resolve their run the same way (``resolve_run``); with
    --print-config the config is shown, before any --resume, and the command exits."""
    sets = command_overrides(flags, sets)
    if print_config:
        resolve_config(config, sets, print_config)
    from hfs.train.run_dir import resolve_run

    return resolve_run(config, sets, resume, world_size=world_size)


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More log output (debug level).")] = False
          ) -> None:
    """hfs: train classifiers over 100K-10M classes without paying for the whole softmax."""
    from hfs.utils.log import setup_logging

    setup_logging(int(verbose))


@app.command("show-config")
def show_config(config: ConfigOpt = None, set_: SetOpt = [], keys: Annotated[bool, typer.Option(
        "--keys", help="List every key with its type, default and meaning instead.")] = False,
        format_: Annotated[str, typer.Option(
            "--format", help="With --keys: text (one line a key) or markdown (the page "
                             "docs/configuration-reference.md, with allowed values).")] = "text") -> None:
    """Print the resolved config (defaults, then --config, then --set) as YAML.

    Example: hfs show-config --config configs/quickstart_cpu.yaml --set train.max_steps=50
    """
    from hfs.config import describe_keys

    if format_ not in ("text", "markdown"):
        raise HfsError(f"--format {format_!r}: choose text or markdown")
    if format_ == "markdown" and not keys:
        raise HfsError("--format markdown goes with --keys (the resolved config itself prints as YAML)")
    if keys and format_ == "markdown":
        from hfs.default_config import render_config_reference

        typer.echo(render_config_reference(), nl=False)
        return
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
        "--sample-num", callback=key_rule("fc.sample_num"), help="Active classes per step (sets fc.sample_num).")] = None,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", help="Continue from 'latest' (in train.output_dir), a run folder or a checkpoint file.")] = None,
    set_: SetOpt = [],
    print_config: PrintConfigOpt = False,
) -> None:
    """Train a backbone with the full softmax (baseline) or HF-softmax over active classes (--sampled).

    Example: hfs train --config configs/quickstart_cpu.yaml --sampled --set train.output_dir=runs/qs
    """
    flags = {"fc.mode": "sampled" if sampled else None, "fc.sample_num": sample_num}
    run = training_run(config, flags, set_, resume, print_config, world_size=1)
    from hfs.eval.hooks import verification_hooks
    from hfs.train.trainer import summarize, train

    if run.complete:
        return
    result = train(run.cfg, resume=run.checkpoint, hooks=verification_hooks(run.cfg))
    summarize(result)
    if result.interrupted:
        raise typer.Exit(130)


@app.command("train-dist")
def train_dist_cmd(
    config: ConfigOpt = None,
    nproc: Annotated[Optional[int], typer.Option(
        "--nproc", callback=key_rule("dist.nproc"), help="Workers on this node (dist.nproc; default: visible GPUs, 1 on CPU).")] = None,
    backend: Annotated[Optional[str], typer.Option(
        "--backend", help="nccl (GPUs) or gloo (CPU) (dist.backend).")] = None,
    nnodes: Annotated[Optional[int], typer.Option("--nnodes", callback=key_rule("dist.nnodes"), help="Number of nodes (dist.nnodes).")] = None,
    node_rank: Annotated[Optional[int], typer.Option(
        "--node-rank", callback=key_rule("dist.node_rank"), help="This node's rank; node 0 hosts the rendezvous (dist.node_rank).")] = None,
    master_addr: Annotated[Optional[str], typer.Option(
        "--master-addr", help="Node 0's address, reachable from every node (dist.master_addr).")] = None,
    master_port: Annotated[Optional[int], typer.Option(
        "--master-port", callback=key_rule("dist.master_port"), help="Rendezvous port; 0 = a free one, single node only (dist.master_port).")] = None,
    sampled: Annotated[bool, typer.Option("--sampled", help="HF-softmax on a shared parameter server: fc.mode=sampled.")] = False,
    sharded: Annotated[bool, typer.Option("--sharded", help="Model-parallel classifier across ranks: fc.mode=sharded.")] = False,
    sample_num: Annotated[Optional[int], typer.Option(
        "--sample-num", callback=key_rule("fc.sample_num"), help="Active classes per step (sets fc.sample_num).")] = None,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", help="Continue from 'latest' (in train.output_dir), a run folder or a checkpoint file; "
                         "any world size.")] = None,
    set_: SetOpt = [],
    print_config: PrintConfigOpt = False,
) -> None:
    """Train on several devices/nodes: one worker per device via torch's elastic launcher (DDP).

    Example: hfs train-dist --nproc 2 --backend gloo --config configs/quickstart_cpu.yaml --sharded
    """
    if sampled and sharded:
        raise HfsError("--sampled and --sharded are two different classifier modes; pick one")
    flags = {"dist.nproc": nproc, "dist.backend": backend, "dist.nnodes": nnodes, "dist.node_rank": node_rank,
             "dist.master_addr": master_addr, "dist.master_port": master_port, "fc.sample_num": sample_num,
             "fc.mode": "sampled" if sampled else "sharded" if sharded else None}
    run = training_run(config, flags, set_, resume, print_config, world_size=None)
    from hfs.eval.hooks import verification_hooks
    from hfs.train.launch import run_train_dist
    from hfs.train.trainer import summarize

    if run.complete:
        return
    result = run_train_dist(run.cfg, resume=str(run.checkpoint) if run.checkpoint else None,
                            verbose=int(logging.getLogger().isEnabledFor(logging.DEBUG)), hooks=verification_hooks)
    if result is not None:  # nodes other than 0 leave the report to rank 0
        summarize(result)


CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", help=(
    "Checkpoint file, run folder (its latest checkpoint), 'latest' (in train.output_dir) or an .onnx from `hfs export`."))]
FlipOpt = Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Add the embedding of the mirrored image (default: eval.flip).")]
BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", callback=key_rule("eval.batch_size"), help="Images per batch (default: eval.batch_size).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--num-workers", callback=key_rule("eval.num_workers"), help="Image-decoding workers (default: eval.num_workers).")]


def eval_flags(flip: Optional[bool], batch_size: Optional[int], num_workers: Optional[int]) -> dict[str, object]:
    """The config keys the embedding flags of extract / verify / eval-ijb set."""
    return {"eval.flip": flip, "eval.batch_size": batch_size, "eval.num_workers": num_workers}


@app.command("extract")
def extract(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help=(
        "Checkpoint file, run folder (its latest checkpoint), 'latest' (in train.output_dir) or an .onnx from `hfs export`."))],
    out: Annotated[Path, typer.Option("--out", help="Features file (.npy, float32 N x D); a .json is written beside it.")],
    bin_: Annotated[Optional[Path], typer.Option("--bin", help="Verification .bin: embed its images in order.")] = None,
    list_: Annotated[Optional[Path], typer.Option("--list", help="Image list ('relative/path label' per line, as `hfs convert` writes) to embed instead.")] = None,
    prefix: Annotated[Optional[Path], typer.Option("--prefix", help="Folder the --list paths are relative to (default: the list's folder).")] = None,
    flip: FlipOpt = None, batch_size: BatchSizeOpt = None, device: DeviceOpt = "auto", num_workers: WorkersOpt = None,
    config: ConfigOpt = None, set_: SetOpt = [], print_config: PrintConfigOpt = False,
) -> None:
    """Embed a .bin or an image list with a trained backbone; write features.npy + features.json.

    Example: hfs extract --checkpoint runs/qs --bin data/synth/val.bin --out runs/qs/feats.npy
    """
    cfg = resolve_config(config, set_, print_config, eval_flags(flip, batch_size, num_workers))
    from hfs.eval.evaluate import extract_checkpoint
    from hfs.utils.writable import require_writable_file

    require_writable_file(out, "--out")

    e = cfg.eval
    extract_checkpoint(checkpoint, out, bin_path=bin_, list_path=list_, prefix=prefix, flip=e.flip,
                       batch_size=e.batch_size, device=device, num_workers=e.num_workers,
                       output_dir=cfg.train.output_dir)


@app.command("verify")
def verify(
    bins: Annotated[List[Path], typer.Option("--bin", help="Verification .bin file (repeatable; default: eval.bins).")] = [],
    features: Annotated[List[Path], typer.Option("--features", help="Features .npy from `hfs extract`, one per --bin, same order.")] = [],
    checkpoint: CheckpointOpt = None,
    folds: Annotated[Optional[int], typer.Option("--folds", callback=key_rule("eval.folds"), help="Cross-validation folds (default: eval.folds).")] = None,
    flip: FlipOpt = None, batch_size: BatchSizeOpt = None, device: DeviceOpt = "auto", num_workers: WorkersOpt = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Draw the ROC curves to this PNG (needs matplotlib: pip install matplotlib).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write all metrics to this JSON file.")] = None,
    config: ConfigOpt = None, set_: SetOpt = [], print_config: PrintConfigOpt = False,
) -> None:
    """Verification accuracy (10-fold), VAL@FAR, AUC and EER on InsightFace .bin pair sets.

    Example: hfs verify --bin data/synth/val.bin --features runs/qs/feats.npy --json runs/qs/verify.json
    """
    from hfs.utils.writable import require_writable_file

    for path, flag in ((json_out, "--json"), (plot, "--plot")):
        if path is not None:
            require_writable_file(path, flag)
    flags = {"eval.bins": [str(b) for b in bins] or None, "eval.folds": folds, "eval.batch_size": batch_size,
             "eval.num_workers": num_workers, "eval.flip": flip}
    cfg = resolve_config(config, set_, print_config, flags)
    from hfs.eval.evaluate import run_verify

    run_verify(cfg, features=features, checkpoint=checkpoint, flip=None if flip is None else cfg.eval.flip,
               device=device, plot=plot, json_out=json_out)


@app.command("export")
def export_cmd(
    checkpoint: Annotated[str, typer.Option("--checkpoint", help=(
        "Checkpoint file, run folder (its latest checkpoint) or 'latest' (in train.output_dir)."))],
    onnx: Annotated[Optional[Path], typer.Option("--onnx", help=(
        "Write the backbone as ONNX here (.onnx): opset 18, input 'input' float32 (batch, 3, S, S) in [-1, 1], "
        "output 'embedding' float32 (batch, D), dynamic batch. Needs pip install onnx onnxruntime onnxscript."))] = None,
    torchscript: Annotated[Optional[Path], typer.Option("--torchscript", help=(
        "Also (or instead) write the traced backbone as TorchScript here (.pt), for libtorch."))] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help=(
        "float16 weights and arithmetic; the input and output stay float32."))] = False,
    config: ConfigOpt = None, set_: SetOpt = [], print_config: PrintConfigOpt = False,
) -> None:
    """Export a trained backbone (not the classifier) to ONNX and/or TorchScript, checked against torch.

    Example: hfs export --checkpoint runs/qs --onnx runs/qs/backbone.onnx
    """
    cfg = resolve_config(config, set_, print_config)
    from hfs.eval.export import export_checkpoint, render_export
    from hfs.utils.log import make_console
    from hfs.utils.writable import require_writable_file

    for path, flag in ((onnx, "--onnx"), (torchscript, "--torchscript")):
        if path is not None:
            require_writable_file(path, flag)

    result = export_checkpoint(checkpoint, onnx=onnx, torchscript=torchscript, fp16=fp16,
                               output_dir=cfg.train.output_dir)
    render_export(result, make_console())


@app.command("eval-ijb")
def eval_ijb(
    root: Annotated[Path, typer.Option("--root", help="The IJB release folder of one set (holds meta/ and loose_crop/).")],
    target: Annotated[str, typer.Option("--target", help="IJBC or IJBB (names the meta files: ijbc_*.txt, ijbb_*.txt).")] = "IJBC",
    checkpoint: CheckpointOpt = None,
    features: Annotated[Optional[Path], typer.Option("--features", help="Precomputed (faces x D) .npy, one row per line of <set>_face_tid_mid.txt, instead of --checkpoint.")] = None,
    score_weight: Annotated[bool, typer.Option("--score-weight", help="Weight each face by its detection score (last column of <set>_name_5pts_score.txt).")] = False,
    keep_norm: Annotated[bool, typer.Option("--keep-norm", help="Pool embeddings as they are instead of L2-normalised (InsightFace's default: the norm acts as a quality weight).")] = False,
    save_features: Annotated[Optional[Path], typer.Option("--save-features", help="With --checkpoint: also write the faces' embeddings here (.npy + .json), for later --features runs.")] = None,
    pair_chunk: Annotated[int, typer.Option("--pair-chunk", min=1, help="Pair-file lines read and scored at a time (bounds memory).")] = 200_000,
    far_rule: Annotated[Optional[str], typer.Option("--far-rule", callback=key_rule("eval.ijb_far_rule"), help="How TAR is read at each FAR: nearest (the ROC point nearest the target, as published IJB tables) or at-most (the best TAR with FAR <= target); both go into --json (default: eval.ijb_far_rule, nearest).")] = None,
    flip: FlipOpt = None, batch_size: BatchSizeOpt = None, device: DeviceOpt = "auto", num_workers: WorkersOpt = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Draw the ROC curve to this PNG (needs matplotlib: pip install matplotlib).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write every number to this JSON file.")] = None,
    config: ConfigOpt = None, set_: SetOpt = [], print_config: PrintConfigOpt = False,
) -> None:
    """IJB-B / IJB-C 1:1 template verification: TAR at FAR 1e-6 .. 1e-1 (read as published tables
    read it, or --far-rule at-most), AUC, EER.

    Example: hfs eval-ijb --root IJB_release/IJBC --target IJBC --checkpoint runs/x --json ijbc.json
    """
    cfg = resolve_config(config, set_, print_config,
                         {**eval_flags(flip, batch_size, num_workers), "eval.ijb_far_rule": far_rule})
    from hfs.eval.ijb import IjbSettings, evaluate_ijb, results_table, write_result_json
    from hfs.eval.report import plot_roc, require_matplotlib
    from hfs.utils.log import make_console
    from hfs.utils.writable import require_writable_file

    for path, flag in ((json_out, "--json"), (plot, "--plot"), (save_features, "--save-features")):
        if path is not None:
            require_writable_file(path, flag)

    if plot:
        require_matplotlib()  # fail before the work, not after
    if features is not None and flip is not None:
        log.warning("--flip has no effect with --features: flipping happens when the features are made")
    result = evaluate_ijb(IjbSettings(
        root=root, target=target, checkpoint=checkpoint, features=features,
        flip=cfg.eval.flip, score_weight=score_weight, keep_norm=keep_norm,
        batch_size=cfg.eval.batch_size, device=device, num_workers=cfg.eval.num_workers, pair_chunk=pair_chunk,
        save_features=save_features, far_rule=cfg.eval.ijb_far_rule))
    make_console().print(results_table(result))
    if json_out:
        write_result_json(json_out, result)
    if plot:
        plot_roc(plot, {result.target: result})


@app.command("serve-params")
def serve_params(
    config: ConfigOpt = None,
    set_: SetOpt = [],
    print_config: PrintConfigOpt = False,
    host: Annotated[Optional[str], typer.Option(help="Address to listen on (default paramserver.host, 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(callback=key_rule("paramserver.port"), help="Port of shard 0; shard i listens on port + i (default paramserver.port).")] = None,
    shards: Annotated[Optional[int], typer.Option(callback=key_rule("paramserver.shards"), help="Start N shard processes, each owning a contiguous row range.")] = None,
    snapshot_dir: Annotated[Optional[Path], typer.Option(help="Snapshot folder (default paramserver.snapshot_dir, else <train.output_dir>/store).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Restore this snapshot at start: 'latest' (an error when there is none), 'latest-or-new' or a snapshot name.")] = None,
    secret_file: Annotated[Optional[Path], typer.Option(help="File holding the shared secret that HMAC-signs every message.")] = None,
    insecure: Annotated[bool, typer.Option(help="Allow a non-loopback --host without a secret (anyone who can connect can write).")] = False,
    shard_index: Annotated[int, typer.Option(hidden=True, help="This process's shard (set by --shards).")] = 0,
    num_shards: Annotated[int, typer.Option(hidden=True, help="Shards in the group (set by --shards).")] = 1,
    peers: Annotated[str, typer.Option(hidden=True, help="Comma-separated endpoints of all shards (set by --shards).")] = "",
) -> None:
    """Serve the classifier matrices over ZeroMQ (sparse SGD, synchronous steps, snapshots).

    Example: hfs serve-params --port 5570 --snapshot-dir runs/ps --resume latest-or-new
    """
    flags = {"paramserver.host": host or None, "paramserver.port": port, "paramserver.shards": shards or None,
             "paramserver.snapshot_dir": str(snapshot_dir) if snapshot_dir else None}
    cfg = resolve_config(config, set_, print_config, flags)
    from hfs.paramserver.launch import serve_params as run_serve_params
    from hfs.paramserver.sharding import ShardSpec
    from hfs.utils.writable import require_writable_dir

    ps = cfg.paramserver
    require_writable_dir(ps.snapshot_dir or Path(cfg.train.output_dir) / "store", "--snapshot-dir" if snapshot_dir else
                         "config key 'paramserver.snapshot_dir'" if ps.snapshot_dir else "config key 'train.output_dir'")
    if ps.port + ps.shards - 1 > 65535:
        raise HfsError(f"--port {ps.port} + --shards {ps.shards}: shard {ps.shards - 1} would listen on port "
                       f"{ps.port + ps.shards - 1}, above 65535")
    raise typer.Exit(run_serve_params(cfg, resume=resume, secret_file=secret_file, insecure=insecure,
                                      shard=ShardSpec(shard_index, num_shards), peers=[p for p in peers.split(",") if p]))


@app.command("convert")
def convert(
    in_folder: Annotated[Path, typer.Option("--in-folder", help=(
        "Folder with train.rec/train.idx/property (--to images), or with train_list.txt/val_list.txt "
        "or class folders of images (--to rec)."))],
    out_folder: Annotated[Path, typer.Option("--out-folder", help="Where the converted dataset goes.")],
    to: Annotated[str, typer.Option("--to", help="images: unpack a .rec; rec: pack images into a .rec.")] = "images",
    val_ratio: Annotated[float, typer.Option("--val-ratio", callback=key_rule("data.rec_val_ratio"), help=(
        "Share of each identity's images listed in val_list.txt (--to images)."))] = 0.05,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the validation split (--to images).")] = 0,
    workers: Annotated[Optional[int], typer.Option("--num-workers", "-j", min=1, help="Parallel worker processes (reader threads for --to rec; default 4).")] = None,
    workers_old: Annotated[Optional[int], typer.Option("--workers", min=1, hidden=True)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip images already written by an interrupted run (--to images).")] = False,
    rec_name: Annotated[str, typer.Option("--rec-name", help="Base name of the .rec/.idx files.")] = "train",
) -> None:
    """Convert InsightFace train.rec <-> images + lists, losslessly (stored bytes, never re-encoded).

    Example: hfs convert --in-folder data/synth --out-folder data/synth_images
    """
    from hfs.data.convert import images_to_rec, rec_to_images
    from hfs.utils.log import make_console
    from hfs.utils.writable import require_writable_dir

    workers = renamed(workers, workers_old, "--num-workers", "--workers", default=4)
    require_writable_dir(out_folder, "--out-folder")

    if to == "images":
        summary = rec_to_images(in_folder, out_folder, val_ratio, seed, workers, resume, rec_name)
    elif to == "rec":
        summary = images_to_rec(in_folder, out_folder, workers, rec_name)
    else:
        raise HfsError(f"--to must be 'images' or 'rec', got {to!r}")
    make_console().print(f"converted {summary.describe()}", soft_wrap=True)


@app.command("make-synthetic")
def make_synthetic(
    out: Annotated[Path, typer.Option("--out", help="Folder for train.rec, train.idx and property.")],
    classes: Annotated[Optional[int], typer.Option("--num-classes", min=1, help="Number of identities (labels 0..N-1). (required)")] = None,
    classes_old: Annotated[Optional[int], typer.Option("--classes", min=1, hidden=True)] = None,
    images_per_class: Annotated[int, typer.Option("--images-per-class", min=1, help="Images per identity.")] = 20,
    image_size: Annotated[int, typer.Option("--image-size", min=8, help="Square image size in pixels.")] = 112,
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed gives the same images.")] = 0,
    first_class: Annotated[int, typer.Option("--first-class", min=0, help=(
        "Generator identity of label 0 (offset to make disjoint sets)."))] = 0,
    image_format: Annotated[str, typer.Option("--format", help="Stored encoding: jpeg or png.")] = "jpeg",
    cluster_size: Annotated[int, typer.Option("--cluster-size", min=1, help=(
        "Consecutive identities that look alike (hard negatives)."))] = 8,
    val_pairs: Annotated[int, typer.Option("--val-pairs", min=0, help=(
        "Also write DIR/val.bin with this many verification pairs of held-out identities (0: none)."))] = 0,
    val_first_class: Annotated[Optional[int], typer.Option("--val-first-class", min=0, help=(
        "First held-out identity of val.bin (default: right after the training identities)."))] = None,
    val_classes: Annotated[Optional[int], typer.Option("--val-classes", min=2, help=(
        "Held-out identities in val.bin (default: --num-classes)."))] = None,
    duplicates: Annotated[float, typer.Option("--duplicates", min=0.0, max=0.5, help=(
        "Share of the labels that are a second label of another label's identity (uncleaned data)."))] = 0.0,
    label_noise: Annotated[float, typer.Option("--label-noise", min=0.0, max=0.99, help=(
        "Share of the images that carry a wrong label, drawn uniformly from the other labels."))] = 0.0,
    min_views: Annotated[int, typer.Option("--min-views", min=0, help=(
        "Long tail: images per identity log-uniform in [min-views, --images-per-class] (0: all alike)."))] = 0,
) -> None:
    """Write a synthetic face-like dataset as an InsightFace-layout .rec (no downloads needed).

    --duplicates, --label-noise and --min-views make the data as messy as uncleaned face sets,
    where mining hard negatives is known to hurt.

    Example: hfs make-synthetic --out data/synth --num-classes 1000 --images-per-class 20 --val-pairs 3000
    """
    from hfs.data.plan import Regime
    from hfs.data.synthetic import held_out_identities, make_synthetic_bin, make_synthetic_rec

    classes = renamed(classes, classes_old, "--num-classes", "--classes")
    from hfs.utils.log import make_console
    from hfs.utils.writable import require_writable_dir

    require_writable_dir(out, "--out")

    val_first, val_count = held_out_identities(classes, first_class, val_first_class, val_classes)
    if val_pairs and val_first < first_class + classes and first_class < val_first + val_count:
        raise HfsError(f"--val-first-class {val_first}: held-out identities [{val_first}, {val_first + val_count}) "
                       f"overlap the training identities [{first_class}, {first_class + classes})")
    regime = Regime(duplicates, label_noise, min_views)
    regime.check(images_per_class, lambda field: "--" + field.replace("_", "-"))
    stats = make_synthetic_rec(out, classes, images_per_class, image_size, seed, first_class, image_format,
                               cluster_size, regime)
    console = make_console()
    console.print(f"wrote {stats['images']} images of {stats['identities']} identities "
                  f"({stats['bytes'] / 1e6:.1f} MB) to {out} in {stats['seconds']:.1f} s", soft_wrap=True)
    if not val_pairs and (out / "val.bin").exists():  # an earlier run's pairs do not fit these identities
        (out / "val.bin").unlink()
        console.print(f"removed {out / 'val.bin'} of an earlier run (not written without --val-pairs)", soft_wrap=True)
    if val_pairs:
        make_synthetic_bin(out / "val.bin", val_pairs, val_first, val_count, image_size, seed, image_format,
                            cluster_size)
        console.print(f"wrote {out / 'val.bin'}: {val_pairs} pairs of identities {val_first}..{val_first + val_count - 1}",
                      soft_wrap=True)


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
    out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON here.")] = None,
    out_old: Annotated[Optional[Path], typer.Option("--out", hidden=True)] = None,
    update_rule: Annotated[str, typer.Option("--update-rule", callback=key_rule("paramserver.update_rule"), help=(
        "Update rule of the benchmark matrix (paramserver.update_rule); the in-process rate of catchup and "
        "lazy is measured in every run either way."))] = "catchup",
    rounds: Annotated[int, typer.Option(min=0, help=(
        "Interleaved rounds of in-process / shared memory / shared memory with waiting pushes, "
        "--round-seconds each, the served / in-process ratio taken within each round (robust to a "
        "machine whose speed drifts); 0 skips them."))] = 5,
    round_seconds: Annotated[float, typer.Option(min=0.01, help="Seconds per path in each interleaved round.")] = 1.0,
    kernel: Annotated[str, typer.Option("--kernel", callback=key_rule("paramserver.kernel"), help=(
        "Row kernel of the stores and the server (paramserver.kernel); the interleaved rounds also time "
        "the numpy kernel in process."))] = "auto",
    scaling_rows: Annotated[List[int], typer.Option("--scaling-rows", min=1, help=(
        "Rows a call of the in-process rows/s measurement (repeatable; default 1000, 10000, 100000), "
        "--seconds each, against the memory bandwidth of one np.copyto timed in the same run."))] = [],
    bandwidth_mib: Annotated[int, typer.Option(min=1, help="MiB copied by the memory-bandwidth measurement.")] = 512,
) -> None:
    """Measure the store in process vs over loopback, sync-step cost with N workers, and memory.

    Example: hfs bench-paramserver --num-classes 100000 --rows 1000 --json runs/bench-ps.json
    """
    import json

    from hfs.bench.paramserver import BenchConfig, render, run_benchmark
    from hfs.utils.atomic import atomic_write_text
    from hfs.utils.log import make_console, progress
    from hfs.utils.writable import require_writable_file

    out = renamed(out, out_old, "--json", "--out", default=False) or None
    if out:
        require_writable_file(out, "--json")
    cfg = BenchConfig(rows=rows, dim=dim, num_classes=num_classes, seconds=seconds, workers=workers,
                      sync_steps=sync_steps, memory_rows=memory_rows, memory_dim=memory_dim, update_rule=update_rule,
                      rounds=rounds, round_seconds=round_seconds, kernel=kernel,
                      scaling_rows=tuple(scaling_rows) or BenchConfig.scaling_rows, bandwidth_mib=bandwidth_mib)
    with progress(transient=True) as bar:
        results = run_benchmark(cfg, bar)
    render(results, make_console())
    if out:
        atomic_write_text(out, json.dumps(results, indent=1))


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
    query_sweep: Annotated[List[str], typer.Option("--query-sweep", help=(
        "KEY=V1,V2,...: also measure each built index with these values of a query-time sampler "
        "setting, without rebuilding (annoy_search_k, hnsw_ef, query_threads, exact_chunk; repeatable)."))] = [],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON to this file.")] = None,
    config: ConfigOpt = None, set_: SetOpt = [], print_config: PrintConfigOpt = False,
) -> None:
    """Measure the class samplers: build time, query time, recall@k, softmax-mass coverage, memory, upkeep.

    Speed/quality trade-offs are cheapest to explore with --query-sweep: e.g.
    `--samplers hnsw --query-sweep hnsw_ef=16,24,48` builds one index and times it at four efs.

    Example: hfs bench-sampler --num-classes 100000 --samplers annoy,hnsw,random --json runs/bench-sampler.json
    """
    import json

    from hfs.bench.sampler import SamplerBenchSettings, parse_query_sweep, render_report, run_sampler_bench
    from hfs.utils.atomic import atomic_write_text
    from hfs.utils.log import make_console

    cfg = resolve_config(config, set_, print_config)
    if json_out is not None:
        from hfs.utils.writable import require_writable_file

        require_writable_file(json_out, "--json")
    settings = SamplerBenchSettings(
        num_classes=num_classes, dim=dim, batch_size=batch_size, sample_num=sample_num,
        samplers=[s.strip() for s in samplers.split(",") if s.strip()], weights=weights, scale=scale,
        batches=batches, cluster_size=cluster_size, spread=spread, noise=noise, seed=seed,
        upkeep_steps=upkeep_steps, upkeep_samplers=[s.strip() for s in upkeep_samplers.split(",") if s.strip()],
        upkeep_baseline=upkeep_baseline, lr=lr, query_sweep=parse_query_sweep(query_sweep))
    console = make_console()
    report = run_sampler_bench(cfg, settings, console=make_console(stderr=True))
    render_report(report, console)
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(report, indent=2, default=str) + "\n")

@app.command("bench-fc")
def bench_fc_cmd(
    config: ConfigOpt = None,
    classes: Annotated[Optional[int], typer.Option("--num-classes", min=2, help="Number of classes C (default 1000000).")] = None,
    classes_old: Annotated[Optional[int], typer.Option("--classes", min=2, hidden=True)] = None,
    dim: Annotated[int, typer.Option("--dim", callback=key_rule("model.embedding_size"), help="Feature dimension D (sets model.embedding_size).")] = 256,
    batch: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Batch size B (default 256).")] = None,
    batch_old: Annotated[Optional[int], typer.Option("--batch", min=1, hidden=True)] = None,
    sample_num: Annotated[int, typer.Option("--sample-num", min=1, help="Active classes S of the sampled step.")] = 1000,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Measured sampled steps.")] = 20,
    full_steps: Annotated[int, typer.Option("--full-steps", min=1, help="Measured full-softmax steps.")] = 3,
    skip_full: Annotated[bool, typer.Option("--skip-full", help="Only the sampled step (no C x D dense matrix).")] = False,
    threads: Annotated[int, typer.Option("--threads", min=0, help=(
        "torch intra-op threads for both steps (0 = torch's default; 1 avoids spin-waiting on a busy box)."))] = 0,
    amortise: Annotated[int, typer.Option("--amortise-steps", min=0, help=(
        "Steps the index build is spread over (0 = sampler.interval, the shortest rebuild spacing)."))] = 0,
    memory_at: Annotated[List[int], typer.Option("--memory-at", min=2, help=(
        "Also measure a sampled-mode trainer's peak RSS at this C, the matrix in a separate "
        "`hfs serve-params` process (repeatable)."))] = [],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON here.")] = None,
    set_: SetOpt = [],
    print_config: PrintConfigOpt = False,
) -> None:
    """Time the classifier-layer step: HF-softmax (sampler + store + head) vs the full softmax.

    Example: hfs bench-fc --num-classes 100000 --batch-size 256 --sample-num 1000 --json runs/bench-fc.json
    """
    classes = renamed(classes, classes_old, "--num-classes", "--classes", default=1_000_000)
    batch = renamed(batch, batch_old, "--batch-size", "--batch", default=256)
    cfg = resolve_config(config, set_, print_config, {"model.embedding_size": dim})
    import json

    import torch

    from hfs.bench.fc import bench_fc, render, render_memory, trainer_memory
    from hfs.utils.atomic import atomic_write_text
    from hfs.utils.writable import require_writable_file

    if json_out is not None:
        require_writable_file(json_out, "--json")
    if threads:
        torch.set_num_threads(threads)

    from hfs.utils.log import progress

    with progress(transient=True) as bar:
        result = bench_fc(cfg, classes, batch, sample_num, steps=steps, full_steps=full_steps, skip_full=skip_full,
                          amortise_steps=amortise, bar=bar)
    render(result)
    if memory_at:
        result["trainer_memory"] = trainer_memory(cfg, memory_at, batch, sample_num)
        render_memory(result["trainer_memory"], cfg.sampler.type)
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(result, indent=2, default=str) + "\n")


@app.command("bench-loader")
def bench_loader_cmd(
    data: Annotated[Optional[Path], typer.Option("--data", help=(
        "Folder with train.rec/.idx to read (default: generate --images 112x112 JPEG faces in a temp folder).")
    )] = None,
    images: Annotated[int, typer.Option("--images", min=1, help="Generated images (without --data).")] = 4096,
    image_size: Annotated[int, typer.Option("--image-size", min=8, help="Square image size (generated and loaded).")] = 112,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")] = 128,
    batches: Annotated[int, typer.Option("--batches", min=1, help="Measured batches per setting, after the first.")] = 20,
    workers: Annotated[List[int], typer.Option("--num-workers", min=0, help="DataLoader workers to measure (repeatable; default 0, 1, 2).")] = [],
    workers_old: Annotated[List[int], typer.Option("--workers", min=0, hidden=True)] = [],
    decoders: Annotated[str, typer.Option("--decoders", help="Comma-separated decoders (pil, simplejpeg); missing ones are skipped.")] = "pil,simplejpeg",
    decode_images: Annotated[int, typer.Option("--decode-images", min=1, help="Images of the bare decode loop.")] = 2000,
    threads: Annotated[int, typer.Option("--threads", min=0, help=(
        "torch intra-op threads of this process, which runs the 0-worker loader (0 = torch's default, what "
        "`hfs train` uses; workers always use 1)."))] = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON to this file.")] = None,
) -> None:
    """Measure the training loader's images/s (decode + augment + collate) per decoder and worker count, next to a bare decode loop.

    Example: hfs bench-loader --num-workers 0 --num-workers 2 --json runs/bench-loader.json
    """
    import json

    from hfs.utils.writable import require_writable_file

    workers = renamed(workers or None, workers_old or None, "--num-workers", "--workers", default=[0, 1, 2])
    if json_out is not None:
        require_writable_file(json_out, "--json")

    from hfs.bench.loader import LoaderBenchSettings, render, run_loader_bench
    from hfs.utils.atomic import atomic_write_text
    from hfs.utils.log import make_console

    if threads:
        import torch

        torch.set_num_threads(threads)
    settings = LoaderBenchSettings(data=data, images=images, image_size=image_size, batch_size=batch_size,
                                   batches=batches, workers=list(workers),
                                   decoders=[d.strip() for d in decoders.split(",") if d.strip()],
                                   decode_images=decode_images)
    status = make_console(stderr=True)
    report = run_loader_bench(settings, on_progress=lambda text: status.print(f"[dim]{text}[/dim]"))
    render(report, make_console())
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(report, indent=2) + "\n")


def one_line(exc: BaseException) -> str:
    """The user-facing line of an error; errors re-raised from DataLoader workers carry the
    worker's whole traceback, whose last line is the original message."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    return text


def usage_line(exc: Exception) -> str:
    """Typer's usage error (a five-line box) as one line that names the command's --help."""
    text = " ".join(str(exc.format_message()).split())  # type: ignore[attr-defined]
    if not text:
        return ""
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None and ctx.command_path else "hfs"
    return f"{text[0].lower()}{text[1:]} (see `{command} --help`)"


def main() -> None:
    """Console entry: user errors (bad config, bad input, unwritable paths) and usage errors
    become one line on stderr and exit code 2."""
    from typer.exceptions import TyperException

    try:
        code = app(prog_name="hfs", standalone_mode=False)
    except (ConfigError, HfsError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl-C: the trainer already said what was kept
        sys.exit(130)
    except TyperException as exc:
        line = usage_line(exc)
        if line:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
