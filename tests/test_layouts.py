"""Layouts: the user's tensors as the kernels see them, shapes, checks and the registry."""

from __future__ import annotations

import pytest
import torch

from tvmgroup.layouts import LAYOUTS, layout_of


def test_registry_and_unknown_name():
    assert tuple(LAYOUTS) == ("last", "conv")
    assert layout_of("conv") is LAYOUTS["conv"]
    with pytest.raises(ValueError, match=r"layout must be one of \('last', 'conv'\), got 'rows'"):
        layout_of("rows")


def test_features_last_views_without_copy():
    lay = layout_of("last")
    x = torch.randn(3, 5, 2 * 4)
    view = lay.kernel_view(x, 2, 4)
    assert view.shape == (15, 2, 4) and view.data_ptr() == x.data_ptr()
    assert lay.out_shape(x, 2, 7) == [3, 5, 14]
    assert lay.einsum("k") == "ngk" and lay.row_sum_dims == (0,)
    assert not lay.rows_innermost


def test_conv_views_without_copy():
    lay = layout_of("conv")
    x = torch.randn(3, 2 * 4, 9)
    view = lay.kernel_view(x, 2, 4)
    assert view.shape == (3, 2, 4, 9) and view.data_ptr() == x.data_ptr()
    assert lay.out_shape(x, 2, 7) == [3, 14, 9]
    assert lay.einsum("o") == "bgol" and lay.row_sum_dims == (0, 3)
    assert lay.rows_innermost


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
    ],
)
def test_check_input_names_what_was_expected(name, shape, message):
    with pytest.raises(ValueError, match=message):
        layout_of(name).check_input(torch.zeros(shape), 2, 4)
