"""Compiling the kernels a model needs ahead of time, into the on-disk kernel cache.

A model's first training step otherwise compiles every kernel it calls (seconds each). After
:func:`prebuild`, later processes load them from ``$TVMGROUP_HOME/kernels`` (after the
cache's checks, :mod:`tvmgroup.cache_files`) instead. The kernels are the ones the run-time
would pick: the same lookup (user log, shipped log, default), the same parallel or serial
build for the row counts seen (:func:`tvmgroup.lookup.kernel_for_call` picks it by size).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tvmgroup.compute import OpSpec
from tvmgroup.discovery import OpShape, find_layers, op_shapes
from tvmgroup.lookup import kernel_for
from tvmgroup.target import family_for_device, target_for_device


@dataclass(frozen=True)
class Built:
    spec: OpSpec
    device: str
    serial: bool
    origin: str  # which schedule serves: "user", "shipped" or "default"
    seconds: float


def kernels_needed(shapes: list[OpShape]) -> list[tuple[OpSpec, str, bool]]:
    """(spec, device, serial) for every kernel the op shapes call, in order, without repeats."""
    out: list[tuple[OpSpec, str, bool]] = []
    for shape in shapes:
        family = family_for_device(shape.device)
        macs_per_row = shape.spec.groups * shape.spec.in_features * shape.spec.out_features
        for rows in shape.rows:
            serial = family.serial_loops is not None and rows * macs_per_row < family.serial_below
            item = (shape.spec, shape.device, serial)
            if item not in out:
                out.append(item)
    return out


def prebuild_shapes(shapes: list[OpShape], on_done: Callable[[Built], None] | None = None) -> list[Built]:
    """Compiles (or finds in the cache) each kernel of ``shapes``."""
    done = []
    for spec, device, serial in kernels_needed(shapes):
        start = time.perf_counter()
        kernel = kernel_for(spec, target_for_device(device), serial=serial)
        built = Built(spec, device, serial, kernel.choice.origin, time.perf_counter() - start)
        done.append(built)
        if on_done is not None:
            on_done(built)
    return done


def prebuild(model: torch.nn.Module, inputs: Any, *, backward: bool = True,
             on_done: Callable[[Built], None] | None = None) -> list[Built]:
    """Compiles the kernels ``model`` calls on ``inputs`` (with ``backward``: a training
    step's gradient kernels too) into the kernel cache; returns what was built."""
    return prebuild_shapes(op_shapes(find_layers(model, inputs), backward=backward), on_done)
