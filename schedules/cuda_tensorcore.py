"""The CUDA tensor-core (wmma) schedule template, for float16 and bfloat16.

It follows TVM's own tensor-core matmul rule (``tvm.s_tir.dlight.gpu.MatmulTensorization``)
with its tile sizes turned into knobs:

1. ``reindex`` and ``transform_layout`` bring the op's main block, whatever the op and
   layout, to the batched form ``C[s, i, j] += A[s, i, k] * B[s, j, k]`` (s: the groups).
2. ``pad_einsum`` pads i, j and k: G/K/O dims to a multiple of 16, the rows to a multiple
   of :data:`ROWS_PAD`. The padding is zero-filled as the tiles are read, so every row count
   (1, 7, 4099) runs through the same kernel with no tail build, and sizes that are not
   multiples of 16 (K = O = 100) run on tensor cores too.
3. A thread block computes a ``(warps_i * frags_i * 16) x (warps_j * frags_j * 16)`` tile of
   one group; each warp holds ``frags_i x frags_j`` float32 accumulator fragments. Each
   reduction step stages ``frags_k * 16`` columns of A and B in shared memory (pipelined),
   loads them into fragments and runs ``mma_sync``; the accumulators go back through shared
   memory to the cast stage (which adds the bias, forward) and out to global memory.

Padding is fixed (it does not depend on sampled tiles), and the rows' tiles are categorical
choices that divide it, so tuned choices replay onto any row count. The op's other
reduction (grad_bias, a plain row sum) uses the SIMT template's scheme.
"""

from __future__ import annotations

import functools

from tvm import s_tir
from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumer_chain, auto_inline_producers, get_index_map

from .cuda_simt import one_thread_per_output
from .knobs import Knobs
from .roles import loop_roles

FRAG = 16  # wmma tile: 16 x 16 x 16
WARP = 32
DTYPES = ("float16", "bfloat16")
ROWS_PAD = 128  # the rows are padded to this; it must be a multiple of every row tile
WARPS_ROWS = (1, 2, 4)  # warps along the rows
FRAGS_ROWS = (1, 2)  # fragments per warp along the rows (warps * frags * 16 <= ROWS_PAD)
FRAGS_K_ROWS = (1, 2, 4, 8)  # fragments per reduction step when the rows are the reduction
VECTORS = (2, 4)  # elements per thread in a global -> shared copy (8 would emit
# invalid CUDA where the copy gathers along a strided axis)
SCOPE = "shared.dyn"  # operand tiles
# The output tile lives in static shared memory: in the same scope as the operand tiles,
# TVM 0.27's storage rewrite would reuse their (16-bit) memory for it and then reject the
# float32 pointer the wmma store takes.
OUT_SCOPE = "shared"


@functools.lru_cache(maxsize=None)
def intrinsics(dtype: str) -> dict[str, str]:
    """Registers (once) and names the wmma intrinsics for ``dtype`` inputs and float32 sums.

    TVM registers float16 wmma intrinsics only; its generators take any dtype, so this
    registers the set for either dtype under names of its own.
    """
    if dtype not in DTYPES:
        raise ValueError(f"tensor cores here take {DTYPES}, got {dtype!r}")
    # Imported here, not at module level: importing TVM's tensor_intrin package registers
    # every intrinsic TVM ships and takes about a minute, a cost only half-type CUDA
    # schedules should pay.
    from tvm.s_tir.tensor_intrin.cuda import (
        get_wmma_fill_intrin,
        get_wmma_load_intrin,
        get_wmma_store_intrin,
        get_wmma_sync_intrin,
    )

    names = {
        "load_a": f"tvmgroup_wmma_load_a_{dtype}",
        "load_b": f"tvmgroup_wmma_load_b_trans_{dtype}",
        "compute": f"tvmgroup_wmma_sync_{dtype}_f32_trans",
        "init": "tvmgroup_wmma_fill_f32",
        "store": "tvmgroup_wmma_store_f32",
    }
    register = s_tir.TensorIntrin.register
    register(names["load_a"], *get_wmma_load_intrin(FRAG, FRAG, FRAG, dtype, SCOPE, False, False), override=True)
    register(names["load_b"], *get_wmma_load_intrin(FRAG, FRAG, FRAG, dtype, SCOPE, True, True), override=True)
    register(names["compute"], *get_wmma_sync_intrin(FRAG, FRAG, FRAG, dtype, "float32", True), override=True)
    register(names["init"], *get_wmma_fill_intrin(FRAG, FRAG, FRAG, "float32"), override=True)
    register(names["store"], *get_wmma_store_intrin(FRAG, FRAG, FRAG, "float32", OUT_SCOPE), override=True)
    return names


def uses_tensor_cores(sch: s_tir.Schedule) -> bool:
    """Whether the op in ``sch`` stores a dtype this template serves."""
    return str(sch.mod["main"].params[0].dtype) in DTYPES


def schedule_tensorcore(sch: s_tir.Schedule, op: str, layout: str, bias: bool, knobs: Knobs) -> None:
    """Applies the template to the op's PrimFunc in ``sch`` (float16 or bfloat16)."""
    names = intrinsics(str(sch.mod["main"].params[0].dtype))
    roles = loop_roles(op, layout, bias)
    for pack in roles.present_packs(sch):
        sch.compute_inline(sch.get_sblock(pack))
    for name in roles.extra_blocks:  # grad_bias: a plain row sum, no matmul
        one_thread_per_output(sch, name, knobs)
    main = sch.get_sblock(roles.block)

    # 1. Normalise to C[s, i, j] += A[s, i, k] * B[s, j, k].
    reindex_a = sch.reindex(main, ("read", 0))
    reindex_b = sch.reindex(main, ("read", 1))
    reindex_c = sch.reindex(main, ("write", 0))
    maps = get_index_map(sch.get(main))
    if maps is None:
        raise ValueError(f"{roles.block} of {op} ({layout}) is not a matmul this template can tile")
    matmul_map, a_map, b_map, c_map = maps
    sch.transform_layout(reindex_a, ("write", 0), a_map)
    sch.transform_layout(reindex_b, ("write", 0), b_map)
    sch.transform_layout(reindex_c, ("read", 0), c_map)
    sch.transform_block_layout(main, matmul_map)

    # 2. Pad. Which of i, j, k runs over the rows follows from the op, not from whether the
    # extent is symbolic: tuning sees a fixed row count, and its choices must replay.
    rows = [op != "grad_weight", False, op == "grad_weight"]
    sch.pad_einsum(main, [1] + [ROWS_PAD if r else FRAG for r in rows])

    # 3. Tiles.
    batch, i, j, k = sch.get_loops(main)
    i, i_inner = sch.split(i, [None, FRAG])
    j, j_inner = sch.split(j, [None, FRAG])
    k, k_inner = sch.split(k, [None, FRAG])
    sch.reorder(i, j, k, i_inner, j_inner, k_inner)
    inner = main
    outer = sch.blockize(i_inner)
    i0, i1, i2 = _tile(sch, knobs, i, rows[0], default=(2, 2))
    j0, j1, j2 = _tile(sch, knobs, j, rows[1], default=(2, 2))
    k0, k1 = _tile_reduction(sch, knobs, k, rows[2])
    sch.reorder(batch, i0, j0, i1, j1, k0, k1, i2, j2)
    sch.bind(batch, "blockIdx.z")  # fused with the symbolic tiles it would need a predicate
    sch.bind(sch.fuse(i0, j0), "blockIdx.x")
    ty = sch.fuse(i1, j1)
    sch.bind(ty, "threadIdx.y")
    steps = int(sch.get(k1).extent)
    if steps > 1 and steps % 2 == 0:
        # Prefetch the next step's tiles while this one computes, and the next fragments
        # while this mma runs (TVM's own rule). The stage lists assume k1 is a pipelined loop;
        # odd fragment pipelines lose a fragment's declaration in lowering.
        sch.annotate(k0, "software_pipeline_order", [0, 3, 1, 4, 5, 2, 6])
        sch.annotate(k0, "software_pipeline_stage", [0, 0, 0, 0, 0, 1, 1])
        sch.annotate(k1, "software_pipeline_order", [0, 1, 2])
        sch.annotate(k1, "software_pipeline_stage", [0, 0, 1])
    elif steps > 1:
        # Odd k1: only the shared-memory tiles are double-buffered (global loads of A and B
        # through registers, then the fragment loop one step behind).
        sch.annotate(k0, "software_pipeline_order", [0, 2, 1, 3, 4])
        sch.annotate(k0, "software_pipeline_stage", [0, 0, 0, 0, 1])

    # 4. Global -> shared, shared -> fragments, fragments -> shared -> global.
    vector = knobs.inner_choice(sch, VECTORS, 4)
    a_shared = _fetch_to_shared(sch, outer, 0, k0, ty, vector)
    b_shared = _fetch_to_shared(sch, outer, 1, k0, ty, vector)
    auto_inline_producers(sch, a_shared)
    auto_inline_producers(sch, b_shared)
    a_frag = sch.cache_read(outer, 0, "wmma.matrix_a")
    b_frag = sch.cache_read(outer, 1, "wmma.matrix_b")
    sch.compute_at(a_frag, k1)
    sch.compute_at(b_frag, k1)
    to_global = sch.cache_write(outer, 0, OUT_SCOPE)
    sch.storage_align(to_global, 0, -2, 16, 4)
    store = sch.cache_write(outer, 0, "wmma.accumulator")
    sch.reverse_compute_at(store, ty)
    sch.reverse_compute_at(to_global, ty)
    init = sch.decompose_reduction(outer, k0)

    for frag, intrin in ((a_frag, names["load_a"]), (b_frag, names["load_b"]), (store, names["store"])):
        _tensorize_tile(sch, frag, intrin, unroll=frag is not store)
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], names["init"])
    sch.tensorize(sch.get_loops(inner)[-3], names["compute"])

    auto_inline_consumer_chain(sch, to_global)
    fused = sch.fuse(*sch.get_loops(to_global)[-2:])
    _, tx, vec = sch.split(fused, [None, WARP, 4])
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)


def _tile(sch: s_tir.Schedule, knobs: Knobs, loop, rows: bool, default: tuple[int, int]):
    """Splits a loop of 16-wide fragments into (blocks, warps, fragments per warp)."""
    if rows:
        warps = knobs.inner_choice(sch, WARPS_ROWS, default[0])
        frags = knobs.inner_choice(sch, FRAGS_ROWS, default[1])
        return sch.split(loop, [None, warps, frags])
    return sch.split(loop, knobs.perfect_tile(sch, loop, 3, 4, default))


def _tile_reduction(sch: s_tir.Schedule, knobs: Knobs, loop, rows: bool):
    """Splits the reduction's fragments into (steps, fragments staged per step)."""
    if rows:
        return sch.split(loop, [None, knobs.inner_choice(sch, FRAGS_K_ROWS, 4)])
    return sch.split(loop, knobs.perfect_tile(sch, loop, 2, 8, (8,)))


def _fetch_to_shared(sch: s_tir.Schedule, block, index: int, at, ty, vector):
    """Stages operand ``index`` in shared memory at ``at``; every thread copies ``vector``."""
    shared = sch.cache_read(block, index, SCOPE)
    sch.compute_at(shared, at)
    fused = sch.fuse(*sch.get_loops(shared)[-2:])
    warps = int(sch.get(ty).extent)
    _, y, x, v = sch.split(fused, [None, warps, WARP, vector])
    sch.bind(y, "threadIdx.y")
    sch.bind(x, "threadIdx.x")
    sch.vectorize(v)
    sch.storage_align(shared, 0, axis=-2, factor=16, offset=8)
    sch.annotate(shared, "tirx.manifest_shared_memory_local_stage", 1)
    sch.annotate(shared, "double_buffer_scope", 0)
    return shared


def _tensorize_tile(sch: s_tir.Schedule, block, intrin: str, unroll: bool) -> None:
    """Splits the block's last two loops into 16 x 16 tiles and tensorizes the tile."""
    i, j = sch.get_loops(block)[-2:]
    i0, i1 = sch.split(i, [None, FRAG])
    j0, j1 = sch.split(j, [None, FRAG])
    sch.reorder(i0, j0, i1, j1)
    if unroll:
        sch.unroll(i0)
        sch.unroll(j0)
    sch.tensorize(i1, intrin)
