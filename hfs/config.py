"""The one YAML configuration schema shared by every ``hfs`` command.

Each section is a typed dataclass. Validation lives in the annotations and the field
metadata (``choices``, ``ge``/``gt``/``le``), applied by :mod:`hfs.utils.typed` (the check the
wire's fields get too), so adding a key is one line. Loading merges, in order: the
dataclass defaults, a YAML file, then ``--set section.key=value`` overrides. Unknown keys
and bad values raise :class:`ConfigError` with a message naming the key. Derived values
are properties, never written back into the config.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from hfs.utils.typed import check_rules, checked, field_specs, hint_name, rules


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names the key."""


def _f(default: Any, *, help: str = "", choices: Iterable[Any] | None = None,
       ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field with its validation rules and help text in metadata."""
    meta = rules(choices=choices, ge=ge, gt=gt, le=le, help=help)
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    source: str = _f("synthetic", choices=("synthetic", "list", "rec", "latent"),
                     help="where training images come from; latent = synthetic identities as vectors of "
                          "image_size numbers (embedding-level regime, use model.arch=mlp)")
    root: str = _f("", help="folder of `hfs convert` output (source=list) or of train.rec/.idx (source=rec)")
    train_list: str = _f("train_list.txt", help="training list inside root (source=list)")
    val_list: str = _f("val_list.txt", help="validation list inside root (source=list); empty: none")
    image_size: int = _f(112, gt=0, help="square input size in pixels (data.source=latent: input vector length)")
    hflip: bool = _f(True, help="random horizontal flip during training")
    num_workers: int = _f(2, ge=0, help="DataLoader worker processes")
    synthetic_classes: int = _f(1000, gt=0, help="identities of the synthetic source")
    synthetic_images_per_class: int = _f(20, gt=0, help="images per synthetic identity")
    synthetic_val_per_class: int = _f(2, ge=0, help="held-out images per synthetic identity")
    synthetic_seed: int = _f(0, help="seed of the synthetic identities")
    synthetic_cluster_size: int = _f(8, gt=0, help="consecutive synthetic identities that look alike (hard negatives)")
    synthetic_duplicates: float = _f(0.0, ge=0.0, le=0.5, help="share of the synthetic/latent labels that are a second "
                                                              "label of another label's identity (uncleaned data)")
    synthetic_label_noise: float = _f(0.0, ge=0.0, le=0.99, help="share of the synthetic/latent training samples "
                                                               "labelled with another label, drawn uniformly")
    synthetic_min_views: int = _f(0, ge=0, help="long tail: training images per synthetic/latent identity log-uniform "
                                                "in [min_views, synthetic_images_per_class] (0: all alike)")
    rec_name: str = _f("train", help="source=rec: read <root>/<rec_name>.rec and .idx")
    rec_val_ratio: float = _f(0.0, ge=0.0, le=0.9, help="source=rec: share of each identity's images held out "
                                                       "for validation (the rule `hfs convert` uses)")
    split_seed: int = _f(0, help="source=rec: seed of the validation split (as `hfs convert --seed`)")
    decoder: str = _f("auto", choices=("pil", "simplejpeg", "auto"),
                      help="JPEG decoder of the list/rec sources: pil, simplejpeg (the jpeg extra; other "
                           "formats still go through PIL) or auto (simplejpeg when installed)")


@dataclass
class ModelConfig:
    arch: str = _f("iresnet50", help="backbone name from the registry (`hfs.models`)")
    embedding_size: int = _f(512, gt=0, help="feature dimension D")
    dropout: float = _f(0.0, ge=0.0, le=1.0, help="dropout before the embedding layer")


@dataclass
class HeadConfig:
    type: str = _f("arcface", choices=("softmax", "cosface", "arcface"), help="margin head")
    scale: float = _f(64.0, gt=0.0, help="logit scale s (cosface/arcface)")
    margin: float = _f(0.5, ge=0.0, help="margin m (cosface: cosine margin, arcface: angular margin)")


@dataclass
class FCConfig:
    mode: str = _f("full", choices=("full", "sampled", "sharded"),
                   help="full: whole matrix as a parameter; sampled: HF-softmax over active classes; "
                        "sharded: model-parallel shards across ranks (train-dist)")
    num_classes: int = _f(0, ge=0, help="number of classes C; 0 = take it from the data")
    sample_num: int = _f(1000, gt=0, help="active classes per step (sampled/sharded modes)")
    init: str = _f("gaussian", choices=("gaussian", "uniform", "zeros"), help="initialisation of the classifier rows")
    init_std: float = _f(0.01, ge=0.0, help="std (gaussian) or half-width (uniform) of the initialisation")
    lr_scale: float = _f(1.0, gt=0.0, help="classifier lr = backbone lr x lr_scale")
    overlap_push: bool = _f(True, help="sampled: push row gradients on a background thread, overlapping the backbone's backward "
                                       "(not needed with paramserver.pipeline_pushes, whose pushes do not wait)")
    sharded_momentum: str = _f("catchup", choices=("catchup", "dense", "lazy"),
                               help="sharded, SGD: what the rows a step does not touch do. catchup = what dense SGD "
                                    "does (decay + momentum every step), applied in closed form when a row is next read, "
                                    "the weight store's rule; dense = torch's SGD on the whole shard every step (Partial "
                                    "FC v2; the same numbers, O(shard) per step); lazy = nothing (the store's old rule). "
                                    "Under AdamW catchup means dense")


@dataclass
class SamplerConfig:
    type: str = _f("exact", choices=("annoy", "hnsw", "ivf", "exact", "random"),
                   help="how hard negatives are found: exact (current rows, B x C x D per step), annoy/hnsw/ivf "
                        "(approximate, rebuilt in the background, re-scored under the current rows), random "
                        "(Partial FC's rule)")
    metric: str = _f("auto", choices=("auto", "cosine", "dot"),
                     help="similarity; auto = cosine for margin heads, dot for softmax")
    k: int = _f(0, ge=0, help="nearest classes asked per query; 0 = auto (2 x ceil(sample_num / batch) + 1)")
    refresh: str = _f("adaptive", choices=("interval", "adaptive"),
                      help="interval: rebuild every `interval` steps; adaptive: when the weights moved "
                           "`drift_threshold` since the last build (at most every `interval` steps)")
    interval: int = _f(100, gt=0, help="steps between rebuilds (interval); shortest spacing between rebuilds (adaptive)")
    max_interval: int = _f(10000, ge=0, help="adaptive: rebuild after this many steps even without measured drift (0 = never)")
    drift_threshold: float = _f(0.05, gt=0.0,
                                help="adaptive: mean relative row change (over all classes) vs the indexed copy that triggers a rebuild")
    background: bool = _f(True, help="build indexes in the background while training queries the old one "
                                     "(false: rebuild in the training thread, stalling it)")
    snapshot_rows: int = _f(32768, gt=0, help="rows per step the store (in process, or each shard of hfs serve-params) appends to a rebuild's snapshot file of its own rows")
    update_threshold: float = _f(0.1, gt=0.0, help="hnsw: relative change of a row that earns an in-place update")
    update_budget: int = _f(-1, ge=-1, help="hnsw/ivf: most rows updated in place per step (0 = none, -1 = the "
                                              "sampler's own: hnsw 16, ivf 128)")
    hard_after: int = _f(0, ge=0, help="steps of uniform negatives (Partial FC's rule) before the index's hard negatives are used; the index is built meanwhile")
    hard_fraction: float = _f(1.0, ge=0.0, le=1.0, help="share of the free slots (sample_num minus the batch's labels) the index's candidates may take; the rest are uniform negatives")
    candidate_pick: str = _f("topk", choices=("topk", "score"),
                             help="topk: the nearest candidates, round-robin over the batch; score: drawn without "
                                  "replacement with probability ~ exp(similarity / temperature)")
    temperature: float = _f(0.05, gt=0.0, help="candidate_pick=score: similarity temperature (1 / head.scale mirrors the softmax itself)")
    logq: bool = _f(False, help="sampled-softmax correction: add -log(probability a class is active) to each active negative's logit (training loss only)")
    ceiling: str = _f("positive", choices=("off", "positive"),
                      help="positive: skip a query's candidates that score above its own class (+ ceiling_margin) "
                           "under the current rows: semi-hard negatives (no collapse while nothing is learnt yet, "
                           "no duplicate identity or mislabelled sample's true class as a negative); off: the "
                           "nearest classes whatever they score")
    ceiling_margin: float = _f(0.0, help="ceiling=positive: similarity a candidate may exceed its query's own class by")
    ready_probe: int = _f(0, ge=0, help="a query asks the index for hard negatives only once its own class scores "
                                         "above every one of this many uniformly drawn classes (0 = every query asks)")
    drift_rows: int = _f(128, ge=0, help="observed rows per step whose drift is measured against the index's own vectors, a random subset (0 = all; reading a vector back costs ~10-25 us)")
    build_threads: int = _f(1, help="threads of an index build (annoy n_jobs, hnsw add_items); -1 = all cores")
    query_threads: int = _f(-1, help="annoy and hnsw: threads answering one batch's queries; -1 = all cores")
    annoy_trees: int = _f(16, gt=0, help="annoy: number of trees in the hashing forest (more: better negatives, slower queries and builds)")
    annoy_search_k: int = _f(-1, help="annoy: nodes inspected per query (-1 = trees x k)")
    hnsw_m: int = _f(16, gt=0, help="hnsw: graph degree M")
    hnsw_ef_construction: int = _f(100, gt=0, help="hnsw: ef at build time")
    hnsw_ef: int = _f(16, gt=0, help="hnsw: ef at query time (raised to k when smaller; more: better negatives, slower queries)")
    ivf_nlist: int = _f(0, ge=0, help="ivf: k-means lists of the inverted file (0 = about sqrt(C))")
    ivf_nprobe: int = _f(8, gt=0, help="ivf: lists scanned per query (more: better negatives, slower queries)")
    exact_chunk: int = _f(65536, gt=0, help="exact: rows per matmul chunk")
    exact_device: str = _f("auto", help="exact: torch device of the matrix copy (auto = cuda when available)")
    workdir: str = _f("", help="folder for rebuild snapshot files (C x D x 4 bytes) and annoy index files of the in-process store and the sharded classifier; empty = system temp (hfs serve-params always uses its system temp)")
    seed: int = _f(0, help="seed of the uniform fill and of the index builds")


@dataclass
class ParamServerConfig:
    address: str = _f("", help="tcp://host:port[,tcp://host:port...] of `hfs serve-params` shards; empty = in-process store")
    timeout_s: float = _f(60.0, gt=0.0, help="client request timeout and synchronous-step timeout")
    connect_timeout_s: float = _f(10.0, gt=0.0, help="how long the client waits for a server to answer its first ping")
    snapshot_dir: str = _f("", help="server snapshots folder; empty = <train.output_dir>/store")
    keep_snapshots: int = _f(3, gt=0, help="snapshots kept (oldest removed)")
    snapshot_every_steps: int = _f(0, ge=0, help="automatic snapshot every N applied steps (0 = off)")
    snapshot_every_s: float = _f(0.0, ge=0.0, help="automatic snapshot every N seconds of changes (0 = off)")
    secret: str = _f("", help="shared secret for non-loopback servers (or HFS_PS_SECRET)")
    host: str = _f("127.0.0.1", help="serve-params: address to listen on (non-loopback needs a secret or --insecure)")
    port: int = _f(5570, gt=0, le=65535, help="serve-params: port of shard 0 (shard i listens on port + i)")
    shards: int = _f(1, gt=0, help="serve-params: server processes, each owning a contiguous range of rows")
    max_message_mb: float = _f(1024.0, gt=0.0, help="serve-params: largest request accepted, in MiB")
    shared_memory: str = _f("auto", choices=("auto", "off"),
                            help="same-host data path: auto = a client on the server's host moves rows and gradients "
                                 "through a shared-memory segment (frames when the server cannot map it); off = "
                                 "ZeroMQ frames always (a server with off refuses segments)")
    pipeline_pushes: bool = _f(True, help="a served push returns once sent: its reply is collected with the next "
                                         "request (ZeroMQ keeps the order, so that request sees the push applied), "
                                         "so the server's update overlaps the trainer's own work; false = wait for "
                                         "each push's reply (same numbers, bit for bit)")
    update_rule: str = _f("catchup", choices=("catchup", "lazy", "dense"),
                          help="what SGD does to the classifier rows a step does not touch: catchup = what "
                               "torch's dense SGD does (decay + momentum every step), applied in closed form when "
                               "a row is next used; lazy = nothing (stale momentum replayed later; the rule before "
                               "0.2); dense = every row every step (O(C x D), reference)")
    kernel: str = _f("auto", choices=("auto", "numba", "numpy"),
                     help="row kernel of the weight store's catch-up and SGD (and of fc.sharded_momentum=catchup "
                          "on the CPU): numba = one fused compiled pass per row (the fast extra: pip install "
                          "numba); numpy = vectorised numpy passes (the fallback; same numbers); auto = numba "
                          "when it imports, else numpy with one log line")


@dataclass
class OptimConfig:
    name: str = _f("sgd", choices=("sgd", "adamw"),
                   help="backbone optimizer (and the classifier's in full/sharded modes); the weight store "
                        "(fc.mode=sampled) always applies SGD to the classifier rows")
    lr: float = _f(0.1, gt=0.0, help="base learning rate (per global batch)")
    momentum: float = _f(0.9, ge=0.0, le=1.0, help="SGD momentum (also the weight store's SGD under adamw)")
    weight_decay: float = _f(5e-4, ge=0.0, help="weight decay: SGD's L2 term, AdamW's decoupled decay")
    adamw_beta1: float = _f(0.9, ge=0.0, le=1.0, help="adamw: first-moment decay")
    adamw_beta2: float = _f(0.999, ge=0.0, le=1.0, help="adamw: second-moment decay")
    adamw_eps: float = _f(1e-8, gt=0.0, help="adamw: denominator epsilon")
    store_weight_decay: float = _f(-1.0, help="weight decay of the weight store's SGD on the classifier rows "
                                              "(fc.mode=sampled); negative = optim.weight_decay")
    clip_grad_norm: float = _f(0.0, ge=0.0, help="clip the backbone's gradient to this total norm before each "
                                                 "step (0 = off; arcface_torch clips at 5)")
    schedule: str = _f("multistep", choices=("multistep", "cosine", "poly", "constant"),
                       help="lr schedule; poly with warmup_steps is arcface_torch's PolynomialLRWarmup")
    milestones: list[int] = _f([], help="multistep: steps at which lr *= gamma")
    gamma: float = _f(0.1, gt=0.0, help="multistep: lr factor at each milestone")
    power: float = _f(2.0, gt=0.0, help="poly: exponent (arcface_torch's train_v2 uses 1)")
    warmup_steps: int = _f(0, ge=0, help="linear warmup steps")


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/default", help="checkpoints, metrics and logs go here")
    batch_size: int = _f(128, gt=0, help="images per micro-batch per process (an optimizer step sees batch_size x grad_accum)")
    max_steps: int = _f(0, ge=0, help="stop after N steps (0 = run `epochs` epochs)")
    epochs: int = _f(1, gt=0, help="epochs when max_steps = 0")
    grad_accum: int = _f(1, gt=0, help="micro-batches per optimizer step")
    amp: str = _f("none", choices=("none", "bf16", "fp16"), help="mixed precision on CUDA")
    device: str = _f("auto", help="auto, cpu, cuda or cuda:N")
    seed: int = _f(0, help="global seed")
    log_every: int = _f(10, gt=0, help="steps between progress/metrics lines")
    checkpoint_every: int = _f(1000, ge=0, help="steps between checkpoints (0 = only at the end)")
    checkpoint_every_epochs: int = _f(0, ge=0, help="also checkpoint after every N completed epochs (0 = off)")
    keep_checkpoints: int = _f(3, gt=0, help="checkpoints kept")
    val_every: int = _f(0, ge=0, help="steps between validations (0 = only at the end)")
    loggers: list[str] = _f(["jsonl", "tensorboard"], choices=("jsonl", "tensorboard", "wandb"),
                            help="metrics sinks: jsonl (<output_dir>/metrics.jsonl), tensorboard "
                                 "(when installed), wandb (the wandb extra)")
    wandb_project: str = _f("hfs", help="wandb: project name")
    wandb_mode: str = _f("auto", choices=("auto", "online", "offline"),
                         help="wandb: auto = WANDB_MODE if set, else online with WANDB_API_KEY, else offline "
                              "(files under <output_dir>/wandb, `wandb sync` later)")


@dataclass
class DistConfig:
    backend: str = _f("gloo", choices=("gloo", "nccl"), help="torch.distributed backend (nccl on GPUs, gloo on CPU)")
    nproc: int = _f(0, ge=0, help="worker processes per node (0 = visible GPUs, or 1 on CPU)")
    nnodes: int = _f(1, gt=0, help="number of nodes")
    node_rank: int = _f(0, ge=0, help="this node's rank (0 hosts the rendezvous)")
    master_addr: str = _f("127.0.0.1", help="rendezvous host: node 0's address reachable from every node")
    master_port: int = _f(0, ge=0, le=65535, help="rendezvous port (0 = a free port; several nodes must set one)")
    timeout_s: float = _f(600.0, gt=0.0, help="collective timeout: a rank waiting longer on its peers ends the job")
    rendezvous_timeout_s: float = _f(300.0, gt=0.0, help="how long workers and nodes wait for each other at start")


@dataclass
class EvalConfig:
    bins: list[str] = _f([], help="verification .bin files scored during training and by `hfs verify`")
    flip: bool = _f(False, help="add the embedding of the mirrored image")
    folds: int = _f(10, ge=2, help="cross-validation folds")
    batch_size: int = _f(256, gt=0, help="images per extraction batch")
    every: int = _f(0, ge=0, help="steps between verification runs during training (0 = only at the end)")
    far_target: float = _f(1e-3, gt=0.0, le=1.0, help="false accept rate at which VAL is reported")
    num_workers: int = _f(2, ge=0, help="DataLoader workers decoding images for extraction")
    ijb_far_rule: str = _f("nearest", choices=("nearest", "at-most"),
                           help="hfs eval-ijb: how TAR is read at each FAR. nearest = the ROC point whose FAR is "
                                "nearest the target (arcface_torch's eval_ijbc.py, the published IJB-B/C tables); "
                                "at-most = the best TAR whose FAR does not exceed the target")


@dataclass
class HfsConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    fc: FCConfig = field(default_factory=FCConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    paramserver: ParamServerConfig = field(default_factory=ParamServerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def sampler_metric(self) -> str:
        """Cosine for margin heads (they normalise rows), inner product for plain softmax."""
        if self.sampler.metric != "auto":
            return self.sampler.metric
        return "dot" if self.head.type == "softmax" else "cosine"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading


def _unknown_key(key: str, valid: Iterable[str]) -> ConfigError:
    valid = list(valid)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], [v.rsplit(".", 1)[-1] for v in valid], n=1)
    hint = ""
    if close:
        prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
        hint = f" (did you mean '{prefix}{close[0]}'?)"
    return ConfigError(f"unknown config key '{key}'{hint}")


def key_rules(key: str) -> typing.Mapping[str, Any]:
    """The validation metadata of ``section.key``."""
    section, name = key.split(".", 1)
    return field_specs(typing.get_type_hints(HfsConfig)[section])[name].meta


def check_flag(flag: str, key: str, value: Any) -> None:
    """A command-line flag that sets what config key ``key`` sets obeys the key's rule."""
    check_rules(flag, value, key_rules(key), error=ConfigError)


def _build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    specs = field_specs(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{name}.{key}"
        if key not in specs:
            raise _unknown_key(full, [f"{name}.{k}" for k in specs])
        if value is False and "off" in (specs[key].meta.get("choices") or ()):
            value = "off"  # YAML 1.1 reads a bare `off` as false
        kwargs[key] = checked(f"config key '{full}'", value, specs[key].hint, specs[key].meta, error=ConfigError,
                              loose=True)
    return cls(**kwargs)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` laid over ``base``, section by section (neither is changed)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A nested config dict with ``section.key=value`` overrides applied in order (the last one wins)."""
    for text in overrides:
        data = merge(data, parse_override(text))
    return data


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``section.key=value`` into a nested dict; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if len(parts) != 2:
        raise ConfigError(f"override key '{dotted}' must be section.key (e.g. train.max_steps=100)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc.__class__.__name__})") from None
    return {parts[0]: {parts[1]: value}}


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}{where}: invalid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    return data


def config_from_dict(data: dict[str, Any]) -> HfsConfig:
    """Validate a nested dict into :class:`HfsConfig`; unknown sections/keys are errors."""
    sections = typing.get_type_hints(HfsConfig)
    built: dict[str, Any] = {}
    for name, values in data.items():
        if name not in sections:
            raise _unknown_key(str(name), sections)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{name}' must be a mapping, got {type(values).__name__}")
        built[name] = _build_section(name, sections[name], values)
    return HfsConfig(**built)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> HfsConfig:
    """Defaults, then the YAML file, then ``section.key=value`` overrides."""
    return config_from_dict(apply_overrides(read_yaml(path) if path else {}, overrides))


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every key; the configuration reference page comes from this."""
    rows = []
    for section, cls in typing.get_type_hints(HfsConfig).items():
        defaults = cls()
        for name, spec in field_specs(cls).items():
            rows.append((f"{section}.{name}", hint_name(spec.hint), getattr(defaults, name), spec.meta.get("help", "")))
    return rows
