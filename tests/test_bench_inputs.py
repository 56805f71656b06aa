"""tvmgroup.bench.inputs: each layout's shapes and its map to the rows form (N, G*F)."""

from __future__ import annotations

import pytest
import torch

from tvmgroup.bench.inputs import INPUT_LAYOUTS, input_layout
from tvmgroup.bench.shapes import Shape

SHAPE = Shape(5, 3, 4, 2)
N, G, K, O = SHAPE.n, SHAPE.groups, SHAPE.in_features, SHAPE.out_features

# x[...] in each layout for (row n, group g, feature k) of the rows form x_rows[n, g*K + k].
X_AT = {
    "last": lambda x, n, g, k: x[n, g * K + k],
    "conv": lambda x, n, g, k: x[0, g * K + k, n],
    "ensemble": lambda x, n, g, k: x[g, n, k],
    "shared": lambda x, n, g, k: x[n, k],
    "shared_last": lambda x, n, g, k: x[n, k],
}
Y_AT = {
    "last": lambda y, n, g, o: y[n, g * O + o],
    "conv": lambda y, n, g, o: y[0, g * O + o, n],
    "ensemble": lambda y, n, g, o: y[g, n, o],
    "shared": lambda y, n, g, o: y[g, n, o],
    "shared_last": lambda y, n, g, o: y[n, g * O + o],
}


@pytest.mark.parametrize("name", list(INPUT_LAYOUTS))
def test_rows_form_puts_each_element_where_the_layout_says(name):
    layout = INPUT_LAYOUTS[name]
    x = torch.randn(layout.x_shape(SHAPE))
    y = torch.randn(layout.y_shape(SHAPE))
    x_rows, y_rows = layout.x_rows(x, G), layout.y_rows(y)
    assert x_rows.shape == (N, G * K) and y_rows.shape == (N, G * O)
    for n in range(N):
        for g in range(G):
            assert torch.equal(x_rows[n, g * K:(g + 1) * K], torch.stack([X_AT[name](x, n, g, k) for k in range(K)]))
            assert torch.equal(y_rows[n, g * O:(g + 1) * O], torch.stack([Y_AT[name](y, n, g, o) for o in range(O)]))


def test_input_sizes():
    assert {name: layout.x_elements(SHAPE) for name, layout in INPUT_LAYOUTS.items()} == {
        "last": N * G * K, "conv": N * G * K, "ensemble": N * G * K, "shared": N * K, "shared_last": N * K,
    }
    assert INPUT_LAYOUTS["shared"].summary == "x (N, K) -> y (G, N, O)"


def test_unknown_layout_names_the_choices():
    with pytest.raises(ValueError, match="last, conv, ensemble, shared, shared_last"):
        input_layout("groups_first")
