"""What machine the numbers come from, and its measured compute and memory ceilings.

The floors in the report divide a shape's FLOPs and bytes by ceilings measured in the same run,
on the same threads and the same (possibly busy) machine, rather than by datasheet numbers.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass
from importlib import metadata

import torch

from tvmgroup.bench.timing import time_calls


def cpu_model() -> str:
    """The CPU's model name, as ``lscpu`` shows it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(threads: int, device: str) -> dict:
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
        "device": device,
        "torch": torch.__version__,
        "tvm": _version("apache-tvm"),
        "tvmgroup": _version("tvmgroup"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": shlex.join(["tvmgroup", *sys.argv[1:]]),
        "argv": list(sys.argv),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class Ceilings:
    """Best and median rates of the two reference loops."""

    sgemm_gflops: float
    sgemm_gflops_median: float
    sgemm_size: int
    copy_gbs: float
    copy_gbs_median: float
    copy_mbytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def measure_ceilings(sgemm_size: int = 2048, copy_mbytes: int = 256, repeats: int = 5) -> Ceilings:
    """SGEMM rate of a square float32 ``torch.mm`` and memory bandwidth of a large ``copy_``
    (read + write bytes counted). The best repeat is the ceiling."""
    a = torch.randn(sgemm_size, sgemm_size)
    b = torch.randn(sgemm_size, sgemm_size)
    c = torch.empty(sgemm_size, sgemm_size)
    mm = time_calls(lambda i: torch.mm(a, b, out=c), warmup=1, repeats=repeats)
    flops = 2 * sgemm_size**3
    del a, b, c

    elements = copy_mbytes * (1 << 20) // 4
    src = torch.randn(elements)
    dst = torch.empty(elements)
    copy = time_calls(lambda i: dst.copy_(src), warmup=1, repeats=repeats)
    moved = 2 * elements * 4
    del src, dst
    return Ceilings(
        sgemm_gflops=flops / mm.min_ms / 1e6,
        sgemm_gflops_median=flops / mm.median_ms / 1e6,
        sgemm_size=sgemm_size,
        copy_gbs=moved / copy.min_ms / 1e6,
        copy_gbs_median=moved / copy.median_ms / 1e6,
        copy_mbytes=copy_mbytes,
    )
