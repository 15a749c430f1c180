"""hfs.utils.typed: one rule for config values, wire fields and JSON specs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from hfs.utils.typed import check_fields, checked, coerce, field_values, fits, rules


class Bad(ValueError):
    pass


@pytest.mark.parametrize("value, hint, expected", [
    (3, float, 3.0), (np.int64(3), int, 3), (np.float32(0.5), float, 0.5), ("a", str, "a"), (True, bool, True),
    (None, int | None, None), (4, int | None, 4), ([1, 2], list[int], [1, 2]), ({"a": 1}, dict[str, int], {"a": 1}),
])
def test_values_of_their_type_pass_and_an_int_becomes_a_float(value, hint, expected):
    got = coerce("x", value, hint)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, hint", [
    (True, int), (False, float), (True, str), (1, bool), (1.5, int), ("1", int), (None, int), (2**63, int),
    (-(2**63) - 1, int), ([1, "a"], list[int]), ({"a": "b"}, dict[str, int]), ({1: 1}, dict[str, int]),
])
def test_a_bool_is_no_number_and_other_mismatches_are_refused(value, hint):
    assert not fits(value, hint)
    with pytest.raises(Bad, match="^field 'x"):
        coerce("field 'x'", value, hint, error=Bad)


def test_finite_refuses_nan_and_infinity_only_when_asked():
    assert math.isnan(coerce("x", float("nan"), float))
    for value in (float("nan"), float("inf")):
        with pytest.raises(Bad, match="field 'x' must be a finite number"):
            coerce("field 'x'", value, float, error=Bad, finite=True)


def test_loose_reads_what_a_person_types():
    assert coerce("k", "5e-4", float, loose=True) == 5e-4
    assert coerce("k", 2024, str, loose=True) == "2024"
    assert coerce("k", "100,200", list[int], loose=True) == [100, 200]
    assert coerce("k", 7, list[int], loose=True) == [7] and coerce("k", None, list[int], loose=True) == []
    assert not fits("5e-4", float) and not fits(2024, str)


def test_errors_name_the_item_inside_the_quotes():
    with pytest.raises(Bad, match=r"^key 'a\.b\[1\]' must be int, got 'x' \(a list"):
        coerce("key 'a.b'", [1, "x"], list[int], error=Bad, loose=True)
    with pytest.raises(Bad, match=r"^key 'a\.b\[1\]' must be >= 0; got -1$"):
        checked("key 'a.b'", [1, -1], list[int], rules(ge=0), error=Bad)
    with pytest.raises(Bad, match=r"^spec field 'kwargs\.m' must be str/int"):
        coerce("spec field 'kwargs'", {"m": [1]}, dict[str, str | int], error=Bad)


def test_rules_come_from_the_field_metadata():
    assert checked("k", "a", str, rules(choices=("a", "b"))) == "a"
    with pytest.raises(Bad, match="k must be one of a, b; got 'c'"):
        checked("k", "c", str, rules(choices=("a", "b")), error=Bad)
    with pytest.raises(Bad, match="k must be < 10; got 10"):
        checked("k", 10, int, rules(gt=0, lt=10), error=Bad)
    assert checked("k", None, int | None, rules(ge=0)) is None  # None has no range


@dataclass(frozen=True)
class Spec:
    name: str
    size: int = field(default=1, metadata=rules(gt=0))
    scale: float = 1.0


def test_field_values_refuse_unknown_missing_and_bad_fields():
    assert field_values(Spec, {"name": "a", "scale": 2}, "spec") == {"name": "a", "scale": 2.0}
    for data, needle in [({"size": 2}, "spec field 'name' is missing"),
                         ({"name": "a", "extra": 1}, r"spec has unknown field\(s\) extra \(known: name, size, scale\)"),
                         ({"name": "a", "size": 0}, "spec field 'size' must be > 0; got 0"),
                         ({"name": "a", "size": True}, "spec field 'size' must be int, got True"),
                         ([1], "spec must be an object of its fields, got list")]:
        with pytest.raises(Bad, match=needle):
            field_values(Spec, data, "spec", error=Bad)
    assert field_values(Spec, {"name": "a", "extra": 1}, "spec", strict=False) == {"name": "a"}


def test_check_fields_converts_an_instance_built_in_code():
    got = check_fields(Spec("a", np.int64(3), 2), "spec")
    assert got == Spec("a", 3, 2.0) and type(got.size) is int and type(got.scale) is float
    same = Spec("a")
    assert check_fields(same, "spec") is same
    with pytest.raises(Bad, match="spec field 'size' must be > 0"):
        check_fields(Spec("a", -1), "spec", error=Bad)


def test_every_reader_applies_the_same_rule_to_a_bool_where_an_int_belongs():
    """Config keys, wire header fields, selection rules, index specs and store arguments."""
    from hfs.config import ConfigError, load_config
    from hfs.paramserver.protocol import ProtocolError, field_of
    from hfs.paramserver.store import InProcessStore, StoreError
    from hfs.samplers.owned import IndexSpec, IndexSpecError
    from hfs.samplers.shards import RuleError, rule_from_fields

    with pytest.raises(ConfigError, match="config key 'train.batch_size' must be int, got True"):
        load_config(None, ["train.batch_size=true"])
    with pytest.raises(ProtocolError, match="header field 'rows' must be int, got True"):
        field_of({"rows": True}, "rows", int)
    with pytest.raises(RuleError, match="selection rule field 'seed' must be int, got True"):
        rule_from_fields({"sample_num": 4, "seed": True})
    with pytest.raises(IndexSpecError, match="index spec field 'interval' must be int, got True"):
        IndexSpec.from_json({"sampler": "exact", "interval": True})
    with pytest.raises(StoreError, match="matrix 'fc' field 'rows' must be int, got True"):
        InProcessStore().create("fc", True, 4)
    assert rule_from_fields({"sample_num": 4, "temperature": 1}).temperature == 1.0  # an int is a float
