"""The CUDA template: tensor cores for float16/bfloat16, SIMT for float32."""

from __future__ import annotations

from tvm import s_tir

from .cuda_simt import schedule_simt
from .cuda_tensorcore import schedule_tensorcore, uses_tensor_cores
from .knobs import Knobs


def schedule_cuda(sch: s_tir.Schedule, op: str, layout: str, bias: bool, knobs: Knobs, tail: bool = False) -> None:
    """Applies the template for the op's dtype; its kernels take any row count (``tail`` is unused)."""
    if op == "backward":
        raise ValueError("the CUDA templates have no fused backward: run grad_input and grad_weight")
    if uses_tensor_cores(sch):
        schedule_tensorcore(sch, op, layout, bias, knobs)
    else:
        schedule_simt(sch, op, layout, bias, knobs)
