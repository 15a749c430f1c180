"""The hooks hand data on one way: measures are returned, the finished record is read-only."""

from __future__ import annotations

import json

import pytest

from hfs.train.hooks import BaseHook, gather_record
from hfs.train.trainer import Trainer


class Measure(BaseHook):
    def on_step_end(self, trainer, stats):
        return {"double_step": 2 * trainer.step}

    def on_end(self, trainer):
        return {"ended": True}


class Reader(BaseHook):
    def __init__(self):
        self.seen, self.refused = [], []

    def on_record(self, trainer, record, final):
        self.seen.append((final, dict(record)))
        try:
            record["sneaky"] = 1
        except TypeError:
            self.refused.append(trainer.step)


def test_a_reader_sees_every_measure_wherever_it_stands_and_cannot_write(tiny_cfg, blobs, tmp_path):
    reader = Reader()
    # the reader comes first in the list and still sees what the measuring hook (after it) returned
    Trainer(tiny_cfg("train.max_steps=3", "train.log_every=2"), datasets=blobs, hooks=[reader, Measure()]).run()
    steps = [record for final, record in reader.seen if not final]
    assert [r["double_step"] for r in steps] == [2, 4, 6]
    assert "loss" in steps[1] and "loss" not in steps[0]  # LogHook's measures on log steps only
    final = [record for final, record in reader.seen if final]
    assert len(final) == 1 and final[0]["ended"] is True and "val_top1" in final[0]
    assert reader.refused == [1, 2, 3, 3]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["ended"] is True and all("sneaky" not in row for row in rows)


def test_two_hooks_reporting_one_key_is_an_error_not_an_overwrite():
    record = gather_record({"step": 1}, [Measure(), Measure()], [{"a": 1}, {"b": 2}])
    assert record == {"step": 1, "a": 1, "b": 2}
    with pytest.raises(RuntimeError, match="Measure reports a, already in the record"):
        gather_record({"step": 1}, [Measure(), Measure()], [{"a": 1}, {"a": 2}])
