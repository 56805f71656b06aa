"""Targets for torch devices, CLI target words, and target keys."""

from __future__ import annotations

import pytest
import torch
import tvm

from tvmgroup.target import cpu_target, cuda_target, is_cuda, parse_target, target_for_device, target_key


def test_cpu_target_is_llvm_for_this_cpu():
    target = cpu_target()
    assert target.kind.name == "llvm" and not is_cuda(target)
    assert int(target.attrs["num-cores"]) >= 1
    assert str(target.attrs["mcpu"]) == tvm.target.codegen.llvm_get_system_cpu()
    assert target_key(target) == f"llvm-{target.attrs['mcpu']}"
    assert int(cpu_target(3).attrs["num-cores"]) == 3


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90", "sm_90a"])
def test_cuda_target_for_an_arch(arch):
    target = cuda_target(arch)
    assert is_cuda(target) and str(target.attrs["arch"]) == arch
    assert target_key(target) == f"cuda-{arch}"


@pytest.mark.parametrize("arch", ["90", "sm90", "compute_90", "sm_", "sm_90b"])
def test_cuda_target_rejects_malformed_arch(arch):
    with pytest.raises(ValueError, match=rf"arch must look like 'sm_90', got '{arch}'"):
        cuda_target(arch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_target_without_a_gpu_says_so():
    with pytest.raises(RuntimeError, match="no CUDA device is visible; pass arch='sm_XX'"):
        cuda_target()


def test_target_for_device():
    assert target_for_device("cpu") is cpu_target()
    assert target_for_device(torch.device("cpu")).kind.name == "llvm"
    with pytest.raises(ValueError, match="runs on 'cpu' or 'cuda' tensors, got a tensor on 'meta'"):
        target_for_device("meta")


def test_each_cuda_device_gets_its_own_arch(monkeypatch):
    """A machine may mix GPU generations: the target follows the tensor's device."""
    from tvmgroup import target as target_mod

    capabilities = {0: (9, 0), 1: (8, 6)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capabilities[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    target_mod._cuda_arch_of.cache_clear()
    try:
        assert target_key(target_for_device("cuda:0")) == "cuda-sm_90"
        assert target_key(target_for_device(torch.device("cuda", 1))) == "cuda-sm_86"
        assert target_key(target_for_device("cuda")) == "cuda-sm_86"  # the current device
    finally:
        target_mod._cuda_arch_of.cache_clear()


def test_parse_target_words():
    assert parse_target("llvm") is cpu_target() and parse_target(" cpu ") is cpu_target()
    assert str(parse_target("cuda:sm_86").attrs["arch"]) == "sm_86"
    assert parse_target(cpu_target()) is cpu_target()
    assert parse_target({"kind": "llvm"}).kind.name == "llvm"
    with pytest.raises(ValueError, match=r"'llvm', 'cuda' or 'cuda:sm_XX', got 'rocm'"):
        parse_target("rocm")
    with pytest.raises(ValueError, match="arch must look like"):
        parse_target("cuda:ampere")
