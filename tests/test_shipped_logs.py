"""Every tuning log shipped in ``tuning_logs/`` loads as lookup loads it with today's
template: where its best beat the default, the best trace applies to the op's symbolic-row
compute (a template change that breaks a shipped trace fails here, not as a warning at a
user's lookup). Logs whose best schedule has a loop structure other than the default are
also built and checked against float64."""

from __future__ import annotations

import re

import pytest

from tvmgroup import check
from tvmgroup.compute import OpSpec
from tvmgroup.kernel import build_kernel
from tvmgroup.logs import beats_default, best_record, find_logs
from tvmgroup.paths import shipped_logs_dir
from tvmgroup.replay import checked_traces, choice_from_log
from tvmgroup.schedules import trace_structure
from tvmgroup.target import cpu_target

SHIPPED = [log for log in find_logs(shipped_logs_dir()) if log.target_key.startswith("llvm-") and log.space == "template"]
KEY = re.compile(r"(?P<op>[a-z_]+?)-(?P<layout>[a-z_]+)-g(?P<g>\d+)-k(?P<k>\d+)-o(?P<o>\d+)-(?P<dtype>[a-z0-9]+)"
                 r"-(?P<bias>bias|nobias)(?:-weight_(?P<weight>[a-z_]+))?")


def spec_of(key: str) -> OpSpec:
    """The spec whose ``key`` is ``key`` (checked by rebuilding the key)."""
    match = KEY.fullmatch(key)
    assert match, f"not a spec key: {key}"
    spec = OpSpec(match["op"], int(match["g"]), int(match["k"]), int(match["o"]), match["dtype"], match["layout"],
                  match["bias"] == "bias", match["weight"] or "out_in")
    assert spec.key == key
    return spec


def test_logs_are_shipped_for_both_machines():
    assert {log.target_key for log in SHIPPED} >= {"llvm-rocketlake", "llvm-znver4"}


@pytest.mark.parametrize("log", SHIPPED, ids=lambda log: f"{log.target_key}/{log.spec_key}/n{log.rows}")
def test_a_shipped_log_loads_as_lookup_loads_it(log):
    """None where the default won (lookup never replays that best); LogError if it fails."""
    choice_from_log(spec_of(log.spec_key), cpu_target(), log, "shipped")


def _serves_another_structure(log) -> bool:
    best = best_record(log, spec_of(log.spec_key))
    return beats_default(log, best) and trace_structure(checked_traces(log, "llvm")[best.digest], "llvm") > 0


ONE_PASS = [log for log in SHIPPED if _serves_another_structure(log)]


def test_some_shipped_logs_serve_a_one_pass_backward():
    assert ONE_PASS and all(log.spec_key.startswith("backward-last-") for log in ONE_PASS)


@pytest.mark.parametrize("log", ONE_PASS, ids=lambda log: f"{log.target_key}/{log.spec_key}")
def test_a_shipped_one_pass_backward_computes(log):
    spec = spec_of(log.spec_key)
    kernel = build_kernel(spec, cpu_target(), choice_from_log(spec, cpu_target(), log, "shipped"))
    check.check_kernel(kernel, seed=7)
