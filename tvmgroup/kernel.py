"""Compiled kernels: building one from a schedule, calling it, caching it in memory and on disk.

A :class:`Kernel` wraps up to two compiled TVM functions. CPU schedules split a symbolic
loop without a tail predicate (it would slow the micro-kernel several times), so such a
kernel needs that extent to be a multiple of ``row_tile``. Where the features are innermost
(``"last"``, ``"ensemble"``) it runs the largest multiple of ``row_tile`` rows through ``main``
and the remaining rows through ``tail``, a build of the same template with ``tail=True``; the
split is along the layout's ``row_axis`` (the leading dim, or for ``"ensemble"`` the one after
the groups, whose buffers are strided), so both calls take views of the caller's tensors (no
copies). Where a
row axis is innermost (``"conv"``'s length L) the tile applies to it: other lengths run on
zero-padded copies (see ``_call_length``). Which arguments are row-indexed and which are
sums over rows comes from the op's :class:`~tvmgroup.opdefs.OpDef`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import tvm
from filelock import FileLock
from tvm import s_tir

from tvmgroup import cache_files
from tvmgroup.choice import ScheduleChoice, ScheduleFn
from tvmgroup.compute import OpSpec, ir_module
from tvmgroup.paths import kernel_cache_dir
from tvmgroup.schedules import DefaultKnobs, row_tile_of
from tvmgroup.target import family_of, target_json, target_key
from tvmgroup.threads import install_fork_handler, match_torch_threads

log = logging.getLogger(__name__)
# Before any kernel runs: the pool's size is fixed when it starts, and a forked child must
# not wait on the parent's pool.
match_torch_threads()
install_fork_handler()


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """A hash of the compute definitions and schedule templates.

    Part of every schedule's fingerprint, so kernels cached on disk by an older version of
    this code are never loaded after it changes.
    """
    from tvmgroup import compute, layouts, opdefs, schedules

    digest = hashlib.sha256()
    files = [Path(m.__file__) for m in (compute, layouts, opdefs)] + sorted(Path(schedules.__file__).parent.glob("*.py"))
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# Kernels index their buffers with 32-bit integers (TVM's default index type, and what keeps
# the micro-kernel's address arithmetic cheap): no index of a call may reach this many
# elements past a tensor's start (its span, ``_span``: its element count if it is compact),
# and larger tensors run in chunks (``Kernel._call_in_chunks``). The margin below 2**31
# covers extents that schedules round up to whole tiles.
MAX_KERNEL_ELEMENTS = 2**31 - 2**24


def _span(t: torch.Tensor) -> int:
    """How many elements from ``t``'s first to its last: one more than its largest offset
    (``numel`` for a compact tensor; more for a strided view, less for an expanded one)."""
    if t.is_contiguous():  # every tensor of "last" and "conv": the cheap test
        return t.numel()
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


@dataclass
class Kernel:
    """A compiled op: ``main`` for row extents that are a multiple of ``row_tile``, ``tail``
    for the rest (see the module docstring)."""

    spec: OpSpec
    choice: ScheduleChoice
    main: tvm.runtime.Module
    row_tile: int = 1
    tail: tvm.runtime.Module | None = None
    target: tvm.target.Target | None = None
    serial: bool = False  # built with its parallel loops left serial (for small calls)

    def __post_init__(self) -> None:
        self._args = tuple(self.spec.op_def.arg_list(self.spec.bias))
        # The compiled functions themselves: calling them skips the module's entry lookup.
        self._main = _entry_function(self.main)
        self._tail = _entry_function(self.tail) if self.tail is not None else None
        self._rows_innermost = self.spec.layout_def.rows_innermost
        self._row_axis = self.spec.layout_def.row_axis
        # Chunks of tensors past 32-bit indexing: the rows ("last", "ensemble"), or conv's batch.
        self._chunk_axis = 0 if self._rows_innermost else self._row_axis
        # The family's launch context (CUDA: torch's current stream), or None.
        self.launch = family_of(self.target).launch if self.target is not None else None

    def __call__(self, *args: torch.Tensor) -> None:
        """Runs the op on tensors already in kernel layout (see :mod:`tvmgroup.opdefs`)."""
        for t in args:  # a loop, not any(...): this runs on every call of every layer
            if _span(t) > MAX_KERNEL_ELEMENTS:
                self._call_in_chunks(*args)
                return
        self._call_fitting(*args)

    def _call_in_chunks(self, *args: torch.Tensor) -> None:
        """Tensors past 32-bit indexing run as several calls, each within it, on views along
        the chunk axis: the rows, or the conv layout's batch. Sums over rows add up.

        Along a leading axis ("last", "conv") a chunk of a compact tensor is compact. Along
        "ensemble"'s rows, which sit after the groups, a chunk still spans every group's
        stride: such a chunk runs on a compact copy (an output on a compact buffer copied
        back), the groups' rows read in place otherwise (an input expanded over them).
        """
        axis = self._chunk_axis
        rows_args = [t for t, arg in zip(args, self._args) if arg.role == "rows"]
        extent = rows_args[0].shape[axis]
        per_item = max(t.select(axis, 0).numel() for t in rows_args)
        if per_item > MAX_KERNEL_ELEMENTS:
            item = "batch item" if self._rows_innermost else "row" if axis == 0 else "row (of all groups)"
            split = "the length axis" if self._rows_innermost else "the features or the groups"
            raise ValueError(
                f"tvmgroup: one {item} holds {per_item} elements; kernels index at most "
                f"{MAX_KERNEL_ELEMENTS} per call (split {split})"
            )
        if any(_span(t) > MAX_KERNEL_ELEMENTS for t, arg in zip(args, self._args) if arg.role != "rows"):
            raise ValueError(f"tvmgroup: a weight of over {MAX_KERNEL_ELEMENTS} elements is not supported")
        step = MAX_KERNEL_ELEMENTS // per_item
        if not self._rows_innermost and step >= self.row_tile:
            step -= step % self.row_tile  # every chunk but the last without a tail call
        partials, copies = [], []
        for start in range(0, extent, step):
            call = []
            for t, arg in zip(args, self._args):
                if arg.role == "rows":
                    chunk = t.narrow(axis, start, min(step, extent - start))
                    if _span(chunk) > MAX_KERNEL_ELEMENTS:  # strided past the limit: compact
                        compact = torch.empty(chunk.shape, dtype=chunk.dtype, device=chunk.device)
                        if arg.output:
                            copies.append((chunk, compact))
                        else:
                            compact.copy_(chunk)
                        chunk = compact
                    call.append(chunk)
                elif arg.summed_over_rows and start > 0:
                    part = torch.empty_like(t)
                    call.append(part)
                    partials.append((t, part))
                else:
                    call.append(t)
            self._call_fitting(*call)
            for total, part in partials:
                total.add_(part)
            for chunk, compact in copies:
                chunk.copy_(compact)
            partials.clear()
            copies.clear()

    def _call_fitting(self, *args: torch.Tensor) -> None:
        if self.row_tile == 1:
            self._main(*args)
        elif self._rows_innermost:
            self._call_length(*args)
        else:
            self._call_rows(*args)

    def _call_length(self, *args: torch.Tensor) -> None:
        """The tile applies to the innermost row axis (conv's length L), which no view can split.

        Any other length runs on copies zero-padded to the next multiple (a copy of the
        row-indexed tensors is cheap next to the predicated tail build, which is several
        times slower; zero columns add nothing to sums over rows); lengths below one tile
        run through the tail build.
        """
        length = args[0].shape[-1]
        pad = -length % self.row_tile
        if pad == 0:
            self._main(*args)
            return
        if length < self.row_tile:
            self._tail(*args)
            return
        call, copies = [], []
        for t, arg in zip(args, self._args):
            if arg.role != "rows":
                call.append(t)
            elif not arg.output:
                call.append(torch.nn.functional.pad(t, (0, pad)))
            else:
                padded = t.new_empty((*t.shape[:-1], length + pad))
                call.append(padded)
                copies.append((t, padded))
        self._main(*call)
        for t, padded in copies:
            t.copy_(padded[..., :length])

    def _call_rows(self, *args: torch.Tensor) -> None:
        """The tile applies to the row axis (the leading one, or the layout's ``row_axis``):
        ``main`` takes the largest multiple of it and ``tail`` the rest, both on views (the
        layout's buffers take such views: the leading axis, or strided ones); outputs summed
        over rows add the tail's part. A tail view that starts off the buffers' alignment
        runs on an aligned copy (at most ``row_tile - 1`` rows)."""
        axis = self._row_axis
        rows = args[0].shape[axis]
        cut = rows - rows % self.row_tile
        if cut == rows:
            self._main(*args)
            return
        if cut == 0:
            self._tail(*args)
            return
        self._main(*[t.narrow(axis, 0, cut) if arg.role == "rows" else t for t, arg in zip(args, self._args)])
        call, partials, copies = [], [], []
        for t, arg in zip(args, self._args):
            if arg.role == "rows":
                call.append(_on_aligned_memory(t.narrow(axis, cut, rows - cut), arg.output, copies))
            elif arg.summed_over_rows:
                part = torch.empty_like(t)
                call.append(part)
                partials.append((t, part))
            else:
                call.append(t)
        self._tail(*call)
        for t, part in partials:
            t.add_(part)
        for view, compact in copies:
            view.copy_(compact)


# TVM compiles every buffer as aligned to this many bytes (its allocation alignment), and LLVM
# may emit aligned vector loads and stores on it (a fault, not a slow access, when it is not).
BUFFER_ALIGNMENT = 64


def _on_aligned_memory(view: torch.Tensor, output: bool, copies: list) -> torch.Tensor:
    """``view``, or where it starts off ``BUFFER_ALIGNMENT`` (the tail rows of a row split,
    which start mid-tensor) a compact copy of it in aligned memory; an output's copy is put
    in ``copies`` as (view, copy), to be copied back after the call."""
    if view.data_ptr() % BUFFER_ALIGNMENT == 0:
        return view
    compact = torch.empty(view.shape, dtype=view.dtype, device=view.device)  # torch aligns it
    if output:
        copies.append((view, compact))
    else:
        compact.copy_(view)
    return compact


def _entry_function(module: tvm.runtime.Module):
    """The ``main`` function of a compiled (or loaded) module, as a callable."""
    if hasattr(module, "jit"):  # tvm.compile's Executable: its runtime module, built once
        module = module.jit()
    return module["main"]


def _compile(spec: OpSpec, target: tvm.target.Target, apply: ScheduleFn) -> tuple[tvm.runtime.Module, int]:
    sch = s_tir.Schedule(ir_module(spec))
    apply(sch)
    return tvm.compile(sch.mod, target=target), row_tile_of(sch.mod)


def expected_row_tile(spec: OpSpec, target: tvm.target.Target, choice: ScheduleChoice, serial: bool) -> int:
    """The row tile ``choice`` gives ``spec`` (the schedule applied, nothing compiled): what a
    cached kernel's recorded tile must be."""
    family = family_of(target)
    sch = s_tir.Schedule(ir_module(spec))
    with family.serial_loops() if serial else contextlib.nullcontext():
        choice.apply(sch)
    return row_tile_of(sch.mod)


def build_kernel(spec: OpSpec, target: tvm.target.Target, choice: ScheduleChoice, serial: bool = False) -> Kernel:
    """Compiles ``spec`` for ``target`` with ``choice`` (and its tail kernel, if it needs one).

    ``serial``: the family's serial variant (parallel loops left serial), for small calls.
    """
    family = family_of(target)
    if serial and family.serial_loops is None:
        raise ValueError(f"{family.kind} kernels have no serial variant")
    with family.serial_loops() if serial else contextlib.nullcontext():
        main, row_tile = _compile(spec, target, choice.apply)
        tail = None
        if row_tile > 1:
            template = family.template()
            tail, _ = _compile(
                spec, target, lambda sch: template(sch, spec.op, spec.layout, spec.bias, DefaultKnobs(), tail=True)
            )
    return Kernel(spec, choice, main, row_tile, tail, target, serial)


def load_library(path: Path, target: tvm.target.Target) -> tvm.runtime.Module:
    """A saved kernel library, loaded as the kernel cache loads it: a loaded file's parallel
    loops can go to torch's threads (the family's ``on_load``, :mod:`tvmgroup.parallel`)."""
    module = tvm.runtime.load_module(str(path))
    if family_of(target).on_load is not None:
        family_of(target).on_load(path)
    return module


def reloaded(kernel: Kernel, directory: Path) -> Kernel:
    """``kernel`` saved into ``directory`` and loaded back, so it runs as the layer runs cached
    kernels (an in-memory build keeps TVM's own pool). For scripts that time kernels the
    cache does not hold."""
    modules = {}
    for part, module in (("main", kernel.main), ("tail", kernel.tail)):
        if module is not None:
            path = Path(directory) / f"{kernel.spec.key}-{kernel.choice.fingerprint}-{part}.so"
            module.export_library(str(path))
            modules[part] = load_library(path, kernel.target)
    return Kernel(kernel.spec, kernel.choice, modules["main"], kernel.row_tile, modules.get("tail"), kernel.target,
                  kernel.serial)


class KernelCache:
    """Kernels by (spec, target, schedule): in this process, and as shared libraries on disk.

    The disk copy lets a second process skip compilation. It is keyed by the TVM version,
    the target and the schedule's fingerprint, and written under a file lock. Loading runs a
    library's code, so an entry loads only after the checks of :mod:`tvmgroup.cache_files`
    (private directories, owned plain files, SHA-256 recorded at write time), for the same
    key, with the row tile the schedule gives; any other entry is deleted and rebuilt.
    """

    def __init__(self) -> None:
        self._kernels: dict[tuple, Kernel] = {}
        self._lock = threading.Lock()
        self._warned_unwritable = False

    def clear(self) -> None:
        with self._lock:
            self._kernels.clear()

    def get(self, spec: OpSpec, target: tvm.target.Target, choice: ScheduleChoice, serial: bool = False) -> Kernel:
        key = (spec, target_json(target), choice.fingerprint, serial)
        with self._lock:
            kernel = self._kernels.get(key)
            if kernel is None:
                kernel = self._load_or_build(spec, target, choice, key[1], serial)
                self._kernels[key] = kernel
            return kernel

    def _paths(self, spec: OpSpec, target: tvm.target.Target, choice: ScheduleChoice, target_text: str, serial: bool) -> Path:
        key = self._key(target_text, choice, serial)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return kernel_cache_dir() / tvm.__version__ / target_key(target) / f"{spec.key}-{digest}"

    def _load_or_build(self, spec, target, choice, target_text, serial) -> Kernel:
        if os.environ.get("TVMGROUP_DISK_CACHE", "1") == "0":
            return build_kernel(spec, target, choice, serial)
        stem = self._paths(spec, target, choice, target_text, serial)
        lock = FileLock(str(stem) + ".lock")
        try:
            cache_files.make_private_dirs(kernel_cache_dir(), stem.parent)
            lock.acquire()
        except OSError as err:  # read-only, full, or not private to this user: memory only
            if not self._warned_unwritable:
                self._warned_unwritable = True
                warnings.warn(
                    f"tvmgroup: cannot use the kernel cache in {stem.parent} ({err}); compiled kernels "
                    "are kept in memory only (set TVMGROUP_HOME to a private, writable directory)",
                    stacklevel=4,
                )
            return build_kernel(spec, target, choice, serial)
        try:
            key = self._key(target_text, choice, serial)
            kernel = self._load(spec, target, choice, stem, serial, key)
            if kernel is not None:
                return kernel
            kernel = build_kernel(spec, target, choice, serial)
            if self._save(kernel, stem, key):
                # Run the saved library: a loaded file's parallel loops can go to torch's
                # threads (tvmgroup.parallel); the in-memory build keeps TVM's pool.
                kernel = self._load(spec, target, choice, stem, serial, key) or kernel
            return kernel
        finally:
            lock.release()

    @staticmethod
    def _key(target_text: str, choice: ScheduleChoice, serial: bool) -> str:
        return f"{target_text}|{choice.fingerprint}|{code_fingerprint()}" + ("|serial" if serial else "")

    @staticmethod
    def _load(spec, target, choice, stem: Path, serial: bool, key: str) -> Kernel | None:
        """The cached kernel at ``stem`` after every check, or None (missing; or unusable:
        then deleted, to be rebuilt)."""
        meta_path = stem.with_suffix(".json")
        if not os.path.lexists(meta_path):
            return None
        try:
            meta = json.loads(cache_files.owned_file(meta_path).read_text())
            if meta.get("key") != key or meta.get("spec") != spec.key:
                raise ValueError("its metadata is for another kernel")
            row_tile = meta.get("row_tile")
            expected = expected_row_tile(spec, target, choice, serial)
            if row_tile != expected:
                raise ValueError(f"row tile {row_tile!r} recorded, the schedule's is {expected}")
            parts = ["main"] + (["tail"] if row_tile > 1 else [])
            modules = {}
            for part in parts:
                path = cache_files.checked_file(Path(f"{stem}-{part}.so"), meta["sha256"][part])
                modules[part] = load_library(path, target)
            return Kernel(spec, choice, modules["main"], row_tile, modules.get("tail"), target, serial)
        except Exception as err:  # corrupt, foreign, tampered: never loaded, rebuilt
            log.warning("tvmgroup: ignoring unusable cached kernel %s (%s); rebuilding", stem, err)
            cache_files.remove_entry(stem, [".json", "-main.so", "-tail.so"])
            return None

    @staticmethod
    def _save(kernel: Kernel, stem: Path, key: str) -> bool:
        """Writes ``kernel`` to the entry at ``stem``; False (with a warning) if it cannot."""
        try:
            parts = [("main", kernel.main)] + ([("tail", kernel.tail)] if kernel.tail is not None else [])
            with cache_files.private_workdir(stem.parent) as work:
                sha256 = {
                    name: cache_files.publish(work, f"{name}.so", Path(f"{stem}-{name}.so"), module.export_library)
                    for name, module in parts
                }
                meta = {"key": key, "spec": kernel.spec.key, "row_tile": kernel.row_tile, "sha256": sha256}
                cache_files.write_json(work, stem.with_suffix(".json"), meta)  # last: the entry is complete
            return True
        except Exception as err:  # no C compiler, disk full: work without the disk cache
            warnings.warn(f"tvmgroup: could not save compiled kernel to {stem}: {err}", stacklevel=3)
            return False


KERNELS = KernelCache()
