"""tvmgroup bench --models: stacks agree with float64 and are reported; a wrong one is caught."""

from __future__ import annotations

import json

import pytest
import torch

from tvmgroup.bench import formulations as registry
from tvmgroup.bench.models import ModelShape, Stack, parse_model_shape, run_model, stack_parameters, stack_reference
from tvmgroup.bench.runner import TOLERANCE, Settings
from tvmgroup.cli import main

SMALL = ModelShape(40, 3, 8, 12)


@pytest.mark.parametrize("name", ["linear-loop", "bmm", "einsum", "tvmgroup"])
def test_stack_matches_float64(name):
    settings = Settings(warmup=0, repeats=1, buffers=1)
    (result,) = run_model(SMALL, [registry.FORMULATIONS[name]], settings).results
    assert result.status == "ok", result.message
    assert set(result.errors) >= {"y", "grad_x", "grad_w1", "grad_b2", "grad_norm_weight"}
    assert max(result.errors.values()) <= TOLERANCE
    assert len(result.forward.samples_ms) == 1 and len(result.forward_backward.samples_ms) == 1


def test_wrong_stack_is_reported_not_timed():
    class Broken(registry.Bmm):
        def __call__(self, x):
            return super().__call__(x) + 1e-2

    (result,) = run_model(SMALL, [registry.Formulation("broken", "shifted", Broken)],
                          Settings(warmup=0, repeats=1, buffers=1)).results
    assert result.status == "wrong" and result.forward is None


def test_reference_is_the_stack_in_float64():
    params = stack_parameters(SMALL, seed=0)
    x = torch.randn(SMALL.n, SMALL.groups * SMALL.in_features)
    gy = torch.randn_like(x)
    ref = stack_reference(params, x, gy)
    g, k, h = SMALL.groups, SMALL.in_features, SMALL.hidden
    xd = x.double().view(-1, g, k)
    hid = torch.einsum("ngk,ghk->ngh", xd, params["w1"].double()) + params["b1"].double()
    hid = torch.nn.functional.layer_norm(torch.nn.functional.gelu(hid).reshape(-1, g * h), (g * h,), params["norm_weight"].double(),
                                         params["norm_bias"].double())
    y = torch.einsum("ngh,gkh->ngk", hid.view(-1, g, h), params["w2"].double()) + params["b2"].double()
    torch.testing.assert_close(ref["y"], y.reshape(-1, g * k))
    assert ref["grad_x"].dtype == torch.float64


def test_parse_model_shape():
    assert parse_model_shape("256, 10,256,128") == ModelShape(256, 10, 256, 128)
    for bad in ("1,2,3", "1,2,x,4", "1,0,3,4"):
        with pytest.raises(ValueError, match="--model-shape"):
            parse_model_shape(bad)


def test_cli_models_run_writes_table_and_json(tmp_path, capsys):
    code = main(["bench", "--models", "--model-shape", "32,2,8,16", "--formulations", "bmm,tvmgroup",
                 "--repeats", "2", "--warmup", "0", "--output", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "stack N=32 G=2 K=8 H=16" in out and "schedules:" in out
    data = json.loads((tmp_path / "models.json").read_text())
    (model,) = data["models"]
    assert [r["name"] for r in model["results"]] == ["bmm", "tvmgroup"]
    assert all(r["status"] == "ok" for r in model["results"])
    assert model["tvmgroup_speedup"]["forward_backward"]["best_pytorch"] == "bmm"


def test_cli_models_refuses_conv_layout_and_layer_shapes(tmp_path, capsys):
    assert main(["bench", "--models", "--formulations", "conv1d,tvmgroup", "--output", str(tmp_path)]) == 2
    assert "conv1d" in capsys.readouterr().err
    assert main(["bench", "--models", "--shape", "8,2,3,4", "--output", str(tmp_path)]) == 2
    assert "--model-shape" in capsys.readouterr().err
