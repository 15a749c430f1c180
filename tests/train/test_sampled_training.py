import json
import subprocess
import sys

import pytest
import torch

from hfs.train.trainer import Trainer, train


def _losses(path):
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_sampled_run_learns(tiny_cfg, blobs, tmp_path):
    cfg = tiny_cfg("fc.mode=sampled", "fc.sample_num=9", "sampler.type=annoy", "sampler.background=false",
                   "sampler.refresh=interval", "sampler.interval=5", "sampler.annoy_trees=4", "train.max_steps=40",
                   "train.batch_size=6")  # ~5 distinct labels per batch: the rest of the 9 are sampled
    result = train(cfg, datasets=blobs)
    rows = _losses(tmp_path / "run" / "metrics.jsonl")
    assert result.active_classes == 9 and result.num_classes == 12
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"] and rows[-1]["acc"] > rows[0]["acc"]
    assert result.val_top1 > 0.7  # scored against all 12 classes, read from the store in chunks
    assert (tmp_path / "run" / "store").is_dir()
    assert rows[-1]["index_rebuilds"] >= 1 and "upkeep_share" in rows[-1]


def test_sample_num_above_classes_uses_all(tiny_cfg, blobs, caplog):
    result = train(tiny_cfg("fc.mode=sampled", "fc.sample_num=500", "train.max_steps=3"), datasets=blobs)
    assert result.active_classes == 12
    assert "every class is active" in caplog.text


def test_sampled_resume_equals_uninterrupted(tiny_cfg, blobs, tmp_path):
    # sample_num = C: the active set does not depend on the selector's RNG, so the store
    # snapshot + checkpoint must reproduce the uninterrupted run exactly.
    common = ("fc.mode=sampled", "fc.sample_num=12", "train.max_steps=7", "train.checkpoint_every=2",
              "model.dropout=0.1")
    straight = Trainer(tiny_cfg(*common, f"train.output_dir={tmp_path / 'a'}"), datasets=blobs)
    straight.run()
    cfg_b = tiny_cfg(*common, f"train.output_dir={tmp_path / 'b'}")
    first = Trainer(cfg_b, datasets=blobs, callbacks=[lambda t, step, rec: step == 3 and t.request_stop()]).run()
    assert first.interrupted and first.steps == 3
    resumed = Trainer(cfg_b, datasets=blobs, resume=first.checkpoint)
    resumed.run()
    for (ka, va), (kb, vb) in zip(straight.backbone.state_dict().items(), resumed.backbone.state_dict().items()):
        assert torch.equal(va, vb), ka
    wa = torch.cat([torch.as_tensor(r) for _, r in straight.fc.store.iter_chunks("fc")])
    wb = torch.cat([torch.as_tensor(r) for _, r in resumed.fc.store.iter_chunks("fc")])
    assert torch.equal(wa, wb)


@pytest.mark.slow
def test_cli_train_sampled_then_resume(tmp_path):
    out = tmp_path / "cli"
    base = [sys.executable, "-m", "hfs", "train", "--sampled", "--sample-num", "8",
            "--set", "data.source=synthetic", "--set", "data.synthetic_classes=16",
            "--set", "data.synthetic_images_per_class=4", "--set", "data.synthetic_val_per_class=1",
            "--set", "data.image_size=16", "--set", "data.num_workers=0", "--set", "model.arch=tiny",
            "--set", "model.embedding_size=8", "--set", "train.batch_size=16", "--set", "sampler.type=random",
            "--set", f"train.output_dir={out}"]
    done = subprocess.run(base + ["--set", "train.max_steps=2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "val top-1" in done.stdout and (out / "checkpoints" / "step-00000002.pt").is_file()
    again = subprocess.run(base + ["--set", "train.max_steps=3", "--resume", "latest"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "2 -> 3" in again.stdout


def test_fresh_run_against_a_server_holding_a_trained_matrix_is_refused(tiny_cfg, blobs, tmp_path):
    """A long-running `hfs serve-params` keeps the last run's matrix: a fresh run must not train on top of it."""
    import threading

    from hfs.paramserver.server import ParamServer
    from hfs.paramserver.store import InProcessStore
    from hfs.utils.errors import HfsError

    server = ParamServer(InProcessStore(tmp_path / "snapshots", timeout_s=10), "tcp://127.0.0.1:0")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        common = ("fc.mode=sampled", "fc.sample_num=8", "sampler.type=random", "train.max_steps=2",
                  f"paramserver.address={server.endpoint}")
        first = train(tiny_cfg(*common, f"train.output_dir={tmp_path / 'a'}"), datasets=blobs)
        assert first.steps == 2
        with pytest.raises(HfsError, match=r"already holds a matrix 'fc' trained to step 1 .*--resume"):
            train(tiny_cfg(*common, f"train.output_dir={tmp_path / 'b'}"), datasets=blobs)
        resumed = Trainer(tiny_cfg(*common[:-2], "train.max_steps=3", common[-1], f"train.output_dir={tmp_path / 'a'}"),
                          datasets=blobs, resume=first.checkpoint).run()
        assert resumed.steps == 3
    finally:
        server.stop()
        thread.join(10)
        server.close()
