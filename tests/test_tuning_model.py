"""``tune --model``: one tuning run per distinct op shape of a model, at the rows it sees,
under one progress bar; a finished job run again tunes nothing."""

from __future__ import annotations

import pytest
import torch

from tvmgroup import GroupedLinear, cli
from tvmgroup.compute import OpSpec
from tvmgroup.discovery import find_layers, op_shapes
from tvmgroup.target import cpu_target, cuda_target, target_key
from tvmgroup.tuning import model as model_mod
from tvmgroup.tuning.model import plan, tune_model
from tvmgroup.tuning.tune import TuneResult

MODEL = """
import torch
from tvmgroup import GroupedLinear

def make():
    layer = GroupedLinear(2, 4, 4)
    return torch.nn.Sequential(layer, torch.nn.ReLU(), layer, GroupedLinear(2, 4, 3)), torch.randn(300, 8)
"""


@pytest.fixture
def fake_tune(monkeypatch):
    """Records the requests; each 'tunes' its log to the requested trials at once."""
    seen = []

    def fake_tune_op(req, *, progress=True, bar=None):
        seen.append(req)
        if bar is not None:
            bar.update(req.trials)
        return TuneResult(req.path, 0, req.trials, 1e-5)

    monkeypatch.setattr(model_mod, "tune_op", fake_tune_op)
    return seen


def test_plan_tunes_each_distinct_op_shape_once_at_its_largest_rows(tmp_path):
    shared = GroupedLinear(2, 4, 4)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = shared, GroupedLinear(2, 4, 4)

        def forward(self, x):
            return self.b(self.a(x)) + self.a(x[:10]).sum()

    shapes = op_shapes(find_layers(Net(), torch.randn(300, 8)))
    requests = plan(shapes, None, 8, tmp_path)
    got = sorted((req.spec.op, req.rows) for _, req in requests)
    # One spec for a, b and the short call; rows 300 rounded up to 512. a's input needs no
    # gradient (grad_weight), b's does (the fused backward).
    assert got == [("backward", 512), ("forward", 512), ("grad_weight", 512)]
    assert all(req.target == cpu_target() and req.trials == 8 for _, req in requests)


def test_a_target_for_every_shape(tmp_path):
    shapes = op_shapes(find_layers(GroupedLinear(2, 4, 4), torch.randn(5, 8)), backward=False)
    (_, req), = plan(shapes, cuda_target("sm_80"), 4, tmp_path)
    assert req.rows == 128 and target_key(req.target) == "cuda-sm_80"
    assert str(req.path).startswith(str(tmp_path / "cuda-sm_80"))


def test_tune_model_runs_every_request_under_one_bar(tmp_path, fake_tune):
    model = torch.nn.Sequential(GroupedLinear(2, 4, 4), GroupedLinear(2, 4, 3))
    done = []
    results = tune_model(model, torch.randn(7, 8), trials=5, root=tmp_path, progress=False,
                         on_done=done.append, seed=3)
    assert len(results) == len(done) == len(fake_tune) == 4  # forward x2, grad_weight, backward (fused)
    assert {r.spec for r in fake_tune} >= {OpSpec("forward", 2, 4, 3), OpSpec("backward", 2, 4, 3)}
    assert all(r.seed == 3 and r.rows == 256 for r in fake_tune)


def test_tune_model_command(tmp_path, fake_tune, capsys):
    models = tmp_path / "models.py"
    models.write_text(MODEL)
    assert cli.main(["tune", "--model", f"{models}:make", "--trials", "4", "--quiet", "--output", str(tmp_path / "logs")]) == 0
    out = capsys.readouterr().out
    assert "5 op shapes done" in out  # forward x2, grad_weight, backward x2
    assert "forward-last-g2-k4-o3-float32-bias: 4 trials (4 new)" in out
    assert {r.rows for r in fake_tune} == {512} and {r.keep for r in fake_tune} == {8}
    assert cli.main(["tune", "--model", f"{models}:make", "--inference", "--quiet"]) == 0
    assert "2 op shapes done" in capsys.readouterr().out


def test_tune_model_command_misuse(tmp_path, capsys):
    assert cli.main(["tune", "--model", "x.py:make", "--groups", "2"]) == 2
    assert "leave out --groups" in capsys.readouterr().err
    assert cli.main(["tune", "--groups", "2", "--in-features", "4", "--out-features", "4", "--inference"]) == 2
    assert "--inference goes with --model" in capsys.readouterr().err
    assert cli.main(["tune", "--groups", "2", "--in-features", "4", "--out-features", "4", "--target", "{bad"]) == 2
    assert "--target: not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["tune", "--groups", "2", "--in-features", "4", "--out-features", "4", "--rpc-tracker", "nohost"])
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_a_json_target_names_the_log(tmp_path, fake_tune, monkeypatch, capsys):
    from tvmgroup.tuning import tune as tune_mod

    seen = []
    monkeypatch.setattr(tune_mod, "tune_op", lambda req, progress=True: seen.append(req) or TuneResult(req.path, 0, 1, 1e-5))
    target = '{"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 8}'
    assert cli.main(["tune", "--groups", "2", "--in-features", "4", "--out-features", "4", "--ops", "forward",
                     "--target", target, "--trials", "1", "--output", str(tmp_path)]) == 0
    assert target_key(seen[0].target) == "llvm-skylake-avx512"
    assert "llvm-skylake-avx512" in str(seen[0].path)


@pytest.mark.parametrize("option", [["--rows", "100"], ["--dtype", "float16"], ["--layout", "conv"],
                                    ["--weight-layout", "in_out"], ["--no-bias"], ["--ops", "forward"]])
def test_model_refuses_one_shape_options(option, capsys):
    from tvmgroup.cli import main

    assert main(["tune", "--model", "nowhere:make", *option]) == 2
    err = capsys.readouterr().err
    assert "--model takes" in err and option[0] in err
