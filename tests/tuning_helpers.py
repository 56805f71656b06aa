"""Helpers for the tuning tests: hand-made logs (no measurement) and a float64 check."""

from __future__ import annotations

from pathlib import Path

import torch
import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from tvmgroup.compute import OpSpec, ir_module
from tvmgroup.layouts import layout_of
from tvmgroup.opdefs import reference_pass
from tvmgroup.schedules import SampledKnobs, template_for
from tvmgroup.logs import RECORDS, WORKLOADS, write_meta
from tvmgroup.tuning.tune import TuneRequest, log_meta


def fake_log(root: Path, spec: OpSpec, target: tvm.target.Target, rows: int = 256, seeds=(1, 2, 3), key: str | None = None,
             structure: int = 0) -> Path:
    """A log in MetaSchedule's format holding sampled template traces (of the template's
    loop structure ``structure``) with made-up latencies."""
    req = TuneRequest(spec, target, rows, len(seeds), Path(root))
    path = req.path if key is None else Path(root) / key / spec.key / f"n{rows}"
    path.mkdir(parents=True, exist_ok=True)
    mod = ir_module(spec, rows)
    db = ms.database.JSONDatabase(str(path / WORKLOADS), str(path / RECORDS), allow_missing=True)
    workload = db.commit_workload(mod)
    args_info = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    for i, seed in enumerate(seeds):
        sch = s_tir.Schedule(mod, seed=seed)
        template_for(target.kind.name)(sch, spec.op, spec.layout, spec.bias, SampledKnobs(structure))
        record = ms.database.TuningRecord(sch.trace, workload, run_secs=[1e-5 * (i + 1)], target=target, args_info=args_info)
        db.commit_tuning_record(record)
    meta = log_meta(req, len(seeds))
    if key is not None:
        meta["target_key"] = key
    write_meta(path, meta)
    return path


def forward_error(n: int, groups: int = 2, k: int = 8, o: int = 8, bias: bool = True) -> float:
    """Max error of ``grouped_linear`` against float64 at ``n`` rows, relative to the magnitude."""
    from tvmgroup import grouped_linear

    x, w = torch.randn(n, groups * k), torch.randn(groups, o, k)
    b = torch.randn(groups, o) if bias else None
    y = grouped_linear(x, w, b).double()
    grad_y = torch.zeros(n, groups * o)
    ref = reference_pass(layout_of("last"), x, w, b, grad_y)["y"]
    mag = reference_pass(layout_of("last"), x.abs(), w.abs(), b.abs() if b is not None else None, grad_y)["y"]
    return ((y - ref).abs() / (mag + 1e-30)).max().item()


def fresh_lookup(tmp_path, monkeypatch):
    """A test's fixture body: an empty TVMGROUP_HOME, nothing resolved, no warning given yet."""
    from tvmgroup import lookup

    monkeypatch.setenv("TVMGROUP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TVMGROUP_QUIET", raising=False)
    lookup.forget()
    lookup._warned.clear()
    yield
    lookup.forget()


def schedule_info_of(spec: OpSpec) -> dict:
    """``tvmgroup.schedule_info`` for ``spec``."""
    import tvmgroup

    return tvmgroup.schedule_info(spec.op, spec.groups, spec.in_features, spec.out_features,
                                  dtype=spec.dtype, layout=spec.layout, bias=spec.bias)
