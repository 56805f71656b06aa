"""Layouts: the user's tensors as the kernels see them, shapes, checks and the registry."""

from __future__ import annotations

import pytest
import torch

from tvmgroup.layouts import LAYOUTS, layout_of


def test_registry_and_unknown_name():
    assert tuple(LAYOUTS) == ("last", "conv", "ensemble", "groups_last", "heads")
    assert layout_of("conv") is LAYOUTS["conv"]
    with pytest.raises(ValueError, match=r"layout must be one of \('last', 'conv', 'ensemble', 'groups_last', 'heads'\), got 'rows'"):
        layout_of("rows")


def test_features_last_views_without_copy():
    lay = layout_of("last")
    x = torch.randn(3, 5, 2 * 4)
    view = lay.kernel_view(x, 2, 4)
    assert view.shape == (15, 2, 4) and view.data_ptr() == x.data_ptr()
    assert lay.out_shape(x, 2, 7) == [3, 5, 14]
    assert lay.einsum("k") == "ngk" and lay.row_sum_dims == (0,)
    assert not lay.rows_innermost and not lay.groups_innermost and lay.innermost == "features"


def test_conv_views_without_copy():
    lay = layout_of("conv")
    x = torch.randn(3, 2 * 4, 9)
    view = lay.kernel_view(x, 2, 4)
    assert view.shape == (3, 2, 4, 9) and view.data_ptr() == x.data_ptr()
    assert lay.out_shape(x, 2, 7) == [3, 14, 9]
    assert lay.einsum("o") == "bgol" and lay.row_sum_dims == (0, 3)
    assert lay.rows_innermost and not lay.groups_innermost


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_random_operand_has_the_kernel_shape(name):
    lay = layout_of(name)
    t = lay.random(6, 2, 3, torch.float32)
    assert list(t.shape) == [int(d) for d in lay.shape(lay.row_dims(6), 2, 3)]
    assert t.numel() == 6 * 2 * 3


@pytest.mark.parametrize(
    "name, shape, message",
    [
        ("last", (4, 7), r"last dim must be groups\*in_features = 2\*4 = 8, got x of shape \(4, 7\)"),
        ("conv", (4, 8), r"layout='conv' expects x of shape \(batch, groups\*in_features, length\)"),
        ("conv", (4, 7, 3), r"dim 1 must be groups\*in_features = 2\*4 = 8"),
        ("ensemble", (8,), r"layout='ensemble' expects x of shape \(groups, ..., in_features\) \(at least 2 dims\), got \(8,\)"),
        ("ensemble", (3, 5, 4), r"expects x of shape \(groups=2, ..., in_features=4\), got x of shape \(3, 5, 4\)"),
        ("ensemble", (2, 5, 8), r"expects x of shape \(groups=2, ..., in_features=4\), got x of shape \(2, 5, 8\)"),
        ("groups_last", (8,), r"layout='groups_last' expects x of shape \(\.\.\., in_features, groups\) = \(\.\.\., 4, 2\), got x of shape \(8,\)$"),
        ("groups_last", (3, 5, 2), r"expects x of shape \(\.\.\., in_features, groups\) = \(\.\.\., 4, 2\), got x of shape \(3, 5, 2\)$"),
        ("groups_last", (3, 4, 3), r"expects x of shape \(\.\.\., in_features, groups\) = \(\.\.\., 4, 2\), got x of shape \(3, 4, 3\)$"),
        ("groups_last", (3, 2, 4), r"got x of shape \(3, 2, 4\) \(its last two dims are \(groups, in_features\): swap them\)"),
    ],
)
def test_check_input_names_what_was_expected(name, shape, message):
    with pytest.raises(ValueError, match=message):
        layout_of(name).check_input(torch.zeros(shape), 2, 4)


def test_ensemble_views_without_copy():
    lay = layout_of("ensemble")
    x = torch.randn(2, 3, 5, 4)
    view = lay.kernel_view(x, 2, 4)
    assert view.shape == (2, 15, 4) and view.data_ptr() == x.data_ptr()
    assert lay.out_shape(x, 2, 7) == [2, 3, 5, 7]
    assert lay.einsum("k") == "gnk" and lay.row_sum_dims == (1,) and lay.row_axis == 1
    assert not lay.rows_innermost


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(2, 20, 4)[:, ::2],  # every other row
        lambda: torch.randn(2, 10, 9)[..., 2:6],  # a slice of wider features
        lambda: torch.randn(10, 2, 4).transpose(0, 1),  # time-major: (B, G, K) viewed (G, B, K)
        lambda: torch.randn(10, 4).expand(2, 10, 4),  # one input for every member (stride 0)
    ],
    ids=["rows-strided", "feature-slice", "time-major", "expanded"],
)
def test_ensemble_reads_strided_views_in_place(make):
    x = make()
    view = layout_of("ensemble").kernel_view(x, 2, 4)
    assert view.data_ptr() == x.data_ptr() and view.stride(2) == 1
    assert torch.equal(view, x.reshape(2, 10, 4))


def test_ensemble_copies_only_what_it_cannot_index():
    x = torch.randn(2, 4, 10).transpose(1, 2)  # features strided: the kernel needs them contiguous
    view = layout_of("ensemble").kernel_view(x, 2, 4)
    assert view.is_contiguous() and torch.equal(view, x)


def test_ensemble_kernel_buffers_are_strided():
    from tvmgroup.compute import OpSpec, prim_func

    script = prim_func(OpSpec("forward", 2, 8, 8, layout="ensemble")).script()
    # Inputs take any row stride; outputs (tvmgroup's own tensors, or row slices of them)
    # have rows ``features`` apart, so the compiler sees a register tile's rows never overlap.
    assert 'strides=("x_stride_g", "x_stride_n", 1)' in script and 'strides=("y_stride_g", 8, 1)' in script
    assert "strides" not in prim_func(OpSpec("forward", 2, 8, 8, layout="ensemble"), rows=16).script()
    assert "strides" not in prim_func(OpSpec("forward", 2, 8, 8, layout="last")).script()


def test_groups_last_views_without_copy():
    lay = layout_of("groups_last")
    x = torch.randn(3, 5, 4, 2)  # (..., in_features=4, groups=2)
    view = lay.kernel_view(x, 2, 4)
    assert view.shape == (15, 4, 2) and view.data_ptr() == x.data_ptr()
    assert lay.out_shape(x, 2, 7) == [3, 5, 7, 2]
    assert lay.einsum("k") == "nkg" and lay.row_sum_dims == (0,) and lay.row_axis == 0
    assert lay.groups_innermost and not lay.rows_innermost and lay.innermost == "groups"
    bias = torch.randn(2, 7)
    assert lay.bias_view(bias).shape == (1, 7, 2) and torch.equal(lay.bias_view(bias)[0], bias.t())


def test_groups_last_is_the_last_layout_with_its_last_two_dims_swapped():
    """The float64 references of "groups_last" and "last" agree on the same data: the layout
    only moves the groups axis."""
    from tvmgroup.opdefs import reference_pass

    x, weight, bias = torch.randn(6, 4, 3), torch.randn(3, 5, 4), torch.randn(3, 5)
    grad_y = torch.randn(6, 5, 3)
    got = reference_pass(layout_of("groups_last"), x, weight, bias, grad_y)
    want = reference_pass(layout_of("last"), x.transpose(1, 2).reshape(6, 12), weight, bias, grad_y.transpose(1, 2).reshape(6, 15))
    assert torch.allclose(got["y"], want["y"].view(6, 3, 5).transpose(1, 2))
    assert torch.allclose(got["grad_x"], want["grad_x"].view(6, 3, 4).transpose(1, 2))
    assert torch.allclose(got["grad_weight"], want["grad_weight"]) and torch.allclose(got["grad_bias"], want["grad_bias"])


def test_groups_last_kernel_buffers_are_compact():
    from tvmgroup.compute import OpSpec, prim_func

    script = prim_func(OpSpec("forward", 2, 8, 8, layout="groups_last")).script()
    assert 'x: T.Buffer(("n", 8, 2)' in script and "y: T.Buffer((n, 8, 2)" in script and "strides" not in script
