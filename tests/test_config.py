from pathlib import Path

import pytest

from hfs.config import ConfigError, HfsConfig, describe_keys, load_config, parse_override

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, HfsConfig)
    assert cfg.fc.sample_num == 1000


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_steps: 7\n  batch_size: 4\nhead:\n  type: cosface\n")
    cfg = load_config(p, ["train.max_steps=9", "optim.milestones=[10, 20]", "optim.lr=1"])
    assert cfg.train.max_steps == 9 and cfg.train.batch_size == 4
    assert cfg.head.type == "cosface"
    assert cfg.optim.milestones == [10, 20]
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("override,needle", [
    ("train.max_step=3", "did you mean 'train.max_steps'"),
    ("trian.max_steps=3", "did you mean 'train'"),
    ("head.type=arcfac", "head.type"),
    ("train.batch_size=-1", "train.batch_size"),
    ("train.batch_size=abc", "must be int"),
    ("train.hflip=1", "unknown config key 'train.hflip'"),
    ("data.hflip=yes please", "data.hflip"),
    ("optim.milestones=[1, x]", "optim.milestones[1]"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, [override])
    assert needle in str(info.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.max_steps")
    with pytest.raises(ConfigError, match="must be section.key"):
        parse_override("max_steps=3")


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(notmap)
    section = tmp_path / "section.yaml"
    section.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="section 'train'"):
        load_config(section)


def test_derived_metric_is_a_property():
    assert load_config(None, ["head.type=softmax"]).sampler_metric == "dot"
    assert load_config(None, ["head.type=arcface"]).sampler_metric == "cosine"
    cfg = load_config(None, ["head.type=softmax", "sampler.metric=cosine"])
    assert cfg.sampler_metric == "cosine"
    assert "sampler_metric" not in cfg.to_dict()


def test_every_shipped_config_loads_and_starts_with_its_command():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)
        first = f.read_text().splitlines()[0]
        assert first.startswith("# hfs "), f"{f.name} must start with the command that runs it"


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["train.max_steps=5", "eval.bins=[a.bin, b.bin]"])
    p = tmp_path / "out.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p) == cfg


def test_every_key_has_help():
    for key, _, _, text in describe_keys():
        assert text, f"{key} has no help text"


def test_default_config_file_is_current():
    from hfs.default_config import render_default_config

    assert (CONFIGS / "default.yaml").read_text() == render_default_config(), \
        "regenerate: python -m hfs.default_config > configs/default.yaml"
    assert load_config(CONFIGS / "default.yaml") == HfsConfig()


def test_configuration_reference_page_is_current():
    from hfs.default_config import REFERENCE_COMMAND, REFERENCE_PATH, render_config_reference

    page = (CONFIGS.parent / REFERENCE_PATH).read_text()
    assert page == render_config_reference(), \
        f"{REFERENCE_PATH} differs from hfs/config.py; regenerate it: {REFERENCE_COMMAND}"


def test_configuration_reference_shows_every_key_with_its_rule():
    from hfs.default_config import render_config_reference

    rows = {line.split("|")[1].strip(" `"): line.split("|")[4].strip()
            for line in render_config_reference().splitlines() if line.startswith("| `")}
    assert list(rows) == [key for key, *_ in describe_keys()]
    assert rows["sampler.type"] == "`annoy`, `hnsw`, `ivf`, `exact`, `random`"
    assert rows["optim.adamw_beta2"] == ">= 0.0, <= 1.0"
    assert rows["paramserver.port"] == "> 0, <= 65535" and rows["data.root"] == ""


@pytest.mark.parametrize("override,needle", [
    ("optim.name=adam", "config key 'optim.name' must be one of sgd, adamw"),
    ("optim.clip_grad_norm=-1", "config key 'optim.clip_grad_norm' must be >= 0"),
    ("optim.adamw_beta2=1.5", "config key 'optim.adamw_beta2' must be <= 1"),
    ("train.loggers=[jsonl, mlflow]", "config key 'train.loggers[1]' must be one of jsonl, tensorboard, wandb"),
    ("train.wandb_mode=cloud", "config key 'train.wandb_mode'"),
    ("data.decoder=turbo", "config key 'data.decoder' must be one of pil, simplejpeg, auto"),
])
def test_training_option_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert needle in str(info.value)


def test_float_keys_take_exponents_without_a_dot(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  weight_decay: 5e-4\n  lr: 1E-3\n")  # YAML 1.1 reads these as strings
    cfg = load_config(p)
    assert cfg.optim.weight_decay == 5e-4 and cfg.optim.lr == 1e-3
    with pytest.raises(ConfigError, match="'optim.lr' must be float"):
        load_config(None, ["optim.lr=fast"])


def test_list_key_accepts_the_comma_form():
    """Issue 15 item 15: --set optim.milestones=100,200 works like [100,200]."""
    from hfs.config import load_config

    assert load_config(None, ["optim.milestones=100,200"]).optim.milestones == [100, 200]
    assert load_config(None, ["optim.milestones=[100, 200]"]).optim.milestones == [100, 200]
    assert load_config(None, ["eval.bins=a.bin,b.bin"]).eval.bins == ["a.bin", "b.bin"]


def test_list_key_error_shows_both_forms():
    import pytest

    from hfs.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"optim.milestones.*\[100,200\].*100,200"):
        load_config(None, ["optim.milestones=100,x"])
