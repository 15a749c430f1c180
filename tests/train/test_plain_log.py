"""Training output when stdout is not a terminal (issue 15, item 6): one plain line per
train.log_every steps, so nohup/sbatch/tee logs show progress while the run is going."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest

from hfs.train.plain_log import PlainLog

LINE = re.compile(r"^step (\d+)/4 loss \d+\.\d+ acc \d+\.\d% \d+ img/s upkeep \d+% lr [0-9.e-]+ ETA \d+:\d\d:\d\d$")


@pytest.mark.slow
def test_train_prints_plain_lines_when_stdout_is_a_pipe(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "hfs", "train", "--set", "data.synthetic_classes=8",
         "--set", "data.synthetic_images_per_class=4", "--set", "data.image_size=16", "--set", "data.num_workers=0",
         "--set", "model.arch=tiny", "--set", "model.embedding_size=8", "--set", "train.batch_size=8",
         "--set", "train.max_steps=4", "--set", "train.log_every=2", "--set", f"train.output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [LINE.match(line).group(1) for line in lines] == ["2", "4"], proc.stdout
    assert "━" not in proc.stderr  # no bar frame cut at 80 columns in a log file


def test_plain_log_is_silent_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    record = {"step": 2, "loss": 1.5, "acc": 0.25, "samples_per_s": 100.0, "upkeep_share": 0.1, "lr": 0.1}
    PlainLog(total=4, start=0, stream=tty).line(record)
    log = PlainLog(total=4, start=0, stream=pipe)
    log.line(record)
    assert tty.getvalue() == ""
    assert LINE.match(pipe.getvalue().strip()), pipe.getvalue()


def test_summary_of_a_run_stopped_before_its_first_log_line_has_no_nan(tiny_cfg, blobs):
    """Item 12: the steps done before the stop are reported; with none, the table says so."""
    from rich.console import Console

    from hfs.train.trainer import TrainResult, Trainer, summarize

    result = Trainer(tiny_cfg("train.log_every=10"), datasets=blobs,
                     callbacks=[lambda t, step, rec: step == 2 and t.request_stop()]).run()
    assert result.interrupted and result.steps == 2
    assert result.loss == result.loss and result.train_acc == result.train_acc  # measured, not nan
    console = Console(file=io.StringIO(), width=200)
    summarize(TrainResult(steps=0, start_step=0, seconds=0.1, mode="full", num_classes=4, active_classes=4,
                          interrupted=True), console)
    text = console.file.getvalue()
    assert "nan" not in text and "no step completed" in text
