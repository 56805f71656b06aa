"""Compiled kernels: building one from a schedule, calling it, caching it in memory and on disk.

A :class:`Kernel` wraps up to two compiled TVM functions. CPU schedules split a symbolic
loop without a tail predicate (it would slow the micro-kernel several times), so such a
kernel needs that extent to be a multiple of ``row_tile``. In the ``"last"`` layout it runs
the largest multiple of ``row_tile`` rows through ``main`` and the remaining rows through
``tail``, a build of the same template with ``tail=True``; the split is on the leading dim,
so both calls take views of the caller's tensors (no copies). In the ``"conv"`` layout the
tile applies to the length L: other lengths run on zero-padded copies (see ``_call_length``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import tvm
from filelock import FileLock
from tvm import s_tir

from tvmgroup.schedules import DefaultKnobs, row_tile_of, template_for
from tvmgroup.compute import OpSpec, ir_module
from tvmgroup.paths import kernel_cache_dir
from tvmgroup.target import target_json, target_key

log = logging.getLogger(__name__)

# Applies a schedule to ``sch``, which holds the op with symbolic rows.
ScheduleFn = Callable[[s_tir.Schedule], None]


@dataclass(frozen=True)
class ScheduleChoice:
    """Which schedule serves an op: where it came from and how to apply it."""

    origin: str  # "user", "shipped" or "default"
    apply: ScheduleFn
    fingerprint: str  # changes whenever the schedule does; part of the disk-cache key
    log: str | None = None
    tuned_rows: int | None = None
    note: str | None = None


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """A hash of the compute definitions and schedule templates.

    Part of every schedule's fingerprint, so kernels cached on disk by an older version of
    this code are never loaded after it changes.
    """
    from tvmgroup import compute, schedules

    digest = hashlib.sha256()
    files = [Path(compute.__file__)] + sorted(Path(schedules.__file__).parent.glob("*.py"))
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def default_choice(spec: OpSpec, target: tvm.target.Target) -> ScheduleChoice:
    template = template_for(target.kind.name)

    def apply(sch: s_tir.Schedule) -> None:
        template(sch, spec.op, spec.layout, spec.bias, DefaultKnobs())

    return ScheduleChoice("default", apply, fingerprint="default")


def simt_choice(spec: OpSpec, target: tvm.target.Target, note: str) -> ScheduleChoice:
    """The CUDA SIMT template's default schedule, for any dtype: the tensor cores' fallback."""
    from tvmgroup.schedules.cuda_simt import schedule_simt

    def apply(sch: s_tir.Schedule) -> None:
        schedule_simt(sch, spec.op, spec.layout, spec.bias, DefaultKnobs())

    return ScheduleChoice("default", apply, fingerprint="default-simt", note=note)


@dataclass
class Kernel:
    spec: OpSpec
    choice: ScheduleChoice
    main: tvm.runtime.Module
    row_tile: int = 1
    tail: tvm.runtime.Module | None = None

    def __call__(self, *args: torch.Tensor) -> None:
        """Runs the op on tensors already in kernel layout (see :func:`compute.prim_func`)."""
        if self.row_tile == 1:
            self.main(*args)
        elif self.spec.layout == "conv":
            self._call_length(*args)
        elif self.spec.op == "grad_weight":
            self._call_weight_grad(*args)
        else:
            self._call_rows(*args)

    def _call_length(self, *args: torch.Tensor) -> None:
        """conv layout: the tile applies to the length L (last dim), which no view can split.

        Any other L runs on copies zero-padded to the next multiple (a copy of the row-indexed
        tensors is cheap next to the predicated tail build, which is several times slower);
        lengths below one tile run through the tail build.
        """
        length = args[0].shape[-1]
        pad = -length % self.row_tile
        if pad == 0:
            self.main(*args)
            return
        if length < self.row_tile:
            self.tail(*args)
            return
        padded = lambda t: torch.nn.functional.pad(t, (0, pad))  # noqa: E731
        if self.spec.op == "grad_weight":
            dy, x, *outs = args
            self.main(padded(dy), padded(x), *outs)  # zero columns add nothing to the sums
            return
        *inputs, out = args
        inputs[0] = padded(inputs[0])
        out_padded = out.new_empty((*out.shape[:-1], length + pad))
        self.main(*inputs, out_padded)
        out.copy_(out_padded[..., :length])

    def _split(self, rows: int) -> int:
        return rows - rows % self.row_tile

    def _call_rows(self, a: torch.Tensor, w: torch.Tensor, *rest: torch.Tensor) -> None:
        # (x, weight[, bias], y) or (grad_y, weight, grad_x): row-indexed are the first and last.
        rows = a.shape[0]
        cut = self._split(rows)
        consts, out = rest[:-1], rest[-1]
        if cut:
            self.main(a[:cut], w, *consts, out[:cut])
        if cut < rows:
            self.tail(a[cut:], w, *consts, out[cut:])

    def _call_weight_grad(self, dy: torch.Tensor, x: torch.Tensor, *outs: torch.Tensor) -> None:
        rows = dy.shape[0]
        cut = self._split(rows)
        if cut == 0:
            self.tail(dy, x, *outs)
            return
        self.main(dy[:cut], x[:cut], *outs)
        if cut < rows:
            partial = [torch.empty_like(o) for o in outs]
            self.tail(dy[cut:], x[cut:], *partial)
            for o, p in zip(outs, partial):
                o.add_(p)


def _compile(spec: OpSpec, target: tvm.target.Target, apply: ScheduleFn) -> tuple[tvm.runtime.Module, int]:
    sch = s_tir.Schedule(ir_module(spec))
    apply(sch)
    return tvm.compile(sch.mod, target=target), row_tile_of(sch.mod, spec.op, spec.layout)


def build_kernel(spec: OpSpec, target: tvm.target.Target, choice: ScheduleChoice) -> Kernel:
    """Compiles ``spec`` for ``target`` with ``choice`` (and its tail kernel, if it needs one)."""
    main, row_tile = _compile(spec, target, choice.apply)
    tail = None
    if row_tile > 1:
        template = template_for(target.kind.name)
        tail, _ = _compile(
            spec, target, lambda sch: template(sch, spec.op, spec.layout, spec.bias, DefaultKnobs(), tail=True)
        )
    return Kernel(spec, choice, main, row_tile, tail)


class KernelCache:
    """Kernels by (spec, target, schedule): in this process, and as shared libraries on disk.

    The disk copy lets a second process skip compilation. It is keyed by the TVM version,
    the target and the schedule's fingerprint, written atomically under a file lock, and
    any file that fails to load is rebuilt.
    """

    def __init__(self) -> None:
        self._kernels: dict[tuple, Kernel] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._kernels.clear()

    def get(self, spec: OpSpec, target: tvm.target.Target, choice: ScheduleChoice) -> Kernel:
        key = (spec, target_json(target), choice.fingerprint)
        with self._lock:
            kernel = self._kernels.get(key)
            if kernel is None:
                kernel = self._load_or_build(spec, target, choice, key[1])
                self._kernels[key] = kernel
            return kernel

    def _paths(self, spec: OpSpec, target: tvm.target.Target, choice: ScheduleChoice, target_text: str) -> Path:
        key = f"{target_text}|{choice.fingerprint}|{code_fingerprint()}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return kernel_cache_dir() / tvm.__version__ / target_key(target) / f"{spec.key}-{digest}"

    def _load_or_build(self, spec, target, choice, target_text) -> Kernel:
        if os.environ.get("TVMGROUP_DISK_CACHE", "1") == "0":
            return build_kernel(spec, target, choice)
        stem = self._paths(spec, target, choice, target_text)
        stem.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(stem) + ".lock"):
            kernel = self._load(spec, choice, stem)
            if kernel is not None:
                return kernel
            kernel = build_kernel(spec, target, choice)
            self._save(kernel, stem)
            return kernel

    @staticmethod
    def _load(spec: OpSpec, choice: ScheduleChoice, stem: Path) -> Kernel | None:
        meta_path = stem.with_suffix(".json")
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            main = tvm.runtime.load_module(str(stem) + "-main.so")
            tail = tvm.runtime.load_module(str(stem) + "-tail.so") if meta["row_tile"] > 1 else None
            return Kernel(spec, choice, main, int(meta["row_tile"]), tail)
        except Exception as err:  # a corrupt or foreign file: rebuild it
            log.warning("tvmgroup: ignoring unusable cached kernel %s (%s); rebuilding", stem, err)
            return None

    @staticmethod
    def _save(kernel: Kernel, stem: Path) -> None:
        try:
            parts = [("main", kernel.main)] + ([("tail", kernel.tail)] if kernel.tail is not None else [])
            for name, module in parts:
                tmp = f"{stem}-{name}.tmp{os.getpid()}.so"
                module.export_library(tmp)
                os.replace(tmp, f"{stem}-{name}.so")
            tmp_meta = stem.with_suffix(f".tmp{os.getpid()}")
            tmp_meta.write_text(json.dumps({"row_tile": kernel.row_tile, "spec": kernel.spec.key}))
            os.replace(tmp_meta, stem.with_suffix(".json"))
        except Exception as err:  # no C compiler, read-only home: work without the disk cache
            warnings.warn(f"tvmgroup: could not save compiled kernel to {stem}: {err}", stacklevel=3)


KERNELS = KernelCache()
