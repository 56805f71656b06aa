"""A log's best schedule confirmed against the default as the layer runs them: what is recorded,
and how lookup reads it."""

from __future__ import annotations

import json
import math

import pytest

from tvmgroup import lookup
from tvmgroup.compute import OpSpec
from tvmgroup.logs import CONFIRMED, META, Confirmation, best_record, confirmation, find_logs
from tvmgroup.paths import user_logs_dir
from tvmgroup.target import cpu_target, target_key
from tvmgroup.tuning.confirm import confirm, needs_confirmation, time_interleaved

from tuning_helpers import fake_log, fresh_lookup, schedule_info_of

SPEC = OpSpec("forward", 2, 8, 8)


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    yield from fresh_lookup(tmp_path, monkeypatch)


def _log(default_seconds: float = 5e-5, confirmed: dict | None = None):
    """A hand-made log whose best record (1e-5 s by the search) beat ``default_seconds``."""
    path = fake_log(user_logs_dir(), SPEC, cpu_target())
    meta = json.loads((path / META).read_text())
    meta["default_seconds"] = default_seconds
    if confirmed is not None:
        meta[CONFIRMED] = confirmed
    (path / META).write_text(json.dumps(meta))
    (log,) = find_logs(user_logs_dir(), spec_key=SPEC.key)
    return log


def _confirmed(log, best_seconds: float, default_seconds: float) -> None:
    digest = best_record(log, SPEC).digest
    meta = json.loads((log.path / META).read_text())
    meta[CONFIRMED] = Confirmation(digest, best_seconds, default_seconds).to_meta()
    (log.path / META).write_text(json.dumps(meta))
    lookup.forget()


def test_confirmation_is_read_only_for_its_record_and_positive_numbers():
    good = {"digest": "abc", "best_seconds": 1e-4, "default_seconds": 2e-4}
    assert confirmation({CONFIRMED: good}, "abc") == Confirmation("abc", 1e-4, 2e-4)
    assert confirmation({CONFIRMED: good}, "another record") is None
    assert confirmation({}, "abc") is None
    for bad in ("fast", -1.0, 0.0, math.nan, math.inf, True, None):
        assert confirmation({CONFIRMED: dict(good, best_seconds=bad)}, "abc") is None
    assert confirmation({CONFIRMED: "abc"}, "abc") is None


def test_lookup_follows_the_confirmation_over_the_search():
    log = _log(default_seconds=5e-5)  # the search: best 5x faster than the default
    assert schedule_info_of(SPEC)["origin"] == "user"
    _confirmed(log, best_seconds=1.0e-3, default_seconds=1.01e-3)  # as the layer runs them: level
    info = schedule_info_of(SPEC)
    assert info["origin"] == "default" and info["log"] == str(log.path)
    assert "timed as the layer runs them" in info["note"] and "1000.0 us" in info["note"]
    _confirmed(log, best_seconds=0.5e-3, default_seconds=1.0e-3)
    assert schedule_info_of(SPEC)["origin"] == "user"


def test_a_confirmation_of_another_record_is_ignored():
    log = _log(default_seconds=5e-5, confirmed={"digest": "0" * 16, "best_seconds": 1.0, "default_seconds": 1.0})
    assert schedule_info_of(SPEC)["origin"] == "user"  # the search's numbers decide
    assert needs_confirmation(log, best_record(log, SPEC), cpu_target())


def test_only_a_best_that_beat_the_default_needs_confirming():
    log = _log(default_seconds=1.01e-5)
    assert not needs_confirmation(log, best_record(log, SPEC), cpu_target())


def test_time_interleaved_alternates_the_order_and_times_every_call():
    seen = []
    medians = time_interleaved({"a": lambda i: seen.append(("a", i)), "b": lambda i: seen.append(("b", i))}, rounds=3)
    assert set(medians) == {"a", "b"} and all(m >= 0 for m in medians.values())
    starts = [name for name, i in seen if i == 0]  # each block starts with its warm-up call 0
    assert starts == ["a", "b", "b", "a", "a", "b"]


def test_confirm_times_both_schedules_and_records_them():
    log = _log(default_seconds=5e-5)
    best = best_record(log, SPEC)
    assert needs_confirmation(log, best, cpu_target())
    result = confirm(log, best, SPEC, cpu_target(), rounds=1)
    assert result.digest == best.digest
    assert result.best_seconds > 0 and result.default_seconds > 0
    (reread,) = find_logs(user_logs_dir(), spec_key=SPEC.key)
    assert confirmation(reread.meta, result.digest) == result
    assert reread.target_key == target_key(cpu_target())
    assert not needs_confirmation(reread, best, cpu_target())
