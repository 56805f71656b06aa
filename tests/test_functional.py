"""grouped_linear forward and backward against float64 einsum, over shapes and layouts."""

from __future__ import annotations

import pytest
import torch

from tvmgroup import grouped_linear

# (groups, in_features, out_features): general, G=1, K=1, 256 groups of 4, and vector
# loops that are not a multiple of 16 (partitioned into a main part and a remainder).
SHAPES = [(3, 5, 4), (1, 7, 6), (4, 1, 3), (256, 4, 4), (2, 20, 36)]
SHAPE_IDS = ["g3k5o4", "G1", "K1", "g256x4", "g2k20o36"]

# Leading dims of x in the "last" layout (rows: 1, 13 and 97 are not multiples of any row
# tile, 64 is) and (B, L) of the "conv" layout (L=64 runs the main kernel, the rest the tail).
LAST_LEADING = [(1,), (13,), (97,), (64,), (2, 3)]
CONV_BL = [(1, 1), (2, 13), (1, 97), (2, 64)]


def _x_shapes(layout: str, groups: int, in_features: int) -> list[tuple[int, ...]]:
    if layout == "last":
        return [(*lead, groups * in_features) for lead in LAST_LEADING]
    if layout == "groups_last":  # (..., K, G): rows as for "last"
        return [(*lead, in_features, groups) for lead in LAST_LEADING]
    if layout == "heads":  # (..., G, K): rows as for "last"
        return [(*lead, groups, in_features) for lead in LAST_LEADING]
    return [(b, groups * in_features, l) for b, l in CONV_BL]


def _check_forward_backward(x, weight, bias, layout, ref_grads, close) -> None:
    leaves = [t.requires_grad_() for t in (x, weight, bias) if t is not None]
    y = grouped_linear(x, weight, bias, layout=layout)
    grad_y = torch.randn_like(y)
    expect = ref_grads(x, weight, bias, grad_y, layout)
    close(y, *expect["y"], what=f"y {tuple(x.shape)}")
    y.backward(grad_y)
    close(x.grad, *expect["x"], what="grad_x")
    close(weight.grad, *expect["weight"], what="grad_weight")
    if bias is not None:
        close(bias.grad, *expect["bias"], what="grad_bias")
    assert all(t.grad is not None for t in leaves)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layout", ["last", "conv", "groups_last", "heads"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_and_backward_match_float64(shape, layout, bias, inputs, ref_grads, close):
    g, k, o = shape
    for x_shape in _x_shapes(layout, g, k):
        x, weight, b = inputs(g, k, o, x_shape, bias)
        _check_forward_backward(x, weight, b, layout, ref_grads, close)


@pytest.mark.parametrize("layout", ["last", "conv", "groups_last", "heads"])
def test_extra_leading_dims_and_prime_length(layout, inputs, ref_grads, close):
    shape = {"last": (2, 3, 15), "conv": (3, 15, 31), "groups_last": (2, 3, 5, 3), "heads": (2, 3, 3, 5)}[layout]
    x, weight, b = inputs(3, 5, 4, shape)
    _check_forward_backward(x, weight, b, layout, ref_grads, close)


@pytest.mark.parametrize(
    "requires", [("x",), ("weight",), ("bias",), ("x", "bias"), ("weight", "bias"), ("x", "weight")]
)
def test_only_some_inputs_require_grad(requires, inputs, ref_grads, close):
    x, weight, bias = inputs(3, 5, 4, (13, 15))
    tensors = {"x": x, "weight": weight, "bias": bias}
    for name in requires:
        tensors[name].requires_grad_()
    y = grouped_linear(x, weight, bias)
    grad_y = torch.randn_like(y)
    expect = ref_grads(x, weight, bias, grad_y, "last")
    y.backward(grad_y)
    for name, t in tensors.items():
        if name in requires:
            close(t.grad, *expect[name], what=f"grad_{name}")
        else:
            assert t.grad is None, f"{name} does not require grad but got one"


def test_each_eager_call_takes_the_function_it_needs(inputs, ref_grads, close):
    """Plain training calls record the lean EagerBackward; forward-mode AD and torch.func
    get EagerGroupedLinear's jvp and vmap rules; both give the float64 gradients."""
    x, weight, bias = inputs(3, 5, 4, (13, 15))
    weight.requires_grad_()
    y = grouped_linear(x, weight, bias)
    assert type(y.grad_fn).__name__ == "EagerBackwardBackward"
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    close(weight.grad, *ref_grads(x, weight, bias, grad_y, "last")["weight"], what="grad_weight")

    import torch.autograd.forward_ad as fwAD

    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        y_dual = grouped_linear(fwAD.make_dual(x, tangent), weight, bias)
        assert type(y_dual.grad_fn).__name__ == "EagerGroupedLinearBackward"
        jvp = fwAD.unpack_dual(y_dual).tangent
    close(jvp, *ref_grads(tangent, weight, None, grad_y, "last")["y"], what="jvp")


def test_weight_grad_without_bias(inputs, ref_grads, close):
    x, weight, _ = inputs(3, 5, 4, (13, 15), bias=False)
    weight.requires_grad_()
    y = grouped_linear(x, weight, None)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    close(weight.grad, *ref_grads(x, weight, None, grad_y, "last")["weight"], what="grad_weight")


def test_no_grad_mode_gives_a_tensor_without_history(inputs):
    x, weight, bias = inputs(3, 5, 4, (13, 15))
    weight.requires_grad_()
    with torch.no_grad():
        y = grouped_linear(x, weight, bias)
    assert not y.requires_grad


@pytest.mark.parametrize("layout", ["last", "conv"])
def test_non_contiguous_input(layout, inputs, ref_grads, close):
    g, k, o = 3, 5, 4
    if layout == "last":
        # Transposed, then every other row: strides (2, 26), neither contiguous nor dense.
        base = torch.randn(g * k, 26)
        x = base.t()[::2]
        assert x.shape == (13, g * k)
    else:
        x = torch.randn(2, 13, g * k).transpose(1, 2)
    assert not x.is_contiguous()
    _, weight, bias = inputs(g, k, o, (1,))
    x_copy = x.detach().clone()
    _check_forward_backward(x, weight, bias, layout, ref_grads, close)
    assert torch.equal(x.detach(), x_copy), "the op wrote to its input"


def test_non_contiguous_weight(inputs, ref_grads, close):
    x, _, bias = inputs(3, 5, 4, (13, 15))
    weight = torch.randn(3, 5, 4).transpose(1, 2)  # (G, O, K) view with swapped strides
    assert not weight.is_contiguous()
    _check_forward_backward(x, weight, bias, "last", ref_grads, close)


@pytest.mark.parametrize("layout", ["last", "conv", "groups_last", "heads"])
def test_empty_batch(layout, inputs):
    shape = {"last": (0, 15), "conv": (0, 15, 7), "groups_last": (0, 5, 3), "heads": (0, 3, 5)}[layout]
    x, weight, bias = inputs(3, 5, 4, shape)
    for t in (x, weight, bias):
        t.requires_grad_()
    y = grouped_linear(x, weight, bias, layout=layout)
    assert y.shape == {"last": (0, 12), "conv": (0, 12, 7), "groups_last": (0, 4, 3), "heads": (0, 3, 4)}[layout]
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_one_dim_input(inputs, ref_grads, close):
    x, weight, bias = inputs(3, 5, 4, (15,))
    _check_forward_backward(x, weight, bias, "last", ref_grads, close)


@pytest.mark.parametrize("layout", ["last", "conv", "groups_last", "heads"])
def test_broadcast_upstream_gradient(layout, inputs, ref_grads, close):
    """y.sum().backward() hands the backward an expanded (stride 0) grad_y."""
    x, weight, bias = inputs(3, 5, 4, {"last": (13, 15), "conv": (2, 15, 13), "groups_last": (13, 5, 3), "heads": (13, 3, 5)}[layout])
    for t in (x, weight, bias):
        t.requires_grad_()
    y = grouped_linear(x, weight, bias, layout=layout)
    y.sum().backward()
    expect = ref_grads(x, weight, bias, torch.ones_like(y), layout)
    close(x.grad, *expect["x"], what="grad_x")
    close(weight.grad, *expect["weight"], what="grad_weight")
    close(bias.grad, *expect["bias"], what="grad_bias")


def test_expanded_weight(inputs, ref_grads, close):
    x, _, _ = inputs(3, 5, 4, (13, 15))
    weight = torch.randn(1, 4, 5).expand(3, 4, 5)
    _check_forward_backward(x, weight, None, "last", ref_grads, close)


def _unaligned(shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous tensor whose data starts one element into its storage (not 64-byte
    aligned), as a slice of stacked parameters can."""
    n = torch.Size(shape).numel()
    t = torch.randn(n + 1)[1:].view(shape)
    assert t.data_ptr() % 64 != 0
    return t


@pytest.mark.parametrize("layout", ["last", "conv", "groups_last", "heads"])
def test_unaligned_tensors(layout, ref_grads, close):
    """Kernels assume aligned buffers: inputs that start mid-storage run on a copy."""
    x = _unaligned({"last": (13, 15), "conv": (2, 15, 7), "groups_last": (13, 5, 3), "heads": (13, 3, 5)}[layout])
    _check_forward_backward(x, _unaligned((3, 4, 5)), _unaligned((3, 4)), layout, ref_grads, close)


@pytest.mark.parametrize("rows", [3, 700])
def test_small_and_large_calls_agree(rows, inputs, ref_grads, close):
    """Small calls run the serial build, large ones the parallel build: both are right."""
    x, weight, bias = inputs(4, 8, 8, (rows, 32))
    _check_forward_backward(x, weight, bias, "last", ref_grads, close)


@pytest.mark.parametrize("rows", [1, 37, 264])
def test_large_groups_match_float64(rows, inputs, ref_grads, close):
    """Groups large enough for the panel schedule, with row counts off its tile."""
    x, weight, bias = inputs(2, 128, 144, (rows, 2 * 128))
    _check_forward_backward(x, weight, bias, "last", ref_grads, close)


# ---------------------------------------------------------------------------------------------
# layout="ensemble": (G, ..., K) -> (G, ..., O), read in place (strided views included)


def _check_ensemble(x, weight, bias, weight_layout, ref_grads, close) -> None:
    """Forward and all gradients against float64; parameters in ``weight_layout``."""
    from tvmgroup.weights import as_out_in

    g = x.shape[0]
    for t in (x, weight, bias):
        if t is not None:
            t.requires_grad_()
    y = grouped_linear(x, weight, bias, layout="ensemble", weight_layout=weight_layout)
    grad_y = torch.randn_like(y)
    o = y.shape[-1]
    bias_go = bias.detach().reshape(g, o) if bias is not None else None
    expect = ref_grads(x.detach(), as_out_in(weight.detach(), weight_layout), bias_go, grad_y, "ensemble")
    close(y, *expect["y"], what=f"y {tuple(x.shape)}")
    y.backward(grad_y)
    close(x.grad, *expect["x"], what="grad_x")
    value, mag, depth = expect["weight"]
    close(weight.grad, as_out_in(value, weight_layout), as_out_in(mag, weight_layout), depth, what="grad_weight")
    if bias is not None:
        value, mag, depth = expect["bias"]
        close(bias.grad, value.reshape(bias.shape), mag.reshape(bias.shape), depth, what="grad_bias")


@pytest.mark.parametrize("weight_layout", ["out_in", "in_out"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES + [(2, 128, 144)], ids=SHAPE_IDS + ["panels"])
def test_ensemble_layout_matches_float64(shape, bias, weight_layout, ref_grads, close):
    from tvmgroup.weights import weight_shape

    g, k, o = shape
    for rows in ((1,), (13,), (64,), (2, 3)):
        x = torch.randn(g, *rows, k)
        weight = torch.randn(weight_shape(g, k, o, weight_layout))
        b = torch.randn(g, 1, o) if bias else None
        _check_ensemble(x, weight, b, weight_layout, ref_grads, close)


@pytest.mark.parametrize(
    "make",
    [
        lambda g, k: torch.randn(g, 2 * 37, k)[:, ::2],
        lambda g, k: torch.randn(g, 37, 3 * k)[..., k : 2 * k],
        lambda g, k: torch.randn(37, g, k).transpose(0, 1),
        lambda g, k: torch.randn(g, k, 37).transpose(1, 2),  # features strided: copied
    ],
    ids=["rows-strided", "feature-slice", "time-major", "features-strided"],
)
def test_ensemble_layout_strided_inputs(make, ref_grads, close):
    g, k, o = 5, 12, 7
    x = make(g, k).detach()
    x_copy = x.clone()
    _check_ensemble(x, torch.randn(g, k, o), torch.randn(g, 1, o), "in_out", ref_grads, close)
    assert torch.equal(x.detach(), x_copy), "the op wrote to its input"


def test_ensemble_layout_matches_baddbmm(close, ref_grads):
    """What an RL ensemble computes: baddbmm(bias (E, 1, O), x (E, B, K), weight (E, K, O))."""
    e, b, k, o = 5, 33, 20, 24
    x, w, bias = torch.randn(e, b, k), torch.randn(e, k, o), torch.randn(e, 1, o)
    got = grouped_linear(x, w, bias, layout="ensemble", weight_layout="in_out")
    want = torch.baddbmm(bias.double(), x.double(), w.double())
    assert got.shape == (e, b, o)
    assert (got.double() - want).abs().max().item() < 1e-4


def test_ensemble_layout_empty_rows():
    x, w, b = torch.randn(3, 0, 5), torch.randn(3, 4, 5, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    y = grouped_linear(x, w, b, layout="ensemble")
    assert y.shape == (3, 0, 4)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_ensemble_layout_under_vmap(close):
    from torch.func import vmap

    g, k, o = 3, 5, 4
    w, b = torch.randn(g, k, o), torch.randn(g, o)
    xs = torch.randn(6, g, 7, k)
    got = vmap(lambda xi: grouped_linear(xi, w, b, layout="ensemble", weight_layout="in_out"))(xs)
    want = torch.stack([torch.baddbmm(b.double()[:, None], xi.double(), w.double()) for xi in xs])
    assert got.shape == want.shape and (got.double() - want).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------
# layout="shared": one input (..., K) read by every group -> (G, ..., O); "shared_last": the
# same input -> (..., G*O) (it runs on the "heads" kernels)


@pytest.mark.parametrize("layout", ["shared", "shared_last"])
@pytest.mark.parametrize("weight_layout", ["out_in", "in_out"])
@pytest.mark.parametrize("lead", [(1,), (37,), (2, 5), ()], ids=["one-row", "rows", "2d-rows", "1d-x"])
def test_shared_input_matches_float64(lead, weight_layout, layout, ref_grads, close):
    """The first layer of an ensemble: x (B, K) for every member; grad_x sums over them."""
    from tvmgroup.layouts import SHARED_INPUTS
    from tvmgroup.weights import as_out_in, weight_shape

    shared = SHARED_INPUTS[layout]
    g, k, o = 5, 12, 7
    x = torch.randn(*lead, k, requires_grad=True)
    weight = torch.randn(weight_shape(g, k, o, weight_layout), requires_grad=True)
    bias = torch.randn(g, 1, o, requires_grad=True)
    y = grouped_linear(x, weight, bias, layout=layout, weight_layout=weight_layout)
    assert y.shape == ((g, *lead, o) if layout == "shared" else (*lead, g * o))
    grad_y = torch.randn_like(y)
    grad_y_k = grad_y if layout == "shared" else grad_y.unflatten(-1, (g, o))
    x_members = shared.expand(x.detach(), g)
    expect = ref_grads(x_members, as_out_in(weight.detach(), weight_layout), bias.detach().reshape(g, o), grad_y_k,
                       shared.kernel_layout)
    value, mag, depth = expect["y"]
    close(y, value.reshape(y.shape), mag.reshape(y.shape), depth, what="y")
    y.backward(grad_y)
    value, mag, depth = expect["x"]  # per member: the input's gradient is their sum
    close(x.grad, value.sum(shared.group_axis), mag.sum(shared.group_axis), depth + g, what="grad_x")
    value, mag, depth = expect["weight"]
    close(weight.grad, as_out_in(value, weight_layout), as_out_in(mag, weight_layout), depth, what="grad_weight")
    value, mag, depth = expect["bias"]
    close(bias.grad, value.reshape(g, 1, o), mag.reshape(g, 1, o), depth, what="grad_bias")


def _kernel_inputs(monkeypatch) -> list:
    """(op, kernel layout, strides and data pointer of its first tensor) of each kernel call."""
    from tvmgroup import ops

    seen = []
    real = ops._run

    def spy(op, weight, layout, bias, rows, weight_layout, *args):
        seen.append((op, layout, args[0].stride(), args[0].data_ptr()))
        return real(op, weight, layout, bias, rows, weight_layout, *args)

    monkeypatch.setattr(ops, "_run", spy)
    return seen


@pytest.mark.parametrize("layout, kernel_layout, strides", [("shared", "ensemble", (0, 12, 1)),
                                                            ("shared_last", "heads", (12, 0, 1))])
def test_shared_input_is_read_in_place(layout, kernel_layout, strides, monkeypatch):
    """The kernels get the input expanded over the groups (stride 0), not a G-fold copy."""
    seen = _kernel_inputs(monkeypatch)
    x = torch.randn(37, 12)
    grouped_linear(x, torch.randn(5, 12, 7), layout=layout, weight_layout="in_out")
    assert seen == [("forward", kernel_layout, strides, x.data_ptr())]


@pytest.mark.parametrize("layout", ["shared", "shared_last"])
def test_shared_input_errors(layout):
    with pytest.raises(ValueError, match=rf"layout='{layout}' expects x of shape \(..., in_features=12\), read by every group; got x of shape \(37, 10\)"):
        grouped_linear(torch.randn(37, 10), torch.randn(5, 12, 7), layout=layout, weight_layout="in_out")
    with pytest.raises(ValueError, match=r"layout must be one of \('last', 'conv', 'ensemble', 'groups_last', 'heads', 'shared', 'shared_last'\), got 'share'"):
        grouped_linear(torch.randn(37, 12), torch.randn(5, 12, 7), layout="share")


@pytest.mark.parametrize("layout, out_shape", [("shared", (5, 9, 7)), ("shared_last", (9, 35))])
def test_shared_input_layer_and_compile(layout, out_shape):
    from tvmgroup import GroupedLinear

    torch._dynamo.reset()
    layer = GroupedLinear(5, 12, 7, layout=layout, weight_layout="in_out", bias_layout="broadcast")
    x = torch.randn(9, 12)
    compiled = torch.compile(layer, fullgraph=True)
    results = []
    for fn in (layer, compiled):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.pow(2).sum().backward()
        results.append((out.detach(), xi.grad, layer.weight.grad, layer.bias.grad))
    assert results[0][0].shape == out_shape
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# layout="heads": (..., G, K) -> (..., G, O), inputs read in place at any strides


def test_heads_reads_strided_inputs_in_place(monkeypatch, ref_grads, close):
    """Heads sliced out of a bigger tensor (rows and groups strided, features contiguous) go
    to the kernels as they are, forward and backward; the results match float64."""
    seen = _kernel_inputs(monkeypatch)
    g, k, o = 3, 8, 5
    base = torch.randn(13, 2, g + 1, 16)
    x = base[:, 1, 1:, :k].requires_grad_()  # (13, 3, 8), strides (128, 16, 1), 64-byte aligned
    assert x.data_ptr() % 64 == 0
    weight = torch.randn(g, o, k, requires_grad=True)
    bias = torch.randn(g, o, requires_grad=True)
    y = grouped_linear(x, weight, bias, layout="heads")
    assert y.shape == (13, g, o)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert seen[0] == ("forward", "heads", x.stride(), x.data_ptr())
    assert [op for op, *_ in seen] == ["forward", "backward"]
    expect = ref_grads(x.detach(), weight.detach(), bias.detach(), grad_y, "heads")
    close(y, *expect["y"], what="y")
    close(x.grad, *expect["x"], what="grad_x")
    close(weight.grad, *expect["weight"], what="grad_weight")
    close(bias.grad, *expect["bias"], what="grad_bias")


def test_heads_errors():
    with pytest.raises(ValueError, match=r"layout='heads' expects x of shape \(..., groups, in_features\) = \(..., 3, 8\), got x of shape \(13, 24\)"):
        grouped_linear(torch.randn(13, 24), torch.randn(3, 5, 8), layout="heads")


# ---------------------------------------------------------------------------------------------
# layout="groups_last": (..., K, G) -> (..., O, G), e.g. one head per channel of a (B, L, C)
# series; read and written in place

# The two ways its schedules go (tvmgroup.opdefs.vectorises_groups): along the features
# (7 groups, K and O multiples of 8) and across the groups (16 groups); and mixed.
GROUPS_LAST_SHAPES = [(7, 96, 24), (16, 64, 64), (21, 40, 16), (8, 5, 9), (7, 24, 9)]


def _check_groups_last(x, weight, bias, weight_layout, ref_grads, close) -> None:
    """Forward and all gradients against float64, parameters as stored (any bias shape)."""
    from tvmgroup.weights import as_out_in

    g = x.shape[-1]
    for t in (x, weight, bias):
        if t is not None:
            t.requires_grad_()
    y = grouped_linear(x, weight, bias, layout="groups_last", weight_layout=weight_layout)
    grad_y = torch.randn_like(y)
    o = y.shape[-2]
    assert y.shape == (*x.shape[:-2], o, g)
    bias_go = bias.detach().reshape(g, o) if bias is not None else None
    expect = ref_grads(x.detach(), as_out_in(weight.detach(), weight_layout), bias_go, grad_y, "groups_last")
    close(y, *expect["y"], what=f"y {tuple(x.shape)}")
    y.backward(grad_y)
    close(x.grad, *expect["x"], what="grad_x")
    value, mag, depth = expect["weight"]
    close(weight.grad, as_out_in(value, weight_layout), as_out_in(mag, weight_layout), depth, what="grad_weight")
    if bias is not None:
        value, mag, depth = expect["bias"]
        close(bias.grad, value.reshape(bias.shape), mag.reshape(bias.shape), depth, what="grad_bias")


@pytest.mark.parametrize("bias_layout", ["grouped", "broadcast", "flat", None])
@pytest.mark.parametrize("weight_layout", ["out_in", "in_out"])
@pytest.mark.parametrize("shape", GROUPS_LAST_SHAPES, ids=lambda s: "g{}k{}o{}".format(*s))
def test_groups_last_matches_float64(shape, weight_layout, bias_layout, ref_grads, close):
    from tvmgroup.weights import bias_shape, weight_shape

    g, k, o = shape
    weight = torch.randn(weight_shape(g, k, o, weight_layout))
    bias = torch.randn(bias_shape(g, o, bias_layout)) if bias_layout else None
    for lead in [(1,), (13,), (64,), (3, 11)]:
        _check_groups_last(torch.randn(*lead, k, g), weight.clone(), None if bias is None else bias.clone(), weight_layout, ref_grads, close)


def test_groups_last_is_a_per_channel_linear_head(close, ref_grads):
    """DLinear's per-channel heads: x (B, L, C), one nn.Linear(L, P) per channel, y (B, P, C)."""
    b, length, c, p = 9, 48, 7, 24
    heads = [torch.nn.Linear(length, p) for _ in range(c)]
    x = torch.randn(b, length, c)
    want = torch.stack([heads[i](x[:, :, i]) for i in range(c)], dim=-1)
    weight = torch.stack([h.weight.detach() for h in heads])
    bias = torch.stack([h.bias.detach() for h in heads])
    got = grouped_linear(x, weight, bias, layout="groups_last")
    assert got.shape == (b, p, c) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_groups_last_reads_a_contiguous_input_in_place(monkeypatch):
    from tvmgroup import ops

    seen = []
    real = ops._run

    def spy(op, weight, layout, bias, rows, weight_layout, *args):
        seen.append((op, layout, rows, args[0].shape, args[0].data_ptr()))
        return real(op, weight, layout, bias, rows, weight_layout, *args)

    monkeypatch.setattr(ops, "_run", spy)
    x = torch.randn(4, 6, 5, 3)
    grouped_linear(x, torch.randn(3, 2, 5), layout="groups_last")
    assert seen == [("forward", "groups_last", 24, (24, 5, 3), x.data_ptr())]


def test_groups_last_non_contiguous_input(ref_grads, close):
    """A channels-first series viewed (B, L, C): strided, so the op runs on a copy."""
    x = torch.randn(13, 3, 5).transpose(1, 2)  # (B, K=5, G=3) with the groups strided
    assert not x.is_contiguous()
    x_copy = x.clone()
    _check_groups_last(x, torch.randn(3, 4, 5), torch.randn(3, 4), "out_in", ref_grads, close)
    assert torch.equal(x.detach(), x_copy), "the op wrote to its input"


@pytest.mark.parametrize(
    "x_shape, message",
    [
        ((5,), r"expects x of shape \(\.\.\., in_features, groups\) = \(\.\.\., 5, 3\), got x of shape \(5,\)"),
        ((13, 5), r"expects x of shape \(\.\.\., in_features, groups\) = \(\.\.\., 5, 3\), got x of shape \(13, 5\)"),
        ((13, 6, 3), r"= \(\.\.\., 5, 3\), got x of shape \(13, 6, 3\)"),
        ((13, 5, 4), r"= \(\.\.\., 5, 3\), got x of shape \(13, 5, 4\)"),
        ((13, 3, 5), r"got x of shape \(13, 3, 5\) \(its last two dims are \(groups, in_features\): swap them\)"),
        ((13, 15), r"got x of shape \(13, 15\)"),  # a "last" input
    ],
)
def test_groups_last_bad_input(x_shape, message):
    with pytest.raises(ValueError, match=message):
        grouped_linear(torch.randn(x_shape), torch.randn(3, 4, 5), torch.randn(3, 4), layout="groups_last")


def test_groups_last_under_vmap_and_jvp(close, ref_grads):
    from torch.func import jvp, vmap

    g, k, o = 3, 5, 4
    w, b = torch.randn(g, o, k), torch.randn(g, o)
    xs = torch.randn(6, 7, k, g)
    got = vmap(lambda xi: grouped_linear(xi, w, b, layout="groups_last"))(xs)
    want = torch.einsum("vnkg,gok->vnog", xs.double(), w.double()) + b.double().t()
    assert got.shape == want.shape and (got.double() - want).abs().max().item() < 1e-4
    ws = torch.randn(4, g, o, k)  # vmap over stacked weights: one call per member
    got = vmap(lambda wi: grouped_linear(xs[0], wi, b, layout="groups_last"))(ws)
    want = torch.einsum("nkg,vgok->vnog", xs[0].double(), ws.double()) + b.double().t()
    assert (got.double() - want).abs().max().item() < 1e-4
    x, dx, dw, db = xs[0], torch.randn(7, k, g), torch.randn(g, o, k), torch.randn(g, o)
    _, tangent = jvp(lambda x_, w_, b_: grouped_linear(x_, w_, b_, layout="groups_last"), (x, w, b), (dx, dw, db))
    want = torch.einsum("nkg,gok->nog", dx.double(), w.double()) + torch.einsum("nkg,gok->nog", x.double(), dw.double()) + db.double().t()
    assert (tangent.double() - want).abs().max().item() < 1e-4
