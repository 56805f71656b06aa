"""Finding a model's tvmgroup layers and op shapes on example inputs, without compiling."""

from __future__ import annotations

import pytest
import torch

from tvmgroup import GroupedLinear
from tvmgroup.compute import OpSpec
from tvmgroup.discovery import find_layers, load_factory, model_from_factory, op_shapes
from tvmgroup.kernel import KERNELS


class Ensemble(torch.nn.Module):
    """A shared first layer, two grouped layers (one conv layout), a layer called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(12, 24)
        self.members = GroupedLinear(3, 8, 8)
        self.conv = GroupedLinear(2, 4, 6, bias=False, layout="conv")
        self.twice = GroupedLinear(4, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.members(self.inp(x))  # (B, 24)
        c = self.conv(h.view(h.shape[0], 8, 3))  # (B, 2*4, L=3) -> (B, 12, 3)
        flat = c.reshape(-1, 12)
        return self.twice(self.twice(flat)).sum()


def test_calls_name_layers_shapes_and_rows():
    model = Ensemble()
    calls = find_layers(model, torch.randn(5, 12))
    got = [(c.name, c.groups, c.in_features, c.out_features, c.layout, c.bias, c.rows) for c in calls]
    assert got == [
        ("members", 3, 8, 8, "last", True, 5),
        ("conv", 2, 4, 6, "conv", False, 15),
        ("twice", 4, 3, 3, "last", True, 15),
        ("twice", 4, 3, 3, "last", True, 15),
    ]
    assert all(c.dtype == "float32" and c.device == "cpu" for c in calls)
    assert all(c.input_requires_grad and c.weight_requires_grad for c in calls)


def test_discovery_runs_on_fake_tensors_and_compiles_nothing(monkeypatch):
    from tvmgroup import kernel

    def no_compile(*args, **kwargs):
        raise AssertionError("discovery compiled a kernel")

    monkeypatch.setattr(kernel, "build_kernel", no_compile)
    KERNELS.clear()
    assert len(find_layers(Ensemble(), torch.randn(2, 12))) == 4


def test_op_shapes_follow_what_needs_gradients():
    model = torch.nn.Sequential(GroupedLinear(2, 4, 4), GroupedLinear(2, 4, 3))
    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    shapes = {(s.spec, s.rows) for s in op_shapes(find_layers(model, torch.randn(7, 8)))}
    assert shapes == {
        (OpSpec("forward", 2, 4, 4), (7,)),
        (OpSpec("grad_weight", 2, 4, 4), (7,)),  # its input (the model's) needs no grad
        (OpSpec("forward", 2, 4, 3), (7,)),
        (OpSpec("grad_input", 2, 4, 3), (7,)),  # frozen, but its input needs a grad
    }
    forward_only = op_shapes(find_layers(model, torch.randn(7, 8)), backward=False)
    assert {s.spec.op for s in forward_only} == {"forward"}


@pytest.mark.parametrize("layout, x_shape", [("last", (7, 8)), ("conv", (2, 8, 5)), ("shared", (7, 4)),
                                             ("shared_last", (7, 4)), ("heads", (7, 2, 4))])
def test_a_layer_whose_input_and_parameters_need_gradients_runs_the_fused_backward(layout, x_shape, monkeypatch):
    from tvmgroup import ops, schedules

    layer = GroupedLinear(2, 4, 4, layout=layout)
    x = torch.randn(x_shape, requires_grad=True)
    kernel_layout = {"shared": "ensemble", "shared_last": "heads"}.get(layout, layout)
    assert {s.spec.op for s in op_shapes(find_layers(layer, x))} == {"forward", "backward"}
    (backward,) = [s.spec for s in op_shapes(find_layers(layer, x)) if s.spec.op == "backward"]
    assert backward == OpSpec("backward", 2, 4, 4, layout=kernel_layout)
    # Where the template has no fused schedule for the layout, the two ops, as a step runs them.
    monkeypatch.setitem(schedules.EXTRA_OPS["llvm"], "backward", frozenset())
    monkeypatch.setattr(ops, "_fuses", {})
    assert {s.spec.op for s in op_shapes(find_layers(layer, x))} == {"forward", "grad_input", "grad_weight"}
    ops._fuses.clear()


def test_under_no_grad_only_forward_is_needed():
    model = GroupedLinear(2, 4, 4)
    with torch.no_grad():
        calls = find_layers(model, torch.randn(3, 8))
    assert {s.spec.op for s in op_shapes(calls)} == {"forward"}


def test_row_counts_of_one_shape_are_merged():
    layer = GroupedLinear(2, 4, 4)
    model = torch.nn.ModuleDict({"a": layer})

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x).sum() + self.layer(x[:3]).sum()

    (shape, *_) = op_shapes(find_layers(Twice(), torch.randn(10, 8)))
    assert shape.spec.op == "forward" and shape.rows == (3, 10) and shape.layers == ("layer",)
    assert model  # keeps the layer registered elsewhere too


def test_a_model_that_needs_real_values_runs_for_real():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = GroupedLinear(2, 4, 4)

        def forward(self, x):
            n = int(x[0, 0].item() > -100) + 1  # .item(): no fake tensor can answer
            return self.layer(x[:n])

    calls = find_layers(DataDependent(), torch.zeros(5, 8))
    assert [(c.name, c.rows) for c in calls] == [("layer", 2)]


def test_no_layers_no_shapes():
    assert find_layers(torch.nn.Linear(3, 3), torch.randn(2, 3)) == []


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got int"):
        find_layers(3, torch.randn(2))
    with pytest.raises(ValueError, match="must be MODULE:FACTORY"):
        load_factory("no_colon")
    with pytest.raises(ValueError, match="cannot import 'no_such_module_here'"):
        load_factory("no_such_module_here:make")
    with pytest.raises(ValueError, match="has no callable 'nothing'"):
        load_factory("tvmgroup.discovery:nothing")
    path = tmp_path / "m.py"
    path.write_text("def make():\n    return 3\n")
    with pytest.raises(ValueError, match=r"must return \(torch.nn.Module, example inputs\), got int"):
        model_from_factory(f"{path}:make")


def test_factory_from_a_file(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(
        "import torch\nfrom tvmgroup import GroupedLinear\n"
        "def make():\n    return GroupedLinear(2, 3, 4), torch.randn(6, 6)\n"
    )
    model, inputs = model_from_factory(f"{path}:make")
    assert isinstance(model, GroupedLinear) and inputs[0].shape == (6, 6)


def test_weight_convention_and_shared_input_reach_the_op_shapes():
    from tvmgroup import GroupedLinear
    from tvmgroup.discovery import find_layers, op_shapes

    model = torch.nn.Sequential(
        GroupedLinear(3, 8, 16, layout="shared", weight_layout="in_out"),
        GroupedLinear(3, 16, 4, layout="ensemble", weight_layout="in_out"),
    )
    calls = find_layers(model, torch.randn(10, 8))
    assert [c.rows for c in calls] == [10, 10]
    specs = {s.spec for s in op_shapes(calls)}
    assert all(spec.weight_layout == "in_out" and spec.layout == "ensemble" for spec in specs)
    from tvmgroup.kernel import KERNELS

    with torch.no_grad():
        assert model(torch.randn(10, 8)).shape == (3, 10, 4)
    ran = {key[0] for key in KERNELS._kernels}  # the specs of the kernels the model ran
    assert {spec for spec in specs if spec.op == "forward"} <= ran
