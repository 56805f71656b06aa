"""Kernels loaded from the disk cache run their parallel loops on torch's OpenMP threads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tvmgroup import GroupedLinear, parallel
from tvmgroup.paths import kernel_cache_dir

from conftest import reference


def _libraries(spec_key_part: str) -> list[Path]:
    return sorted(p for p in kernel_cache_dir().rglob("*.so") if spec_key_part in p.name)


def test_layer_kernels_run_on_the_openmp_launcher_and_are_right():
    layer = GroupedLinear(3, 64, 48)  # large enough for the parallel build at 512 rows
    x = torch.randn(515, 3 * 64)  # a tail too
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y.double(), reference(x, layer.weight, layer.bias, "last"), rtol=0, atol=1e-4)
    libraries = _libraries("forward-last-g3-k64-o48")
    assert libraries, "the kernel should be in the disk cache"
    assert parallel.launcher() is not None, parallel._unavailable
    assert all(parallel.is_shared(p) for p in libraries)


@pytest.mark.parametrize("threads", [1, 2])
def test_results_do_not_depend_on_the_team_size(threads):
    layer = GroupedLinear(5, 32, 32)
    x = torch.randn(1024, 5 * 32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            y = layer(x)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y.double(), reference(x, layer.weight, layer.bias, "last"), rtol=0, atol=1e-4)


def test_unbuildable_launcher_keeps_tvms_pool_with_one_warning(monkeypatch):
    from tvm.support import cc

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(parallel, "_launcher", None)
    monkeypatch.setattr(parallel, "_unavailable", None)
    monkeypatch.setattr(cc, "create_shared", no_compiler)
    with pytest.warns(UserWarning, match="TVM's own thread pool.*no C compiler"):
        assert parallel.launcher() is None
    assert parallel.use_shared_pool("/nonexistent.so") is False  # no second warning
    assert parallel.is_shared("/nonexistent.so") is False


SUBPROCESS = textwrap.dedent(
    """
    import glob, os, sys, torch
    from tvmgroup import GroupedLinear, parallel
    layer = GroupedLinear(2, 64, 64)
    x = torch.randn(512, 128)
    with torch.no_grad():
        y = layer(x)
    g, o, k = layer.weight.shape
    ref = torch.einsum("ngk,gok->ngo", x.double().view(-1, g, k), layer.weight.double()) + layer.bias.double()
    assert (y.double().view(-1, g, o) - ref).abs().max().item() < 1e-4
    libs = glob.glob(os.path.join(os.environ["TVMGROUP_HOME"], "**", "forward-*.so"), recursive=True)
    assert libs
    print("SHARED" if all(parallel.is_shared(p) for p in libs) else "TVM-POOL")
    """
)


@pytest.mark.parametrize("setting, expected", [("0", "TVM-POOL"), ("1", "SHARED")])
def test_shared_pool_switch(tmp_path, setting, expected):
    env = {**os.environ, "TVMGROUP_HOME": str(tmp_path), "TVMGROUP_SHARED_POOL": setting, "TVMGROUP_QUIET": "1"}
    out = subprocess.run([sys.executable, "-c", SUBPROCESS], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == expected
