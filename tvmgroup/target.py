"""TVM targets for the devices a torch tensor can live on, and their short keys.

A target key (``llvm-rocketlake``, ``cuda-sm_90``) names what a kernel or a tuning log was
made for; it is part of every cache and log path.
"""

from __future__ import annotations

import functools
import json
import os
import re

import torch
import tvm


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


def target_for_device(device: torch.device | str) -> tvm.target.Target:
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_target()
    if device.type == "cuda":
        return cuda_target()
    raise ValueError(f"tvmgroup runs on 'cpu' or 'cuda' tensors, got a tensor on {device.type!r}")


def parse_target(spec: str | dict | tvm.target.Target) -> tvm.target.Target:
    """A target from a CLI word ('llvm', 'cpu', 'cuda', 'cuda:sm_80'), a JSON dict or a Target."""
    if isinstance(spec, tvm.target.Target):
        return spec
    if isinstance(spec, dict):
        return tvm.target.Target(spec)
    word = spec.strip()
    if word in ("llvm", "cpu"):
        return cpu_target()
    if word == "cuda":
        return cuda_target()
    if word.startswith("cuda:"):
        return cuda_target(word.split(":", 1)[1])
    raise ValueError(f"target must be 'llvm', 'cuda' or 'cuda:sm_XX', got {spec!r}")


@functools.lru_cache(maxsize=64)
def target_json(target: tvm.target.Target) -> str:
    """The full target as canonical JSON: a cache key that tells any two targets apart."""
    return json.dumps(dict(target.export()), sort_keys=True, default=str)


def target_key(target: tvm.target.Target) -> str:
    """``llvm-<mcpu>`` or ``cuda-<arch>``: the family a kernel or log belongs to."""
    kind = target.kind.name
    if kind == "llvm":
        return f"llvm-{target.attrs.get('mcpu', 'generic')}"
    if kind == "cuda":
        return f"cuda-{target.attrs.get('arch', 'unknown')}"
    return kind


def is_cuda(target: tvm.target.Target) -> bool:
    return target.kind.name == "cuda"
