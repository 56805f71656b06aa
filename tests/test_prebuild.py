"""``tvmgroup prebuild``: a model's kernels are compiled into the disk cache, and a later
process's first step loads them instead of compiling."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tvmgroup import GroupedLinear, cli, kernel, lookup
from tvmgroup.compute import OpSpec
from tvmgroup.discovery import OpShape
from tvmgroup.kernel import KERNELS
from tvmgroup.prebuild import kernels_needed, prebuild

MODEL = """
import torch
from tvmgroup import GroupedLinear

def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), GroupedLinear(3, 4, 4), torch.nn.Tanh(), GroupedLinear(2, 6, 5))
    return model, torch.randn(9, 6)
"""


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TVMGROUP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TVMGROUP_QUIET", "1")
    KERNELS.clear()
    lookup.forget()
    yield tmp_path / "home"
    KERNELS.clear()
    lookup.forget()


def _step(model, x):
    model.zero_grad()
    model(x).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_after_prebuild_a_step_compiles_nothing_and_is_right(home, monkeypatch):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), GroupedLinear(3, 4, 4), torch.nn.Tanh(), GroupedLinear(2, 6, 5))
    x = torch.randn(9, 6)
    built = prebuild(model, x)
    # Both layers' inputs and parameters need gradients: the fused backward.
    assert {(b.spec.op, b.spec.groups) for b in built} == {(op, g) for op in ("forward", "backward") for g in (3, 2)}
    assert all(b.origin == "default" for b in built)
    KERNELS.clear()  # as in a new process: only the disk cache is left
    lookup.forget()

    def no_compile(*args, **kwargs):
        raise AssertionError("a kernel was compiled after prebuild")

    monkeypatch.setattr(kernel, "build_kernel", no_compile)
    grads = _step(model, x)
    reference = [torch.nn.Linear(6, 12), torch.nn.Conv1d(12, 12, 1, groups=3), torch.nn.Tanh(), torch.nn.Conv1d(12, 10, 1, groups=2)]
    ref = torch.nn.Sequential(*reference).double()
    with torch.no_grad():
        ref[0].weight.copy_(model[0].weight)
        ref[0].bias.copy_(model[0].bias)
        for i in (1, 3):
            ref[i].weight.copy_(model[i].to_conv1d().weight)
            ref[i].bias.copy_(model[i].to_conv1d().bias)

    class Flat(torch.nn.Module):
        def forward(self, h):
            return h.unsqueeze(-1)

    ref_model = torch.nn.Sequential(ref[0], Flat(), ref[1], ref[2], ref[3])
    ref_model.zero_grad()
    ref_model(x.double()).square().sum().backward()
    ref_grads = [ref[0].weight.grad, ref[0].bias.grad,
                 ref[1].weight.grad.view(3, 4, 4), ref[1].bias.grad.view(3, 4),
                 ref[3].weight.grad.view(2, 5, 6), ref[3].bias.grad.view(2, 5)]
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_the_variant_follows_the_row_count():
    spec = OpSpec("forward", 4, 16, 16)  # 1024 multiply-adds a row; serial below 2**16
    shape = OpShape(spec, "cpu", (8, 64, 4096), ("layer",))
    assert kernels_needed([shape]) == [(spec, "cpu", True), (spec, "cpu", False)]


def test_prebuild_command_then_a_new_process(home, tmp_path, capsys):
    models = tmp_path / "models.py"
    models.write_text(MODEL)
    assert cli.main(["prebuild", "--model", f"{models}:make"]) == 0
    out = capsys.readouterr().out
    assert "4 op shapes" in out and "4 kernels ready" in out and "backward-last-g2-k6-o5-float32-bias" in out
    assert cli.main(["cache"]) == 0
    listing = capsys.readouterr().out
    assert listing.count(" ok ") == 4 and "4 kernels" in listing
    # A new process trains a step; were anything compiled there, the cache would grow.
    before = sorted(p.name for p in (home / "kernels").rglob("*.so"))
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import models; "
        "m, x = models.make(); m(x).sum().backward(); print('ok')"
    )
    env = dict(os.environ, TVMGROUP_HOME=str(home), TVMGROUP_QUIET="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert sorted(p.name for p in (home / "kernels").rglob("*.so")) == before
    assert "rebuilding" not in done.stderr


def test_inference_only_and_an_empty_model(home, tmp_path, capsys):
    models = tmp_path / "models2.py"
    models.write_text(MODEL + "\ndef plain():\n    return torch.nn.Linear(2, 2), torch.randn(1, 2)\n")
    assert cli.main(["prebuild", "--model", f"{models}:make", "--inference"]) == 0
    assert "2 op shapes" in capsys.readouterr().out
    assert cli.main(["prebuild", "--model", f"{models}:plain"]) == 0
    assert "no tvmgroup layer runs" in capsys.readouterr().out
    assert cli.main(["prebuild", "--model", f"{models}:missing"]) == 2
    assert "has no callable 'missing'" in capsys.readouterr().err
