"""train.loggers: the JSON lines sink, and wandb offline without network or API key."""

import json

import pytest

from hfs.config import load_config
from hfs.train.metrics import WANDB_RUN_ID_FILE, open_metrics, resolve_wandb_mode
from hfs.utils.errors import HfsError


def test_wandb_mode_auto_goes_online_only_when_told():
    assert resolve_wandb_mode("auto", {}) == "offline"
    assert resolve_wandb_mode("auto", {"WANDB_API_KEY": "k"}) == "online"
    assert resolve_wandb_mode("auto", {"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}) == "disabled"
    assert resolve_wandb_mode("offline", {"WANDB_API_KEY": "k"}) == "offline"


def test_jsonl_resume_drops_records_past_the_checkpoint(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "train.loggers=[jsonl]"])
    metrics = open_metrics(cfg)
    for step in (1, 2, 3):
        metrics.write({"step": step, "loss": 1.0 / step})
    metrics.close()
    metrics = open_metrics(cfg, resume_step=2)
    metrics.write({"step": 3, "loss": 0.25})
    metrics.close()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_wandb_missing_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "train.loggers=[wandb]"])
    with pytest.raises(HfsError, match=r"train.loggers=wandb needs the wandb package: pip install wandb \(or, in the hfs checkout, pip install -e '\.\[wandb\]'\)"):
        open_metrics(cfg)


def test_wandb_offline_without_key_writes_a_run_into_the_output_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # not the user's ~/.config/wandb
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'run'}", "train.loggers=[jsonl, wandb]",
                             "train.wandb_project=hfs-test"])
    metrics = open_metrics(cfg)
    run = metrics.sinks[1]._run
    assert run.settings.mode == "offline"
    logged, real_log = [], run.log
    monkeypatch.setattr(run, "log", lambda data, step=None: (logged.append((step, data)), real_log(data, step=step)))
    metrics.write({"step": 1, "loss": 2.0, "lr": 0.1, "note": "text is skipped"})
    metrics.write({"step": 2, "loss": 1.5, "lr": 0.1})
    metrics.close()
    assert logged == [(1, {"loss": 2.0, "lr": 0.1}), (2, {"loss": 1.5, "lr": 0.1})]
    run_id = (tmp_path / "run" / WANDB_RUN_ID_FILE).read_text().strip()
    files = list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 2
    resumed = open_metrics(cfg, resume_step=2)  # a resumed run continues the same wandb run
    assert resumed.sinks[1]._run.id == run_id
    resumed.close()
