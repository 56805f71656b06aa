"""Target families: the kinds of device tvmgroup compiles for, one registry entry each.

A :class:`TargetFamily` holds everything that differs between, say, CPUs and NVIDIA GPUs:
the torch device type and dtypes it serves, how to make its TVM target and the short key
that names it (``llvm-rocketlake``, ``cuda-sm_90``: part of every cache and log path), its
schedule template, how a kernel launches (streams), the row multiple tuning needs, and
whether logs of another target of the family may serve. The run-time, the tuner and the
CLI ask the family instead of testing the target kind. A new family is one entry in
:data:`FAMILIES` plus a template in ``schedules/``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch
import tvm

from tvmgroup.schedules.cpu import ROW_MULTIPLE as CPU_ROW_MULTIPLE
from tvmgroup.schedules.cpu import serial_loops
from tvmgroup.schedules.cuda_tensorcore import DTYPES as TENSOR_CORE_DTYPES
from tvmgroup.schedules.cuda_tensorcore import ROWS_PAD as TENSOR_CORE_ROWS


@functools.lru_cache(maxsize=None)
def cpu_target(num_cores: int | None = None) -> tvm.target.Target:
    """The LLVM target for this machine's CPU, with its core count for the thread pool."""
    cores = num_cores or torch.get_num_threads() or os.cpu_count() or 1
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": int(cores)}
    )


@functools.lru_cache(maxsize=None)
def cuda_target(arch: str | None = None) -> tvm.target.Target:
    """The CUDA target; ``arch`` like ``"sm_90"``, else read from the current device."""
    if arch is None:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible; pass arch='sm_XX' to build for one")
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    return tvm.target.Target({"kind": "cuda", "arch": arch})


_CPU_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


@functools.lru_cache(maxsize=None)
def cpu_vector_bits(mcpu: str) -> int | None:
    """The widest float vector of the CPU LLVM calls ``mcpu`` on this machine's architecture:
    512 with AVX-512, 256 with AVX2, else 128; None for a name LLVM does not know.

    Logs of another CPU serve only a CPU of the same width: their register tiles and vector
    lengths were chosen for it. The name comes from a log's key (data others can write), so
    it is checked before LLVM sees it."""
    if not isinstance(mcpu, str) or not _CPU_NAME.fullmatch(mcpu):
        return None
    codegen = tvm.target.codegen
    triple = codegen.llvm_get_system_triple()
    if not codegen.llvm_is_valid_cpu(mcpu, triple):
        return None
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "mtriple": triple})
    for feature, bits in (("avx512f", 512), ("avx2", 256)):
        if codegen.llvm_cpu_has_features(feature, target):
            return bits
    return 128


def _cpu_log_class(key: str) -> int | None:
    return cpu_vector_bits(key.removeprefix("llvm-")) if key.startswith("llvm-") else None


@functools.lru_cache(maxsize=None)
def _cuda_arch_of(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def _cuda_target_of(device: torch.device) -> tvm.target.Target:
    """The CUDA target of the GPU ``device`` is (machines may mix GPU generations)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return cuda_target(_cuda_arch_of(index))


def _cpu_target_for(variant: str | None) -> tvm.target.Target:
    if variant:
        raise ValueError(f"the CPU target takes no variant, got {variant!r}; say 'llvm' or 'cpu'")
    return cpu_target()


def _cuda_stream(device: torch.device) -> ContextManager:
    """Launches on torch's current stream of ``device``, as a built-in op would."""
    import tvm_ffi

    stack = contextlib.ExitStack()
    stack.enter_context(torch.cuda.device(device))
    stack.enter_context(tvm_ffi.use_torch_stream())
    return stack


def _use_shared_pool(path: Path) -> bool:
    from tvmgroup.parallel import use_shared_pool

    return use_shared_pool(path)


@dataclass(frozen=True)
class TargetFamily:
    """One kind of device: its targets, dtypes, template and launch context."""

    kind: str  # TVM target kind
    words: tuple[str, ...]  # CLI words for it ('llvm', 'cpu'); '<word>:<variant>' picks a variant
    device_type: str  # torch device type its kernels run on
    dtypes: tuple[torch.dtype, ...]  # storage dtypes (sums are float32)
    make_target: Callable[[str | None], tvm.target.Target]  # for this machine, or a named variant
    key_attr: str  # target attribute that tells two targets of the family apart in keys
    row_multiple: int  # tuning row counts are a multiple of this (exact tiles)
    logs_cross_targets: bool  # a log of another target of the family may serve (with a note)
    # What another target's log must share with this one to serve it (CPU: the vector width
    # in bits); None for a key it cannot place. No function: any target of the family.
    log_class: Callable[[str], object] | None = None
    launch: Callable[[torch.device], ContextManager] | None = None  # context for a kernel call
    multi_core: bool = False  # the target has a "num-cores" attribute (parallel builds/measures)
    postprocs: tuple[str, ...] = ()  # MetaSchedule postprocessors (by name) a tuned candidate passes
    checked_default_dtypes: tuple[str, ...] = ()  # dtypes whose default kernel is checked on first use
    # Calls with fewer multiply-adds than ``serial_below`` run a kernel built inside
    # ``serial_loops()`` (no parallel loops): waking a thread pool costs more than their work.
    serial_loops: Callable[[], ContextManager] | None = None
    serial_below: int = 0
    # Called with the path of each kernel library loaded from the disk cache (CPU: its
    # parallel loops go to torch's OpenMP threads, see tvmgroup.parallel).
    on_load: Callable[[Path], object] | None = None
    # The target of one device of the family, where devices of a machine may differ (CUDA:
    # each GPU's arch); None: ``make_target(None)`` serves every device.
    device_target: Callable[[torch.device], tvm.target.Target] | None = None

    def key(self, target: tvm.target.Target) -> str:
        return f"{self.kind}-{target.attrs.get(self.key_attr, 'generic')}"

    def log_may_serve(self, log_key: str, key: str) -> bool:
        """Whether a log tuned for target key ``log_key`` may serve target key ``key``."""
        if log_key == key:
            return True
        if not self.logs_cross_targets or not log_key.startswith(f"{self.kind}-"):
            return False
        if self.log_class is None:
            return True
        mine = self.log_class(key)
        return mine is not None and self.log_class(log_key) == mine

    def template(self) -> Callable[..., None]:
        from tvmgroup.schedules import template_for

        return template_for(self.kind)

    def supports(self, op: str, layout: str) -> bool:
        """Whether this family's template schedules ``op`` on kernel layout ``layout`` (every
        family has the single ops; the fused backward is the CPU template's)."""
        from tvmgroup.schedules import supports

        return supports(self.kind, op, layout)

    def cli_word(self, target: tvm.target.Target) -> str:
        """The ``--target`` word that makes ``target``."""
        if self.key_attr == "mcpu":
            return self.words[0]
        return f"{self.words[0]}:{target.attrs.get(self.key_attr, '')}"


FAMILIES: dict[str, TargetFamily] = {
    "llvm": TargetFamily(
        "llvm", ("llvm", "cpu"), "cpu", (torch.float32,), _cpu_target_for, "mcpu",
        row_multiple=CPU_ROW_MULTIPLE, logs_cross_targets=True, log_class=_cpu_log_class, multi_core=True,
        serial_loops=serial_loops, serial_below=1 << 16, on_load=_use_shared_pool,
    ),
    "cuda": TargetFamily(
        "cuda", ("cuda",), "cuda", (torch.float32, torch.float16, torch.bfloat16), cuda_target, "arch",
        row_multiple=TENSOR_CORE_ROWS, logs_cross_targets=False, launch=_cuda_stream, device_target=_cuda_target_of,
        postprocs=("VerifyGPUCode",),
        # Tensor-core kernels: their code path (wmma, padding) has no CPU counterpart to test.
        checked_default_dtypes=TENSOR_CORE_DTYPES,
    ),
}
_BY_DEVICE = {f.device_type: f for f in FAMILIES.values()}


def family_of(target: tvm.target.Target) -> TargetFamily:
    try:
        return FAMILIES[target.kind.name]
    except KeyError:
        raise ValueError(f"tvmgroup has no target family {target.kind.name!r}; have {sorted(FAMILIES)}") from None


def family_for_device(device_type: str) -> TargetFamily:
    try:
        return _BY_DEVICE[device_type]
    except KeyError:
        names = " or ".join(repr(d) for d in _BY_DEVICE)
        raise ValueError(f"tvmgroup runs on {names} tensors, got a tensor on {device_type!r}") from None


def target_for_device(device: torch.device | str) -> tvm.target.Target:
    """The target tvmgroup compiles for to run on ``device`` (a CUDA device's own arch)."""
    device = torch.device(device)
    family = family_for_device(device.type)
    if family.device_target is not None:
        return family.device_target(device)
    return family.make_target(None)


def parse_target(spec: str | dict | tvm.target.Target) -> tvm.target.Target:
    """A target from a CLI word ('llvm', 'cpu', 'cuda', 'cuda:sm_80'), a JSON dict or a Target."""
    if isinstance(spec, tvm.target.Target):
        return spec
    if isinstance(spec, dict):
        return tvm.target.Target(spec)
    word, _, variant = spec.strip().partition(":")
    for family in FAMILIES.values():
        if word in family.words and (variant or ":" not in spec):
            return family.make_target(variant or None)
    raise ValueError(f"target must be 'llvm', 'cuda' or 'cuda:sm_XX', got {spec!r}")


@functools.lru_cache(maxsize=64)
def target_json(target: tvm.target.Target) -> str:
    """The full target as canonical JSON: a cache key that tells any two targets apart."""
    return json.dumps(dict(target.export()), sort_keys=True, default=str)


def target_key(target: tvm.target.Target) -> str:
    """``llvm-<mcpu>`` or ``cuda-<arch>``: the family member a kernel or log belongs to."""
    family = FAMILIES.get(target.kind.name)
    return family.key(target) if family is not None else target.kind.name


def is_cuda(target: tvm.target.Target) -> bool:
    return target.kind.name == "cuda"
