"""``call_tir(matmul, [x, W[K, N]])`` -> ``call_tir(matmul_packed, [x, Wp[ceil(N/NB), K, NB]])``.

A matmul's weight is a constant of the module, so its layout is free: this pass stores
it as column panels, ``Wp[jb, k, jj] = W[k, jb * NB + jj]``, with ``NB`` the width of
the matmul's register tile (:func:`rewriter.backends.tvm.relax_passes.schedules.pack_width`). The
micro-kernel (:mod:`rewriter.backends.tvm.relax_passes.schedules`) then reads its ``K x NB`` panel
of B as one contiguous stream, instead of ``NB`` floats from each of ``K`` rows ``N``
floats apart (which thrashes the L1 sets and the TLB once ``N`` is large). This is the
packed B panel of Goto and van de Geijn, "Anatomy of High-Performance Matrix
Multiplication" (ACM TOMS 2008), done once at compile time since B is constant.

It runs after ``FuseTIR`` and before the schedules, on each fused PrimFunc whose one
reduction block is a float32 ``C[..., i, j] += A[..., i, k] * W[k, j]`` with ``W`` a
2-D parameter: the PrimFunc gets ``transform_layout`` (``W[k, j]`` becomes
``Wp[j // NB, k, j % NB]``), and each ``call_tir`` that passes a constant for ``W``
calls the packed copy (``<name>_packed``) with the constant repacked in numpy at
compile time. Calls with a computed ``W`` keep the original.

Where ``NB`` does not divide ``N`` (an ImageNet head: 1000; BERT's MLM head: 30522)
the last panel is zero-padded and the matmul computes whole panels, keeping the ``N``
real columns (:func:`packed_func`); where the rows of A leave the register tile short
(ViT's 197 tokens) they are padded too, by a copy of A in the function. Otherwise the
micro-kernel would have no whole tile to run, and the function would stay scalar.

Exact: each output kept sums the same products in the same order; only addresses
change (padded rows and columns are computed from zeros, and dropped).
Requires: a Relax module after ``FuseTIR`` (PrimFuncs not yet scheduled).
Ensures: no ``call_tir`` passes a packable constant weight in ``[K, N]`` layout.

>>> mod = pack_matmul_weights(target)(mod)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from rewriter.backends.tvm.relax_passes import schedules, visit_functions

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger(__name__)

SUFFIX = "_packed"


@dataclasses.dataclass(frozen=True)
class Packable:
    """A PrimFunc whose matmul (block ``block``) reads call argument ``arg`` as ``W[K, N]``,
    for ``rows`` rows of A (0: not static); packed ``width`` columns wide. ``images``:
    the rows are the images of a symbolic batch (A is ``[batch, K]``: a classifier head
    over pooled features), not padded to whole register tiles (:func:`packed_func`).

    A channels-last convolution (:mod:`.conv`) reads its weight as
    ``W[r..., N]`` (``conv``): its ``K`` is the product of the kernel and input-channel
    extents, and ``width`` divides ``N`` (no padding)."""

    block: str
    arg: int
    k: int
    n: int
    rows: int
    width: int
    conv: bool = False
    images: bool = False


def pack(weight: np.ndarray, width: int) -> np.ndarray:
    """``W[K, N]`` as ``Wp[ceil(N / width), K, width]`` (``Wp[jb, k, jj] = W[k, jb * width + jj]``,
    zero past column N).

    >>> pack(np.arange(8.0).reshape(2, 4), 2)[1]
    array([[2., 3.],
           [6., 7.]])
    >>> pack(np.arange(6.0).reshape(2, 3), 2)[1]
    array([[2., 0.],
           [5., 0.]])
    """
    weight = weight.reshape(-1, weight.shape[-1])  # a convolution's W[r..., N]: K = prod(r)
    k = weight.shape[0]
    weight, panels = _pad_columns(weight, width)
    return np.ascontiguousarray(weight.reshape(k, panels, width).transpose(1, 0, 2))


def pack_groups(weight: np.ndarray, group: int, lanes: int = 16) -> np.ndarray:
    """``W[K, N]`` as ``[ceil(N / lanes), K / group, lanes, group]``, the layout of the
    dot-product kernels (:mod:`rewriter.backends.tvm.kernels.common.dot_tile`): ``packed[n // lanes,
    k // group, n % lanes, k % group] = W[k, n]``, zero past column N (as :func:`pack`
    pads its last panel), so one row holds the ``group`` k-values of ``lanes`` output
    channels.

    >>> int(pack_groups(np.arange(8 * 16).reshape(8, 16), 4)[0, 1, 2, 3])  # W[7, 2]
    114
    >>> ragged = pack_groups(np.arange(4 * 18).reshape(4, 18), 2)  # N = 18: 2 groups of 16
    >>> ragged.shape, int(ragged[1, 1, 1, 0]), int(ragged[1, 1, 2, 0])  # W[2, 17], padding
    ((2, 2, 16, 2), 53, 0)
    """
    k = weight.shape[0]
    weight, groups = _pad_columns(weight, lanes)
    return np.ascontiguousarray(
        weight.reshape(k // group, group, groups, lanes).transpose(2, 0, 3, 1)
    )


def _pad_columns(weight: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    """``weight`` [K, N] with zero columns up to a multiple of ``multiple``, and how many
    ``multiple``-wide blocks it then has."""
    n = weight.shape[1]
    blocks = -(-n // multiple)
    return np.pad(weight, ((0, 0), (0, blocks * multiple - n))), blocks


def find_packable(func: tvm.tirx.PrimFunc, width: int, lanes: int = 16) -> Packable | None:
    """Where ``func``'s matmul reads its weight, if it can be packed ``width`` columns wide.

    The one reduction block must be ``C[..., j] += A[..., k] * W[k, j]`` in float32 with
    ``W`` a static 2-D parameter, ``k`` its only reduction and ``j`` its last spatial
    iterator. ``N`` need not be a multiple of ``width`` (see :func:`packed_func`).
    Or a channels-last convolution ``C[..., j] += A[..., r_last] * W[r..., j]`` (every
    reduction iterator, in order, then ``j``), packed as wide as its register tile
    (:func:`.conv.conv_tile_width` for ``lanes``).
    """
    from tvm import s_tir, tirx

    if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
        return None
    sch = s_tir.Schedule(func)
    try:
        blocks = [sch.get(rv) for rv in sch.get_child_blocks(sch.get_sblock("root"))]
    except Exception:  # no root block: not a function TVM's fusion wrote
        return None
    reduce = tirx.IterVar.CommReduce
    reductions = [b for b in blocks if any(iv.iter_type == reduce for iv in b.iter_vars)]
    if len(reductions) != 1:
        return None
    block = reductions[0]
    kinds = [iv.iter_type for iv in block.iter_vars]
    if len(kinds) < 2 or kinds[-1] != reduce or len(block.reads) != 2 or len(block.writes) != 1:
        return None
    first_reduction = kinds.index(reduce)
    if first_reduction == 0 or any(kind != reduce for kind in kinds[first_reduction:]):
        return None
    j_var = block.iter_vars[first_reduction - 1].var
    r_vars = [iv.var for iv in block.iter_vars[first_reduction:]]
    a_read, w_read = block.reads
    weight = w_read.source
    arg = next((i for i, param in enumerate(func.params) if weight.same_as(param)), None)
    if arg is None or len(weight.shape) != len(r_vars) + 1:
        return None
    if any(r.source.dtype != "float32" for r in (a_read, w_read, *block.writes)):
        return None
    w_index = [r.min for r in w_read.region]
    if not all(index.same_as(var) for index, var in zip(w_index, [*r_vars, j_var], strict=True)):
        return None
    from rewriter.backends.tvm.relax_passes import conv

    group = conv.group_size(a_read.region[-1].min, j_var, r_vars[-1])
    if group is None or (group and len(r_vars) == 1):
        return None
    if not all(isinstance(dim, tirx.IntImm) for dim in weight.shape):
        return None
    *r_dims, n = (int(dim) for dim in weight.shape)
    k = int(np.prod(r_dims))
    if len(r_vars) > 1:  # a channels-last convolution: its tile width divides N (and G)
        conv_width = conv.conv_width(n, group, lanes)
        if conv_width is None or conv_width & (conv_width - 1):
            return None  # j // width and j % width of a vector lane fold only for powers of two
        return Packable(block.name_hint, arg, k, n, 0, conv_width, conv=True)
    rows, images = 1, False
    if len(block.iter_vars) > 2:
        extent = block.iter_vars[schedules.row_iterator(block)].dom.extent
        rows = int(extent) if isinstance(extent, tirx.IntImm) else 0
        a_shape = list(a_read.source.shape)
        images = isinstance(extent, tirx.Var) and len(a_shape) == 2 and a_shape[0].same_as(extent)
    return Packable(block.name_hint, arg, k, n, rows, width, images=images)


def packed_func(
    func: tvm.tirx.PrimFunc, site: Packable, width: int, lanes: int
) -> tvm.tirx.PrimFunc:
    """``func`` reading its weight as ``Wp[j // width, k, j % width]``.

    Where :func:`schedules.padding` asks for it (``width`` does not divide ``N``, or the
    rows leave the register tile short), the matmul is first padded to whole panels and
    row tiles (:func:`schedules.zero_pad`): it computes ``ceil(N / width) * width``
    columns into a padded result, of which the epilogue keeps the ``N`` real ones. The
    weight parameter becomes the padded panels, zero past column ``N``, as :func:`pack`
    writes them; padded rows of A are copied in the function, per call. Symbolic rows
    are padded to whole register tiles: the schedule then needs no masked tile. But the
    images of a symbolic batch (``site.images``) are not: padded to 8, a classifier head
    at batch 1 computed 8 rows (MobileNetV3-small's two head matmuls, 4 MB of weight: 0.87
    ms a call against 0.55 at a fixed batch of 1, after a cache sweep); unpadded, they
    are register tiles of one row. The whole model, side by side with ONNX Runtime (whose
    runs leave the caches cold): batch 1 2.69 -> 2.37 ms, batch 8 level (14.25 -> 14.08),
    batch 32 2% slower (64.2 -> 65.6 ms: one-row tiles read each weight panel once per
    image).
    """
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    block = sch.get_sblock(site.block)
    if site.conv:
        from rewriter.backends.tvm.relax_passes import conv

        def panels(*index: Any) -> tuple[Any, Any, Any]:
            *r, j = index
            k = r[0]
            for value, extent in zip(r[1:], sch.get(block).reads[1].source.shape[1:-1], strict=True):
                k = k * extent + value
            return j // site.width, k, j % site.width

        ndim = len(sch.get(block).reads[1].source.shape)
        sch.transform_layout(block, ("read", 1), tirx.IndexMap.from_func(panels, ndim=ndim))
        sch.annotate(block, conv.PACKED_ANNOTATION, site.width)
        return sch.mod["main"]
    pad = schedules.padding(site.rows or 1, site.n, lanes, packed=width, depth=site.k)
    if site.rows == 0 and not site.images:  # symbolic rows (batch x tokens): to whole register tiles
        pad = (schedules.tile_rows(width, lanes), pad[1])
    schedules.zero_pad(sch, block, pad)
    sch.transform_layout(block, ("read", 1), lambda k, j: (j // width, k, j % width))
    if pad[1] == 1:
        return sch.mod["main"]
    weight = sch.get(block).reads[1].source
    (pad,) = [b for b in sch.get_producers(block) if sch.get(b).writes[0].source.same_as(weight)]
    return _precomputed(sch, pad, site.arg)


def _precomputed(sch: Any, block: Any, arg: int) -> tvm.tirx.PrimFunc:
    """The function of ``sch`` without root-level ``block``: what ``block`` writes (from
    parameter ``arg``) becomes parameter ``arg``, computed by the caller (here
    :func:`pack`, at compile time). TVM's ``SplitLayoutRewritePreproc`` does the same
    for MetaSchedule's layout rewrites, as a second function the caller runs."""
    from tvm import s_tir, tirx

    func = sch.mod["main"]
    written = sch.get(block).writes[0].source
    nest = sch.get(sch.get_loops(block)[0])
    root = func.body.block
    body = tirx.SeqStmt([stmt for stmt in root.body.seq if not stmt.same_as(nest)])
    allocs = [buffer for buffer in root.alloc_buffers if not buffer.same_as(written)]
    params = list(func.params)
    params[arg] = written
    root = s_tir.SBlock(
        [], [], [], root.name_hint, body, alloc_buffers=allocs, annotations=root.annotations
    )
    return tirx.PrimFunc(params, s_tir.SBlockRealize([], True, root), attrs=func.attrs)


def pack_matmul_weights(target: tvm.target.Target) -> tvm.transform.Pass:
    """The module pass (see the module docstring) for CPU ``target``."""
    import tvm
    from tvm import relax

    width = schedules.pack_width(target)
    lanes = schedules.vector_lanes(target)
    call_tir = tvm.ir.Op.get("relax.call_tir")

    @tvm.transform.module_pass(opt_level=0, name="PackMatmulWeights")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        sites: dict[str, tuple[Packable, tvm.tirx.PrimFunc]] = {}
        for gv, func in mod.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc):
                site = find_packable(func, width, lanes)
                if site is None:
                    continue
                try:
                    sites[gv.name_hint] = site, packed_func(func, site, site.width, lanes)
                except Exception as exc:  # a primitive refused: leave the function unpacked
                    logger.debug("%s not packed: %s", gv.name_hint, exc)
        if not sites:
            return mod
        packed_vars: dict[str, Any] = {}
        repacked: dict[Any, Any] = {}

        @relax.expr_functor.mutator
        class Repack(relax.PyExprMutator):  # type: ignore[misc]
            def visit_call_(self, call: Any) -> Any:
                call = super().visit_call_(call)
                if not call.op.same_as(call_tir):
                    return call
                name = call.args[0].name_hint
                if name not in sites:
                    return call
                site, func = sites[name]
                args = list(call.args[1].fields)
                if site.arg >= len(args):
                    return call
                weight = args[site.arg]
                if not isinstance(weight, tvm.ir.expr.GenericConst) or not isinstance(
                    weight.value, tvm.runtime.Tensor
                ):
                    return call
                if weight not in repacked:
                    repacked[weight] = relax.const(pack(weight.value.numpy(), site.width))
                args[site.arg] = repacked[weight]
                if name not in packed_vars:
                    packed_vars[name] = self.builder_.add_func(func, name + SUFFIX)
                return relax.Call(
                    call.op,
                    [packed_vars[name], relax.Tuple(args), *call.args[2:]],
                    call.attrs,
                    call.ty_args,
                )

        mutator = Repack(mod)
        visit_functions(mutator, mod)
        logger.debug(
            "packed %d matmul weights %d wide, for %s", len(repacked), width, sorted(packed_vars)
        )
        # The originals no longer called are dropped.
        return relax.transform.DeadCodeElimination()(mutator.builder_.get())

    return pass_
