"""The first-use check: operands on the target family's device, wrong kernels caught."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tvmgroup import check, target
from tvmgroup.choice import ScheduleChoice
from tvmgroup.compute import OPS, OpSpec
from tvmgroup.logs import LogError
from tvmgroup.target import cpu_target, cuda_target


class _Recorder:
    """A stand-in kernel that records where its operands live, then stops the check."""

    def __init__(self, spec: OpSpec, tgt) -> None:
        self.spec, self.target, self.row_tile = spec, tgt, 4
        self.choice = ScheduleChoice("user", lambda sch: None, "fp", log="some-log")
        self.devices: list[str] = []

    def __call__(self, *args: torch.Tensor) -> None:
        self.devices = [t.device.type for t in args]
        raise RuntimeError("stop")


@pytest.mark.parametrize("op", OPS)
def test_operands_are_made_on_the_families_device(op, monkeypatch):
    """A non-CPU family gets its operands on its own device (a fake one here: 'meta')."""
    fake = dataclasses.replace(target.FAMILIES["cuda"], device_type="meta", launch=None)
    monkeypatch.setitem(target.FAMILIES, "cuda", fake)
    kernel = _Recorder(OpSpec(op, 2, 8, 4), cuda_target("sm_90"))
    with pytest.raises(RuntimeError, match="stop"):
        check.check_kernel(kernel)
    assert kernel.devices and set(kernel.devices) == {"meta"}


def test_check_launches_in_the_families_context(monkeypatch):
    """On CUDA the check's kernel call must run on torch's current stream (the family's launch
    context), the stream its operands were made and are copied back on."""
    entered = []

    class Launch:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(("enter", self.device.type))

        def __exit__(self, *exc):
            entered.append(("exit", self.device.type))

    class InContext(_Recorder):
        def __call__(self, *args):
            entered.append(("call", args[0].device.type))
            raise RuntimeError("stop")

    fake = dataclasses.replace(target.FAMILIES["cuda"], device_type="meta", launch=Launch)
    monkeypatch.setitem(target.FAMILIES, "cuda", fake)
    with pytest.raises(RuntimeError, match="stop"):
        check.check_kernel(InContext(OpSpec("forward", 2, 8, 4), cuda_target("sm_90")))
    assert entered == [("enter", "meta"), ("call", "meta"), ("exit", "meta")]


def test_cpu_operands_stay_on_the_cpu():
    kernel = _Recorder(OpSpec("forward", 2, 8, 4), cpu_target())
    with pytest.raises(RuntimeError, match="stop"):
        check.check_kernel(kernel)
    assert set(kernel.devices) == {"cpu"}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["last", "conv"])
def test_a_right_kernel_passes_and_a_wrong_one_fails(op, layout):
    """The check's reference run through the real kernel passes; one wrong element fails."""
    from tvmgroup.lookup import kernel_for

    spec = OpSpec(op, 2, 8, 4, layout=layout)
    kernel = kernel_for(spec, cpu_target())
    check.check_kernel(kernel, seed=1)

    class OffByOne:
        spec, row_tile, choice, target = kernel.spec, kernel.row_tile, kernel.choice, kernel.target

        def __call__(self, *args):
            kernel(*args)
            args[-1].view(-1)[0] += 1.0

    with pytest.raises(LogError, match="wrong results"):
        check.check_kernel(OffByOne(), seed=1)


def _backward_operands():
    spec = OpSpec("backward", 2, 8, 8)
    tensors, outs = spec.op_def.operands(spec, spec.layout_def, 5, torch.float32)
    return tensors, outs, spec.op_def.reference_outputs(spec, spec.layout_def, tensors)


def test_relative_error_of_a_kernel_that_writes_the_references_is_small():
    tensors, outs, refs = _backward_operands()

    def exact(*args):
        for i, ref in zip(outs, refs):
            args[i].copy_(ref)

    assert check.relative_error(exact, tensors, outs, refs) < 1e-6


def test_relative_error_is_nan_where_an_output_is_left_unwritten():
    tensors, outs, refs = _backward_operands()

    def all_but_the_last(*args):  # the last: a plain max() over the outputs would miss its NaN
        for i, ref in list(zip(outs, refs))[:-1]:
            args[i].copy_(ref)

    error = check.relative_error(all_but_the_last, tensors, outs, refs)
    assert error != error  # NaN: the last output kept its poison
