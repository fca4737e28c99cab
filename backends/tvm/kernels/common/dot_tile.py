"""The register-tiled matmul schedule around a tensorized 16-lane dot-product instruction.

Shared by the int8 kernel (``vpdpbusd``, :mod:`rewriter.backends.tvm.kernels.int8_matmul`)
and the bf16 kernel (``vdpbf16ps``, :mod:`rewriter.backends.tvm.kernels.bf16_matmul`). Both
compute ``acc[m, n] = sum_k A[m, k] W[k, n]`` with ``W`` packed as ``[N/16, K/g, 16,
g]`` (one 64-byte row holds the ``g`` k-values of 16 output channels), one instruction
per 16 channels and ``g`` k-values, then an elementwise epilogue ``Y = f(acc)``.

The schedule: a ``TILE_M x (TILE_G * 16)`` block of the accumulator lives in registers
(8 x 48: 24 of AVX-512's 32 zmm registers), the k loop in steps of ``g`` runs outside
the tile, each step broadcasts ``g`` values of each A row and loads one 64-byte row of
W per 16 channels. Loops, outside in: channel tiles, row tiles, k, the tile; so the
``K x 48`` panel of W stays in L1 while the rows of A stream past it. The epilogue runs
on the tile before it is stored, vectorized by 16; the outer tile loops are fused and
parallel.

The epilogue may be narrower than the accumulator: ``Y`` [M, N] from ``acc`` [M, N_pad]
with ``N_pad = ceil(N / 16) * 16`` (W zero-padded to whole groups of 16 channels), so a
ragged ``N`` needs no slice copy. Then only the last group of 16 of the last channel tile
is partial: the epilogue's loop over groups carries TVM's ``pragma_loop_partition_hint``,
and ``LoopPartition`` splits it where the bound ``j < N`` stops holding, so the whole
groups stay vectorized and only the partial one runs scalar, storing its real columns.

>>> func = schedule(func, m, n, group=2, intrin="rewriter_bf16_dot_16x2")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from tvm import s_tir, te, tirx
from tvm.script import tirx as T

LANES = 16  # output channels per instruction (32-bit lanes of a zmm register)
# The register tile: TILE_M rows of A times TILE_G groups of 16 output channels.
TILE_M = 8
TILE_G = 3


def largest_divisor(extent: int, limit: int) -> int:
    """The largest divisor of ``extent`` up to ``limit``.

    >>> largest_divisor(12, 8), largest_divisor(7, 3)
    (6, 1)
    """
    return next(d for d in range(min(extent, limit), 0, -1) if extent % d == 0)


# ``dot(acc, a, w)``: the instruction's result from the accumulator vector, a group of A
# (its g values as one 32-bit value broadcast to the 16 lanes) and a 64-byte row of W.
Dot = Callable[[tirx.Expr, tirx.Expr, tirx.Expr], tirx.Expr]


def register_intrinsic(
    name: str, a_dtype: str, w_dtype: str, acc_dtype: str, group: int, dot: Dot
) -> None:
    """Register ``name`` for tensorize (once): ``c[16] += A[g] . W[16, g]`` in ``acc_dtype``,
    implemented as ``c = dot(c, broadcast A group, W row)``."""
    if name in _registered:
        return

    @T.prim_func(s_tir=True)
    def desc(
        a: T.Buffer((group,), a_dtype, offset_factor=1),  # type: ignore[valid-type]
        b: T.Buffer((LANES, group), w_dtype, offset_factor=1),  # type: ignore[valid-type]
        c: T.Buffer((LANES,), acc_dtype, offset_factor=1),  # type: ignore[valid-type]
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:LANES], a[0:group], b[0:LANES, 0:group])
            T.writes(c[0:LANES])
            for i, k in T.grid(LANES, group):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.cast(a[vk], acc_dtype) * T.cast(b[vi, vk], acc_dtype)

    @T.prim_func(s_tir=True)
    def impl(
        a: T.Buffer((group,), a_dtype, offset_factor=1),  # type: ignore[valid-type]
        b: T.Buffer((LANES, group), w_dtype, offset_factor=1),  # type: ignore[valid-type]
        c: T.Buffer((LANES,), acc_dtype, offset_factor=1),  # type: ignore[valid-type]
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:LANES], a[0:group], b[0:LANES, 0:group])
            T.writes(c[0:LANES])
            # One expression: a TVMScript binding would become a one-element buffer.
            c[T.ramp(T.int32(0), 1, LANES)] = dot(
                c.vload([0], f"{acc_dtype}x{LANES}"),
                T.broadcast(T.reinterpret("int32", a.vload([0], f"{a_dtype}x{group}")), LANES),
                b.vload([0, 0], f"{w_dtype}x{LANES * group}"),
            )

    s_tir.TensorIntrin.register(name, desc, impl, override=True)
    _registered.add(name)


_registered: set[str] = set()


def accumulate(
    a: te.Tensor, n: int, group: int, w_dtype: str, acc_dtype: str
) -> tuple[te.Tensor, te.Tensor]:
    """The packed weight placeholder ``W`` [ceil(n/16), k/group, 16, group] and the block
    ``acc`` [m, ceil(n/16) * 16] ``= A @ W`` in ``acc_dtype``, for :func:`schedule`: whole
    groups of 16 channels (W zero past column n); the caller's epilogue keeps n of them."""
    m, k = (int(dim) for dim in a.shape)
    groups = -(-n // LANES)
    w = te.placeholder((groups, k // group, LANES, group), w_dtype, name="W")
    r = te.reduce_axis((0, k), name="k")
    acc = te.compute(
        (m, groups * LANES),
        lambda i, j: te.sum(
            a[i, r].astype(acc_dtype)
            * w[j // LANES, r // group, j % LANES, r % group].astype(acc_dtype),
            axis=r,
        ),
        name="acc",
    )
    return w, acc


def schedule(
    func: tirx.PrimFunc,
    m: int,
    n: int,
    *,
    group: int,
    intrin: str,
    annotations: Mapping[str, str] | None = None,
) -> tirx.PrimFunc:
    """Schedule ``func`` (blocks ``acc`` [m, n], reducing over k, and ``Y``, its epilogue,
    [m, n] or narrower, down to ``n - 15`` columns) as the module docstring says,
    tensorizing 16 channels x ``group`` k-values with ``intrin``. ``annotations`` go on
    the outermost (parallel) loop.
    """
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("acc")
    i, j, k = sch.get_loops(block)
    io, ii = sch.split(i, [None, largest_divisor(m, TILE_M)])
    jo, jg, jl = sch.split(j, [None, largest_divisor(n // LANES, TILE_G), LANES])
    ko, kl = sch.split(k, [None, group])
    sch.reorder(jo, io, ko, ii, jg, jl, kl)
    tail = sch.get_sblock("Y")
    width = int(sch.get(tail).iter_vars[-1].dom.extent)
    if not n - LANES < width <= n:
        raise ValueError(f"an epilogue of {width} columns must end in the last group of {n}")
    sch.reverse_compute_at(tail, io)
    rows, cols = sch.get_loops(tail)[-2:]
    groups, lanes = sch.split(cols, [None, LANES])
    sch.vectorize(lanes)
    if width < n:  # the last group is partial
        sch.annotate(groups, "pragma_loop_partition_hint", 1)
    sch.unroll(rows)
    # Annotate before decompose_reduction and tensorize: the parts of the reduction
    # block are no longer complete blocks, and parallel refuses loops over them.
    sch.unroll(ii)
    sch.unroll(jg)
    outer = sch.fuse(jo, io)
    sch.parallel(outer)
    for key, value in (annotations or {}).items():
        sch.annotate(outer, key, value)
    init = sch.decompose_reduction(block, ko)
    sch.vectorize(sch.split(sch.get_loops(init)[-1], [None, LANES])[1])
    sch.tensorize(jl, intrin)
    # The accumulator tile goes to registers (after tensorize: the intrinsic's
    # description has a global-scope output).
    sch.set_scope(init, 0, "local")
    return sch.mod["main"]
