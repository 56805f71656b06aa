"""Which schedule serves an op: a user's tuning log, a shipped one, or the default.

Order: the user's logs (``$TVMGROUP_HOME/tuning_logs``), then the logs shipped in the
package, then the default schedule. Within a source, a log for this exact target key comes
first, then one for another CPU of the same vector width (another ``llvm-*`` key whose CPU
has AVX-512, or AVX2, as this one does), with a one-time note. A log that is corrupt, foreign, does not replay, fails to compile or fails its one-time
float64 check is skipped with a warning, and the next source serves instead. An op no log
covers warns once per shape (:class:`UntunedShapeWarning`; ``TVMGROUP_QUIET=1`` silences it).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import threading
import warnings
from typing import Iterator

import tvm

from tvmgroup.check import check_kernel
from tvmgroup.choice import ScheduleChoice, default_choice, simt_choice
from tvmgroup.compute import OpSpec
from tvmgroup.kernel import KERNELS, Kernel
from tvmgroup.logs import (
    CONFIRMED, MIN_GAIN_OVER_DEFAULT, LogError, TuningLog, best_record, confirmation, default_seconds, find_logs,
)
from tvmgroup.paths import shipped_logs_dir, user_logs_dir
from tvmgroup.replay import choice_from_log
from tvmgroup.target import family_for_device, family_of, target_for_device, target_json, target_key
from tvmgroup.weights import weight_dims


class UntunedShapeWarning(UserWarning):
    """No tuning log covers this op and shape: the default schedule serves it."""


class TuningLogWarning(UserWarning):
    """A tuning log was skipped (corrupt, foreign, wrong results) or is from another CPU."""


_lock = threading.RLock()
_resolved: dict[tuple, ScheduleChoice] = {}
_rejected: set[str] = set()  # log paths (or fingerprints) found unusable in this process
_checked: set = set()  # tuned fingerprints, and (spec, target, fingerprint) of defaults, that passed the check
_warned: set[str] = set()


_for_call: dict[tuple, Kernel] = {}  # what kernel_for_call found, by what a call sees


def forget() -> None:
    """Drops what this process has resolved, e.g. after a tuning run wrote a new log."""
    with _lock:
        _resolved.clear()
        _rejected.clear()
        _checked.clear()
        _for_call.clear()


def _warn_once(key: str, message: str, category: type[Warning]) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, category, stacklevel=4)


def _candidates(root, spec: OpSpec, target: tvm.target.Target) -> list[TuningLog]:
    """Template-space logs of ``spec``: this target key first, then others of its family
    where the family allows (another CPU's log of the same vector width still beats no log)."""
    key, family = target_key(target), family_of(target)
    logs = [log for log in find_logs(root, spec_key=spec.key) if log.space == "template"]
    exact = [log for log in logs if log.target_key == key]
    others = [log for log in logs if log.target_key != key and family.log_may_serve(log.target_key, key)]
    order = lambda log: (-log.trials, -log.rows)  # noqa: E731  most trials, then the largest N
    return sorted(exact, key=order) + sorted(others, key=order)


def tune_command(spec: OpSpec, target: tvm.target.Target) -> str:
    """The ``tvmgroup tune`` command that would tune ``spec`` for ``target``."""
    tgt = family_of(target).cli_word(target)
    words = [
        "tvmgroup tune", f"--ops {spec.op}", f"--groups {spec.groups}", f"--in-features {spec.in_features}",
        f"--out-features {spec.out_features}", f"--dtype {spec.dtype}", f"--layout {spec.layout}",
    ]
    if not spec.bias:
        words.append("--no-bias")
    if spec.weight_layout != "out_in":
        words.append(f"--weight-layout {spec.weight_layout}")
    words.append(f"--target {tgt}")
    return " ".join(words)


def _default_by_log(spec: OpSpec, target: tvm.target.Target, log: TuningLog) -> ScheduleChoice:
    """The default schedule, where a log's search found nothing faster (no warning: the
    shape is tuned, and the default is what tuning chose)."""
    gain = f"{(MIN_GAIN_OVER_DEFAULT - 1) * 100:.0f}%"
    confirmed = confirmation(log.meta, best_record(log, spec).digest) if CONFIRMED in log.meta else None
    if confirmed is not None:
        note = (
            f"{log.path}: timed as the layer runs them, the best of {log.trials} trials "
            f"({confirmed.best_seconds * 1e6:.1f} us at {log.rows} rows) did not beat the default "
            f"({confirmed.default_seconds * 1e6:.1f} us) by {gain}, though the search had measured it faster"
        )
    else:
        note = (
            f"{log.path}: the default ({default_seconds(log.meta) * 1e6:.1f} us at {log.rows} rows) was "
            f"within {gain} of the best of {log.trials} trials"
        )
    return dataclasses.replace(default_choice(spec, target), log=str(log.path), tuned_rows=log.rows, note=note)


def _resolve(spec: OpSpec, target: tvm.target.Target) -> ScheduleChoice:
    key = target_key(target)
    for origin, root in (("user", user_logs_dir()), ("shipped", shipped_logs_dir())):
        for log in _candidates(root, spec, target):
            if str(log.path) in _rejected:
                continue
            try:
                choice = choice_from_log(spec, target, log, origin)
            except LogError as err:
                _rejected.add(str(log.path))
                _warn_once(f"bad:{log.path}", f"tvmgroup: skipping tuning log: {err}", TuningLogWarning)
                continue
            if choice is None:  # the log found nothing faster than the default
                return _default_by_log(spec, target, log)
            if choice.fingerprint in _rejected:
                continue
            if log.target_key != key:
                _warn_once(
                    f"family:{spec.key}:{key}",
                    f"tvmgroup: {spec.key} uses a log tuned on another CPU ({log.target_key}, this is {key}); "
                    f"tuning for this CPU would do better: {tune_command(spec, target)}",
                    TuningLogWarning,
                )
            return choice
    if os.environ.get("TVMGROUP_QUIET", "") not in ("", "0"):
        _warned.add(f"untuned:{spec.key}:{key}")
    _warn_once(
        f"untuned:{spec.key}:{key}",
        f"tvmgroup: no tuning log for {spec.key} on {key}; using the default schedule. "
        f"Tune it with: {tune_command(spec, target)}",
        UntunedShapeWarning,
    )
    return default_choice(spec, target)


def resolve(spec: OpSpec, target: tvm.target.Target) -> ScheduleChoice:
    """The schedule for ``spec`` on ``target``, in order: user logs, shipped logs, default."""
    cache_key = (spec, target_json(target))
    with _lock:
        choice = _resolved.get(cache_key)
        if choice is None:
            choice = _resolve(spec, target)
            _resolved[cache_key] = choice
        return choice


def kernel_for_call(
    op: str, weight, layout: str, bias: bool, device, rows: int, weight_layout: str = "out_in"
) -> Kernel:
    """The kernel for one call of ``op``: :func:`kernel_for` once, then a dictionary lookup.

    ``rows`` picks the variant: calls below the family's ``serial_below`` multiply-adds get
    the serial build, which skips waking the thread pool. ``weight`` is stored in
    ``weight_layout`` (see :mod:`tvmgroup.weights`).
    """
    family = family_for_device(device.type)
    serial = rows * weight.numel() < family.serial_below
    defaults_only = _defaults_only.get()
    key = (op, weight.shape, weight.dtype, layout, bias, device, serial, weight_layout, defaults_only)
    kernel = _for_call.get(key)
    if kernel is None:
        groups, in_features, out_features = weight_dims(weight.shape, weight_layout)
        dtype = str(weight.dtype).removeprefix("torch.")
        spec = OpSpec(op, groups, in_features, out_features, dtype, layout, bias, weight_layout)
        target = target_for_device(device)
        if defaults_only:
            kernel = _default_kernel(spec, target, default_choice(spec, target), serial)
        else:
            kernel = kernel_for(spec, target, serial=serial)
        with _lock:
            _for_call[key] = kernel
    return kernel


_defaults_only: contextvars.ContextVar[bool] = contextvars.ContextVar("tvmgroup_defaults_only", default=False)


@contextlib.contextmanager
def default_schedules() -> Iterator[None]:
    """Calls inside run the default schedules, whatever tuning logs there are (to compare a
    tuned layer with its default in one process: ``tvmgroup bench --compare-default``)."""
    token = _defaults_only.set(True)
    try:
        yield
    finally:
        _defaults_only.reset(token)


def kernel_for(spec: OpSpec, target: tvm.target.Target, *, serial: bool = False) -> Kernel:
    """The compiled kernel for ``spec``; a tuned one is checked against float64 on first use.

    ``serial``: the same schedule built without parallel loops; only that build is compiled,
    and the first-use check runs on it (its loop bodies are the parallel build's).
    """
    while True:
        choice = resolve(spec, target)
        if choice.origin == "default":
            return _default_kernel(spec, target, choice, serial)
        if choice.fingerprint in _checked:
            return KERNELS.get(spec, target, choice, serial=serial)
        try:
            kernel = KERNELS.get(spec, target, choice, serial=serial)
            check_kernel(kernel)
        except Exception as err:  # a schedule that fails to build or to compute: never fatal
            with _lock:
                _rejected.add(choice.fingerprint)
                _rejected.add(str(choice.log))
                _resolved.pop((spec, target_json(target)), None)
            _warn_once(f"bad:{choice.log}", f"tvmgroup: skipping tuning log: {err}", TuningLogWarning)
            continue
        with _lock:
            _checked.add(choice.fingerprint)
        return kernel


def _default_kernel(spec: OpSpec, target: tvm.target.Target, choice: ScheduleChoice, serial: bool) -> Kernel:
    """The default kernel; where the family says so (tensor cores), checked on first use.

    Tensor-core kernels are the one default whose code path (wmma intrinsics, padding) has
    no CPU counterpart for the tests to cover, so a failure falls back to the SIMT template.
    """
    check_key = (spec, target_json(target), choice.fingerprint)
    if not (choice.fingerprint == "default" and spec.dtype in family_of(target).checked_default_dtypes):
        return KERNELS.get(spec, target, choice, serial=serial)
    if check_key in _checked:
        return KERNELS.get(spec, target, choice, serial=serial)
    try:
        kernel = KERNELS.get(spec, target, choice, serial=serial)
        check_kernel(kernel)
    except Exception as err:
        _warn_once(
            f"tensorcore:{spec.key}",
            f"tvmgroup: the tensor-core kernel for {spec.key} failed ({err}); using the SIMT kernel",
            TuningLogWarning,
        )
        fallback = simt_choice(spec, target, note=f"tensor-core kernel failed: {err}")
        with _lock:
            _resolved[(spec, target_json(target))] = fallback
        return KERNELS.get(spec, target, fallback, serial=serial)
    with _lock:
        _checked.add(check_key)
    return kernel


def schedule_info(
    op: str,
    groups: int,
    in_features: int,
    out_features: int,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    layout: str = "last",
    bias: bool = True,
    weight_layout: str = "out_in",
) -> dict:
    """Which schedule would serve this op: ``origin``, ``log``, ``tuned_rows``, ``target_key``."""
    spec = OpSpec(op, groups, in_features, out_features, dtype, layout, bias, weight_layout)
    target = target_for_device(device)
    choice = resolve(spec, target)
    return {
        "origin": choice.origin,
        "log": choice.log,
        "tuned_rows": choice.tuned_rows,
        "target_key": target_key(target),
        "fingerprint": choice.fingerprint,
        "spec": spec.key,
        "note": choice.note,
    }
