"""Kernel objects called directly on NaN-poisoned outputs (every element must be written),
the row-tile tail paths, and the in-process and on-disk kernel caches."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import assert_close
from tvmgroup import kernel as kernel_mod
from tvmgroup.compute import OpSpec
from tvmgroup.choice import default_choice
from tvmgroup.kernel import KERNELS, Kernel, KernelCache, build_kernel
from tvmgroup.lookup import kernel_for
from tvmgroup.target import cpu_target

G, K, O = 3, 5, 4


def _kernel(op: str, layout: str, bias: bool = True) -> Kernel:
    return kernel_for(OpSpec(op, G, K, O, layout=layout, bias=bias), cpu_target())


def _poisoned(*shape: int) -> torch.Tensor:
    return torch.full(shape, float("nan"))


def _rows_shape(layout: str, rows: int, features: int) -> tuple[int, ...]:
    """Kernel layout: (N, G, F) for "last"; (B=2, G, F, L=rows) for "conv"; (G, N, F) for
    "ensemble"; (N, F, G) for "groups_last"."""
    if layout == "ensemble":
        return (G, rows, features)
    if layout == "groups_last":
        return (rows, features, G)
    return (rows, G, features) if layout == "last" else (2, G, features, rows)


def _user(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A kernel-layout tensor as the user's (N, G*F), (B, G*F, L), (G, N, F) or (N, F, G)."""
    if layout in ("ensemble", "groups_last"):
        return t
    if layout == "last":
        return t.reshape(t.shape[0], -1)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _expect(x, weight, bias, grad_y, layout, ref_grads):
    return ref_grads(_user(x, layout), weight, bias, _user(grad_y, layout), layout)


def _row_counts(kernel: Kernel, op: str, layout: str) -> list[int]:
    t = kernel.row_tile
    if op == "grad_weight" and layout in ("last", "ensemble", "groups_last"):
        return [1, t - 1, t, t + 1, 200]
    return [1, t - 1, t, t + 1, 2 * t + 3]


@pytest.mark.parametrize("layout", ["last", "conv", "ensemble", "groups_last"])
def test_cpu_kernels_have_a_row_tile_and_a_tail(layout):
    for op in ("forward", "grad_input", "grad_weight"):
        kernel = _kernel(op, layout)
        if (layout, op) == ("groups_last", "grad_weight"):
            # Vectorised across its 3 groups, it sums every row in one sweep: any row count.
            assert kernel.row_tile == 1 and kernel.tail is None
            continue
        assert kernel.row_tile > 1, f"{op}/{layout}: the CPU default schedule tiles rows"
        assert kernel.tail is not None


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layout", ["last", "conv", "ensemble", "groups_last"])
def test_forward_kernel_writes_every_element(layout, bias, ref_grads, close):
    kernel = _kernel("forward", layout, bias)
    for rows in _row_counts(kernel, "forward", layout):
        x = torch.randn(_rows_shape(layout, rows, K))
        weight, b = torch.randn(G, O, K), torch.randn(G, O) if bias else None
        y = _poisoned(*_rows_shape(layout, rows, O))
        kernel(x, weight, *([b] if bias else []), y)
        expect = _expect(x, weight, b, torch.randn_like(y), layout, ref_grads)["y"]
        close(_user(y, layout), *expect, what=f"forward {layout} rows={rows}")


@pytest.mark.parametrize("layout", ["last", "conv", "ensemble", "groups_last"])
def test_grad_input_kernel_writes_every_element(layout, ref_grads, close):
    kernel = _kernel("grad_input", layout, bias=False)
    for rows in _row_counts(kernel, "grad_input", layout):
        grad_y = torch.randn(_rows_shape(layout, rows, O))
        weight = torch.randn(G, O, K)
        x = torch.randn(_rows_shape(layout, rows, K))
        grad_x = _poisoned(*x.shape)
        kernel(grad_y, weight, grad_x)
        expect = _expect(x, weight, None, grad_y, layout, ref_grads)["x"]
        close(_user(grad_x, layout), *expect, what=f"grad_input {layout} rows={rows}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layout", ["last", "conv", "ensemble", "groups_last"])
def test_grad_weight_kernel_writes_every_element(layout, bias, ref_grads, close):
    kernel = _kernel("grad_weight", layout, bias)
    for rows in _row_counts(kernel, "grad_weight", layout):
        grad_y = torch.randn(_rows_shape(layout, rows, O))
        x = torch.randn(_rows_shape(layout, rows, K))
        weight = torch.randn(G, O, K)
        b = torch.randn(G, O) if bias else None
        outs = [_poisoned(G, O, K)] + ([_poisoned(G, O)] if bias else [])
        kernel(grad_y, x, *outs)
        expect = _expect(x, weight, b, grad_y, layout, ref_grads)
        close(outs[0], *expect["weight"], what=f"grad_weight {layout} rows={rows}")
        if bias:
            close(outs[1], *expect["bias"], what=f"grad_bias {layout} rows={rows}")


# "groups_last" schedules each op one of two ways (tvmgroup.opdefs.vectorises_groups): lanes
# across the groups (G a multiple of 8, or features that fill no vector), or the features
# vectorised on rows packed features innermost per tile. Shapes (G, K, O) for each:
GROUPS_LAST_SHAPES = {
    "features": (3, 16, 8),  # every op vectorises K or O; grad_weight sums row chunks
    "lanes": (8, 5, 12),  # every op vectorises the 8 groups
    "mixed": (7, 24, 9),  # forward in lanes (O=9), grad_input and grad_weight along K=24
    "wide-groups": (48, 8, 16),  # 3 vectors of 16 groups
}


@pytest.mark.parametrize("shape", list(GROUPS_LAST_SHAPES.values()), ids=list(GROUPS_LAST_SHAPES))
def test_groups_last_kernels_write_every_element(shape, ref_grads):
    g, k, o = shape
    specs = {op: OpSpec(op, g, k, o, layout="groups_last") for op in ("forward", "grad_input", "grad_weight")}
    kernels = {op: kernel_for(spec, cpu_target()) for op, spec in specs.items()}
    tiles = {kernel.row_tile for kernel in kernels.values()}
    for rows in sorted({1, 7, 97, 200, *(t + 1 for t in tiles), *(3 * t - 1 for t in tiles)}):
        x, grad_y = torch.randn(rows, k, g), torch.randn(rows, o, g)
        weight, bias = torch.randn(g, o, k), torch.randn(g, o)
        y, grad_x = _poisoned(rows, o, g), _poisoned(rows, k, g)
        grad_w, grad_b = _poisoned(g, o, k), _poisoned(g, o)
        kernels["forward"](x, weight, bias, y)
        kernels["grad_input"](grad_y, weight, grad_x)
        kernels["grad_weight"](grad_y, x, grad_w, grad_b)
        want = ref_grads(x, weight, bias, grad_y, "groups_last")
        for name, got in (("y", y), ("x", grad_x), ("weight", grad_w), ("bias", grad_b)):
            assert_close(got, *want[name], what=f"{shape} rows={rows} {name}")


@pytest.mark.parametrize("serial", [True, False], ids=["serial", "parallel"])
def test_tail_rows_off_the_buffer_alignment_run_on_an_aligned_copy(serial, ref_grads):
    """A row split's tail starts mid-tensor (here 4 rows of 7 floats: 112 bytes in), off the
    64 bytes TVM compiles buffers for; LLVM may store to it with aligned vector moves (which
    the serial grad_input build of this shape does), so the tail runs on an aligned copy."""
    g, k, o, rows = 1, 7, 6, 6
    spec = OpSpec("grad_input", g, k, o, layout="groups_last")
    kernel = build_kernel(spec, cpu_target(), default_choice(spec, cpu_target()), serial=serial)
    assert kernel.row_tile == 4 and (rows - rows % 4) * k * g * 4 % 64 != 0
    grad_y, weight = torch.randn(rows, o, g), torch.randn(g, o, k)
    grad_x = _poisoned(rows, k, g)
    kernel(grad_y, weight, grad_x)
    want = ref_grads(torch.zeros(rows, k, g), weight, None, grad_y, "groups_last")
    assert_close(grad_x, *want["x"], what="grad_x")


def test_groups_last_picks_lanes_or_features_by_shape():
    from tvmgroup.layouts import layout_of
    from tvmgroup.opdefs import GROUPS_PACK, vectorises_groups

    lay = layout_of("groups_last")
    assert vectorises_groups(lay, 16, 64) and vectorises_groups(lay, 7, 9)
    assert not vectorises_groups(lay, 7, 24) and not vectorises_groups(lay, 21, 96)
    assert not vectorises_groups(layout_of("last"), 16, 9)
    from tvmgroup.compute import prim_func

    assert GROUPS_PACK in prim_func(OpSpec("forward", 16, 64, 64, layout="groups_last")).script()
    assert GROUPS_PACK not in prim_func(OpSpec("forward", 7, 96, 24, layout="groups_last")).script()


def test_kernel_for_reuses_the_compiled_kernel():
    assert _kernel("forward", "last") is _kernel("forward", "last")
    assert _kernel("forward", "last") is not _kernel("forward", "last", bias=False)


def test_build_kernel_with_the_default_choice(ref_grads, close):
    spec = OpSpec("forward", 2, 3, 5, layout="last", bias=True)
    choice = default_choice(spec, cpu_target())
    assert choice.origin == "default"
    kernel = build_kernel(spec, cpu_target(), choice)
    assert kernel.spec == spec and kernel.row_tile > 1 and kernel.tail is not None
    rows = kernel.row_tile + 1
    x, weight, b = torch.randn(rows, 2, 3), torch.randn(2, 5, 3), torch.randn(2, 5)
    y = _poisoned(rows, 2, 5)
    kernel(x, weight, b, y)
    expect = ref_grads(x.reshape(rows, 6), weight, b, torch.randn(rows, 10), "last")["y"]
    close(y.reshape(rows, 10), *expect, what="build_kernel forward")


# ---------------------------------------------------------------------------------------------
# disk cache

_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import tvmgroup.kernel as km
    if sys.argv[1] == "load-only":
        def refuse(*args, **kwargs):
            raise AssertionError("compiled although a cached kernel was on disk")
        km.build_kernel = refuse
    from tvmgroup import grouped_linear
    torch.manual_seed(0)
    x, w, b = (torch.randn(*s, requires_grad=True) for s in [(45, 15), (3, 4, 5), (3, 4)])
    y = grouped_linear(x, w, b)
    y.backward(torch.ones_like(y))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = (torch.einsum("ngk,gok->ngo", x64.view(45, 3, 5), w64) + b64).reshape(45, 12)
    ref.backward(torch.ones_like(ref))
    pairs = [(y, ref), (x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)]
    err = max((got.double() - want).abs().max().item() for got, want in pairs)
    print("ERR", err)
    sys.exit(0 if err < 1e-4 else 1)
    """
)


def _run_script(home, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TVMGROUP_HOME=str(home), TVMGROUP_DISK_CACHE="1")
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], env=env, capture_output=True, text=True, timeout=300
    )


def _cached_files(home) -> dict[str, int]:
    return {
        str(p.relative_to(home)): p.stat().st_mtime_ns
        for p in home.rglob("*")
        if p.is_file() and p.suffix in (".so", ".json")
    }


def test_disk_cache_is_written_then_loaded_by_another_process(isolated_home):
    first = _run_script(isolated_home, "build")
    assert first.returncode == 0, first.stdout + first.stderr
    files = _cached_files(isolated_home)
    assert any(f.endswith("-main.so") for f in files), files
    assert any(f.endswith("-tail.so") for f in files), files
    metas = [f for f in files if f.endswith(".json")]
    # A training step where x and the parameters need gradients: forward and the fused backward.
    for key in ("forward-last-g3-k5-o4-float32-bias", "backward-last-g3-k5-o4-float32-bias"):
        assert any(key in f for f in metas), (key, metas)
    for meta in metas:
        assert json.loads((isolated_home / meta).read_text())["row_tile"] >= 1

    second = _run_script(isolated_home, "load-only")
    assert second.returncode == 0, second.stdout + second.stderr
    assert _cached_files(isolated_home) == files, "the second process rewrote or added cached kernels"


def test_session_home_is_private(tvmgroup_home):
    """conftest points TVMGROUP_HOME at a temporary directory: kernels land there."""
    from tvmgroup.paths import home, kernel_cache_dir

    assert home() == tvmgroup_home and kernel_cache_dir().is_relative_to(tvmgroup_home)
    _kernel("forward", "last")
    assert list(tvmgroup_home.rglob("*forward-last-g3-k5-o4-float32-bias-*.json"))


def _spec_for_cache() -> OpSpec:
    return OpSpec("forward", 2, 3, 5, layout="last", bias=False)


def _check_kernel(kernel: Kernel, ref_grads, close) -> None:
    rows = 2 * kernel.row_tile + 1
    x, weight = torch.randn(rows, 2, 3), torch.randn(2, 5, 3)
    y = _poisoned(rows, 2, 5)
    kernel(x, weight, y)
    expect = ref_grads(x.reshape(rows, 6), weight, None, torch.randn(rows, 10), "last")["y"]
    close(y.reshape(rows, 10), *expect, what="reloaded kernel")


@pytest.mark.parametrize("corrupt", ["main.so", "tail.so", "json-garbage", "json-missing-key"])
def test_corrupt_cached_kernel_is_rebuilt_with_a_warning(corrupt, isolated_home, caplog, ref_grads, close):
    spec, target = _spec_for_cache(), cpu_target()
    choice = default_choice(spec, target)
    KernelCache().get(spec, target, choice)  # builds and saves
    metas = list(isolated_home.rglob("*.json"))
    assert len(metas) == 1
    stem = str(metas[0])[: -len(".json")]
    if corrupt.endswith(".so"):
        os.remove(f"{stem}-{corrupt}")  # a new inode: never one this process has loaded
        with open(f"{stem}-{corrupt}", "wb") as f:
            f.write(b"\x7fELF this is not a shared library")
    elif corrupt == "json-garbage":
        metas[0].write_text("{not json")
    else:
        metas[0].write_text(json.dumps({"spec": spec.key}))

    with caplog.at_level(logging.WARNING, logger="tvmgroup.kernel"):
        rebuilt = KernelCache().get(spec, target, choice)
    assert any("unusable cached kernel" in r.getMessage() for r in caplog.records), caplog.text
    _check_kernel(rebuilt, ref_grads, close)

    # The rebuild replaced the bad file: a third cache loads it without compiling.
    caplog.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel_mod, "build_kernel", _refuse_to_build)
        with caplog.at_level(logging.WARNING, logger="tvmgroup.kernel"):
            loaded = KernelCache().get(spec, target, choice)
    assert not caplog.records, caplog.text
    _check_kernel(loaded, ref_grads, close)


def _saved_entry(isolated_home):
    spec, target = _spec_for_cache(), cpu_target()
    choice = default_choice(spec, target)
    KernelCache().get(spec, target, choice)  # builds and saves
    (meta,) = list(isolated_home.rglob("*.json"))
    return spec, target, choice, str(meta)[: -len(".json")]


@pytest.mark.parametrize("tamper", ["another-library", "row-tile", "symlink", "foreign-owner", "key"])
def test_tampered_cache_entry_is_never_loaded(tamper, isolated_home, caplog, ref_grads, close):
    """Whatever was changed after the entry was written, the kernel is rebuilt, not loaded."""
    spec, target, choice, stem = _saved_entry(isolated_home)
    meta_path = f"{stem}.json"
    meta = json.loads(open(meta_path).read())
    if tamper == "another-library":  # a valid library, of another kernel
        other = OpSpec("forward", 3, 3, 5, layout="last", bias=False)
        KernelCache().get(other, target, default_choice(other, target))
        (other_meta,) = [m for m in isolated_home.rglob("*.json") if str(m) != meta_path]
        os.remove(f"{stem}-main.so")
        os.link(str(other_meta)[: -len(".json")] + "-main.so", f"{stem}-main.so")
    elif tamper == "row-tile":
        meta["row_tile"] = 1 if meta["row_tile"] != 1 else 8
        open(meta_path, "w").write(json.dumps(meta))
    elif tamper == "symlink":
        os.rename(f"{stem}-main.so", f"{stem}-elsewhere.so")
        os.symlink(f"{stem}-elsewhere.so", f"{stem}-main.so")
    elif tamper == "foreign-owner":
        if os.getuid() != 0:
            pytest.skip("only root can give a file to another user")
        os.chown(f"{stem}-main.so", 12345, 12345)
    else:
        meta["key"] = "another target|another schedule"
        open(meta_path, "w").write(json.dumps(meta))
    built = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel_mod, "build_kernel", lambda *a, **k: built.append(1) or build_kernel(*a, **k))
        with caplog.at_level(logging.WARNING, logger="tvmgroup.kernel"):
            kernel = KernelCache().get(spec, target, choice)
    assert built == [1], "the tampered entry was loaded"
    assert any("unusable cached kernel" in r.getMessage() for r in caplog.records), caplog.text
    _check_kernel(kernel, ref_grads, close)


def test_cache_shared_with_others_is_not_used(isolated_home, ref_grads, close):
    """A cache directory others can write to: kernels are built and kept in memory only."""
    spec, target, choice, stem = _saved_entry(isolated_home)
    os.chmod(os.path.dirname(stem), 0o777)
    cache = KernelCache()
    with pytest.warns(UserWarning, match="writable by others"):
        kernel = cache.get(spec, target, choice)
    _check_kernel(kernel, ref_grads, close)


def test_saving_leaves_no_temporary_files(isolated_home):
    _saved_entry(isolated_home)
    names = sorted(p.name for p in isolated_home.rglob("*") if p.is_file())
    assert all(n.endswith((".so", ".json", ".lock")) for n in names), names
    assert not [p for p in isolated_home.rglob(".tmp-*")]


def _refuse_to_build(*args, **kwargs):
    raise AssertionError("compiled although a valid cached kernel was on disk")


def test_disk_cache_can_be_disabled(isolated_home, monkeypatch):
    monkeypatch.setenv("TVMGROUP_DISK_CACHE", "0")
    spec, target = _spec_for_cache(), cpu_target()
    KernelCache().get(spec, target, default_choice(spec, target))
    assert not list(isolated_home.rglob("*.so"))


def test_unwritable_home_keeps_kernels_in_memory(tmp_path, monkeypatch, ref_grads, close):
    """A home that cannot hold the cache (here a file, so this holds for root too): a warning,
    and the kernel still serves."""
    home = tmp_path / "home"
    home.write_text("not a directory")
    monkeypatch.setenv("TVMGROUP_HOME", str(home))
    spec, target = _spec_for_cache(), cpu_target()
    cache = KernelCache()
    with pytest.warns(UserWarning, match="kept in memory only"):
        kernel = cache.get(spec, target, default_choice(spec, target))
    _check_kernel(kernel, ref_grads, close)
    import warnings

    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        cache.get(spec, target, default_choice(spec, target), serial=True)
    assert not [w for w in later if "kept in memory only" in str(w.message)]  # warned once


def test_kernel_cache_clear_forgets_kernels():
    cache = KernelCache()
    spec, target = _spec_for_cache(), cpu_target()
    choice = default_choice(spec, target)
    first = cache.get(spec, target, choice)
    assert cache.get(spec, target, choice) is first
    cache.clear()
    assert cache.get(spec, target, choice) is not first


def test_global_cache_is_a_kernel_cache():
    assert isinstance(KERNELS, KernelCache)


# -- tensors past 32-bit indexing ---------------------------------------------------------------


def test_kernels_index_with_32_bit_integers():
    """Why large tensors are chunked: the kernels' row extent (and so every index) is int32."""
    from tvmgroup.layouts import layout_of

    for layout in ("last", "conv", "ensemble", "groups_last"):
        dims = [d for d in layout_of(layout).row_dims(None) if not isinstance(d, int)]
        assert dims and all(str(d.ty) == "int32" for d in dims)


@pytest.mark.parametrize("layout", ["last", "conv", "ensemble", "groups_last"])
def test_tensors_past_the_index_limit_run_in_chunks(monkeypatch, layout, ref_grads):
    from tvmgroup import ops

    calls = []
    fitting = Kernel._call_fitting
    axis = 1 if layout == "ensemble" else 0  # the chunk axis: rows, or conv's batch

    def record(self, *a):
        calls.append(a[0].shape[axis])
        return fitting(self, *a)

    monkeypatch.setattr(Kernel, "_call_fitting", record)
    monkeypatch.setattr(kernel_mod, "MAX_KERNEL_ELEMENTS", 1000)  # ~1000 / (G * 5) rows per call
    # "last", "ensemble": 203 rows; "conv": 41 batch items of length 8 (the chunks split the batch)
    def shape(features):
        return {"last": (203, G, features), "conv": (41, G, features, 8), "ensemble": (G, 203, features),
                "groups_last": (203, features, G), "heads": (203, G, features)}[layout]

    x, grad_y = torch.randn(shape(K)), torch.randn(shape(O))
    weight, bias = torch.randn(G, O, K), torch.randn(G, O)
    ux, ugy = _user(x, layout), _user(grad_y, layout)
    got = {
        "y": ops.forward(ux, weight, bias, layout),
        "x": ops.grad_input(ugy, weight, layout),
        **dict(zip(("weight", "bias"), ops.grad_weight(ugy, ux, weight, True, layout))),
    }
    assert len(calls) > 3 * 3  # each op in several calls
    assert sum(calls) == 3 * shape(K)[axis]  # every row (batch item) in exactly one call
    want = _expect(x, weight, bias, grad_y, layout, ref_grads)
    for name, value in got.items():
        ref, mag, depth = want[name]
        assert_close(value, ref, mag, depth, name)


def test_ensemble_views_past_the_index_limit(monkeypatch, ref_grads):
    """What counts is how far a view reaches, not its element count: rows sliced from a bigger
    batch reach further than their elements (their chunks run on compact copies); an input
    expanded over the groups (stride 0) reaches one group's rows (its chunks are read in place)."""
    from tvmgroup import ops

    group_strides = []
    fitting = Kernel._call_fitting

    def record(self, *a):
        x = a[1] if self.spec.op == "grad_weight" else a[0]  # (grad_y, x, ...) or (x, ...)
        group_strides.append(x.stride(0))
        return fitting(self, *a)

    monkeypatch.setattr(Kernel, "_call_fitting", record)
    monkeypatch.setattr(kernel_mod, "MAX_KERNEL_ELEMENTS", 1000)
    weight, bias = torch.randn(G, O, K), torch.randn(G, O)
    sliced = torch.randn(G, 1000, K)[:, 128:328]  # 3000 elements reaching over 11000 (64-byte aligned start)
    shared = torch.randn(203, K).expand(G, 203, K)  # 3045 elements reaching 1015
    for x, copied in ((sliced, True), (shared, False)):
        group_strides.clear()
        grad_y = torch.randn(G, x.shape[1], O)
        got = {
            "y": ops.forward(x, weight, bias, "ensemble"),
            **dict(zip(("weight", "bias"), ops.grad_weight(grad_y, x, weight, True, "ensemble"))),
        }
        assert len(group_strides) > 2
        assert all((stride != 0) == copied for stride in group_strides), group_strides
        want = ref_grads(x.contiguous(), weight, bias, grad_y, "ensemble")
        for name, value in got.items():
            ref, mag, depth = want[name]
            assert_close(value, ref, mag, depth, name)


def test_a_row_past_the_index_limit_is_a_clear_error(monkeypatch):
    from tvmgroup import ops

    monkeypatch.setattr(kernel_mod, "MAX_KERNEL_ELEMENTS", 10)
    with pytest.raises(ValueError, match="one row holds 15 elements"):
        ops.forward(torch.randn(4, G * K), torch.randn(G, O, K), None, "last")


@pytest.mark.slow
def test_input_of_over_2_31_elements_forward():
    """N = 2**20 + 64 rows, G = 2, K = 1024: x has more than 2**31 elements (8.6 GB)."""
    psutil = pytest.importorskip("psutil")
    if psutil.virtual_memory().available < 14 * 2**30:
        pytest.skip("needs 14 GiB of free memory")
    from tvmgroup import ops

    n, g, k = 2**20 + 64, 2, 1024
    gen = torch.Generator().manual_seed(0)
    x = torch.empty(n, g * k)
    for start in range(0, n, 1 << 16):
        x[start:start + (1 << 16)].normal_(generator=gen)
    weight, bias = torch.randn(g, 1, k), torch.randn(g, 1)
    y = ops.forward(x, weight, bias, "last")
    for start in (0, 2**19, n - 1000):  # the start, the middle and the end, in float64
        rows = x[start:start + 1000].double().view(-1, g, k)
        want = torch.einsum("ngk,gok->ngo", rows, weight.double()) + bias.double()
        torch.testing.assert_close(y[start:start + 1000].double(), want.reshape(-1, g), rtol=0, atol=1e-3)
    del x


@pytest.mark.parametrize("weight_layout", ["out_in", "in_out"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layout", ["last", "conv", "ensemble"])
def test_fused_backward_kernel_writes_every_element(layout, bias, weight_layout, ref_grads, close):
    """grad_x (row-indexed: the row split narrows it) and grad_weight, grad_bias (sums over
    rows: the tail's part is added) from one kernel, at row counts off the row tile."""
    from tvmgroup.weights import as_out_in, weight_shape

    kernel = kernel_for(OpSpec("backward", G, K, O, layout=layout, bias=bias, weight_layout=weight_layout), cpu_target())
    assert kernel.row_tile > 1 and kernel.tail is not None
    t = kernel.row_tile
    for rows in sorted({1, 13, 97, 256, t - 1, t + 1, 2 * t + 3}):
        grad_y = torch.randn(_rows_shape(layout, rows, O))
        x = torch.randn(_rows_shape(layout, rows, K))
        weight = torch.randn(weight_shape(G, K, O, weight_layout))
        outs = [_poisoned(*x.shape), _poisoned(*weight.shape)] + ([_poisoned(G, O)] if bias else [])
        kernel(grad_y, x, weight, *outs)
        b = torch.randn(G, O) if bias else None
        expect = _expect(x, as_out_in(weight, weight_layout), b, grad_y, layout, ref_grads)
        what = f"backward {layout} {weight_layout} rows={rows}"
        close(_user(outs[0], layout), *expect["x"], what=f"{what} grad_x")
        close(as_out_in(outs[1], weight_layout), *expect["weight"], what=f"{what} grad_weight")
        if bias:
            close(outs[2], *expect["bias"], what=f"{what} grad_bias")
