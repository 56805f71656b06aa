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

from tvmgroup.bench.timing import Timer, time_calls


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


def gpu_info(device: str) -> dict:
    """The GPU's name, compute capability and memory, and the CUDA torch was built with
    (empty on the CPU)."""
    if device != "cuda":
        return {}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "gpu_name": props.name,
        "gpu_capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": round(props.total_memory / (1 << 30), 1),
        "gpu_count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
    }


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
        **gpu_info(device),
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
    # The GEMM's dtype (the "sgemm" names stay for the float32 CPU runs they were made for).
    gemm_dtype: str = "float32"
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)


def measure_ceilings(sgemm_size: int = 2048, copy_mbytes: int = 256, repeats: int = 5, *,
                     device: str = "cpu", dtype: torch.dtype = torch.float32,
                     timer: Timer | None = None) -> Ceilings:
    """GEMM rate of a square ``torch.mm`` in ``dtype`` on ``device`` and memory bandwidth of a
    large ``copy_`` there (read + write bytes counted). The best repeat is the ceiling.
    ``timer`` must fit ``device`` (CUDA events on a GPU, where calls return before the work ends).

    The GEMM is ``sgemm_size`` square, or smaller where one call of that would take long
    (:func:`_gemm_size`): the report gives the size it ran at."""
    sgemm_size = _gemm_size(sgemm_size, device, dtype, timer)
    a = torch.randn(sgemm_size, sgemm_size, device=device).to(dtype)
    b = torch.randn(sgemm_size, sgemm_size, device=device).to(dtype)
    c = torch.empty(sgemm_size, sgemm_size, device=device, dtype=dtype)
    mm = time_calls(lambda i: torch.mm(a, b, out=c), warmup=1, repeats=repeats, timer=timer)
    flops = 2 * sgemm_size**3
    del a, b, c

    elements = copy_mbytes * (1 << 20) // 4
    src = torch.randn(elements, device=device)
    dst = torch.empty(elements, device=device)
    copy = time_calls(lambda i: dst.copy_(src), warmup=1, repeats=repeats, timer=timer)
    moved = 2 * elements * 4
    del src, dst
    return Ceilings(
        sgemm_gflops=flops / mm.min_ms / 1e6,
        sgemm_gflops_median=flops / mm.median_ms / 1e6,
        sgemm_size=sgemm_size,
        copy_gbs=moved / copy.min_ms / 1e6,
        copy_gbs_median=moved / copy.median_ms / 1e6,
        copy_mbytes=copy_mbytes,
        gemm_dtype=str(dtype).removeprefix("torch."),
        device=device,
    )


# A ceiling GEMM call may take at most about this long: torch's CPU float16 GEMM on a CPU
# without float16 arithmetic runs a scalar loop (43 s for 2048^2 on a 2-core AMD EPYC,
# against 0.05 s in float32), which would make a short run take minutes.
GEMM_CALL_BUDGET_S = 0.25
SMALLEST_GEMM = 256


def _gemm_size(largest: int, device: str, dtype: torch.dtype, timer: Timer | None) -> int:
    """The ceiling GEMM's size: ``largest``, or the largest power-of-two multiple of
    :data:`SMALLEST_GEMM` below it whose call took at most :data:`GEMM_CALL_BUDGET_S` (the
    next size costs about 8x more)."""
    size = min(largest, SMALLEST_GEMM)
    while size < largest:
        a = torch.randn(size, size, device=device).to(dtype)
        seconds = time_calls(lambda i: torch.mm(a, a), warmup=1, repeats=1, timer=timer).min_ms / 1e3
        if seconds * 8 > GEMM_CALL_BUDGET_S:
            return size
        size = min(largest, size * 2)
    return size
