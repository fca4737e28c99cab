"""CPU schedules: what TVM's default CPU pipeline leaves as scalar loops.

TVM's generic CPU pipeline schedules nothing, so a matmul runs as a scalar triple
loop. :func:`cpu_schedule` applies, through ``tvm.s_tir.dlight``'s
``ApplyDefaultSchedule`` (first rule that fits each PrimFunc wins; functions marked
``tirx.is_scheduled``, like our kernels, are skipped):

* :class:`RegisterTiledMatmul`: ``C[..., i, j] += A[..., i, k] * B[..., k, j]``
  with an elementwise epilogue, B either plain or packed in ``NB``-column panels
  (:mod:`rewriter.backends.tvm.relax_passes.pack_weights` packs constant weights). The micro-kernel
  keeps a ``tile_i x tile_j`` block of C in registers (:func:`register_tile`: 8 x 32
  floats, 16 of AVX-512's 32 registers): for each ``k`` (unrolled by
  :data:`K_UNROLL`) it broadcasts ``tile_i`` values of A and multiplies-adds them
  with ``tile_j / lanes`` vectors of B (``vfmadd231ps`` on zmm). Loops, outside in:
  batch, row blocks of A sized for L2 (:func:`row_block`), panels of B, row tiles,
  ``k``, the tile. So a ``K x tile_j`` panel of B stays in L1/L2 while the row tiles
  stream past it; the packed panel is one contiguous stream. The epilogue (bias,
  GELU, residual add) runs on each finished tile and writes the output once (a tile
  under 1 KiB is a stack buffer LLVM keeps in registers, :func:`stack_rows`; an 8 x 32
  one a workspace buffer in L1); batch, row blocks and panels are fused into the parallel
  loop. Rows that no L2-sized block divides go to equal blocks (1576 -> 5 x 320:
  :func:`padding`); where rows x K and B both overflow L2 (ViT-B/16's 3072 x 768 MLP
  weight), ``k`` runs in blocks (:func:`k_block`) inside each column block of B's panels
  (as MLAS does), each register tile adding into C. A weight streamed from memory past
  few row tiles (a batch-1 matmul: at most 8 tiles, 2 MiB or more) has its next panel
  prefetched in the ``k`` loop (:func:`prefetch_next_panel`). Shapes without whole tiles (N = 197 or 1000; 197 rows)
  are padded to them (:func:`padding`, :func:`zero_pad`): padded rows of A read A's last
  row (:func:`clamp_rows`: no copy), a computed B's padded columns are a zero-padded copy
  made once per call, and the epilogue writes only the real part; a packed B
  was padded when it was packed. Without it the function would stay scalar (~40x
  slower).
* :class:`VectorizedRowReduction`: reductions over the last axis with elementwise
  neighbours (layer norm, softmax): one row per parallel iteration, each row sum or
  max accumulated in ``lanes`` partial results (``rfactor``), elementwise steps
  vectorized; dlight's CPU ``Reduction`` takes the row reductions it declines.
* :class:`VectorizedColumnReduction`: reductions over outer axes that keep the innermost
  (a channels-last instance norm's statistics): a vector of the kept axis accumulates
  over the reduced ones, the kept axes outside it parallel.
* :class:`VectorizedElementwise`: injective functions with static shapes: the
  fused loop is split by the vector width, vectorized, and the outer part parallel.

>>> mod = cpu_schedule(target)(mod)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

    import tvm

logger = logging.getLogger(__name__)

# Accumulator registers of the micro-kernel, per vector width in bits: AVX-512 has 32
# vector registers, AVX2 and SSE 16; the rest hold B's vectors and A's broadcast.
ACCUMULATORS = {512: 16, 256: 12, 128: 12}
# Rows of A per register tile, at most (8 divides the usual power-of-two row counts).
MAX_TILE_ROWS = 8
# Vectors of B per register tile row: the packed panel width is this many vectors.
PANEL_VECTORS = 2
# The k loop of the micro-kernel is unrolled by this much.
K_UNROLL = 4
# A row block of A (rows x K float32) is kept under this many bytes (half of L2).
ROW_BLOCK_BYTES = 1 << 20
# The k loop of a matmul whose rows and B both overflow L2 is cut into blocks this deep
# (:func:`k_block`; 0: never), inside each column block of PANEL_GROUP panels of B, as
# MLAS does (its packed B's blocks: 256 deep, 128 columns wide): a row tile of A's k block
# stays in L1 across the group's panels, the group's B block (512 x 128 floats: 256 KiB) in
# L2, and each register tile adds into the column block of C, which stays in L2 from one k
# block to the next. Depths from 2 x K_CHUNK (1024) are cut.
# Emerald Rapids, one thread, ours / ONNX Runtime's time for the MatMul + Add
# (benchmarks/matmul_shapes.py --only deep): 1576 x 3072 x 768 (ViT-B/16's MLP at batch 8
# as rows) 1.32 -> 1.04, 2056 x 1536 x 384 (DINOv2-S's at batch 8) 1.37 -> 0.97, 197 rows
# 1.08 -> 1.05; before, each k block was a parallel pass over all of C with its panels
# outside (768 deep). 256 deep with groups of 4 or 8 panels measured 1-5% slower than 512
# with 4.
K_CHUNK = 512
PANEL_GROUP = 4
# A packed weight of at least this many bytes (half an L2: in a model, the other layers'
# weights evict it between calls), read by at most PREFETCH_MAX_TILES row tiles of at
# least PREFETCH_MIN_ROWS rows (a batch-1 matmul's few rows), is streamed from memory while
# it is multiplied: the micro-kernel prefetches the next panel (:func:`prefetch_next_panel`;
# PREFETCH_LOCALITY: llvm.prefetch's, 3 = into L1; 1 and 2 measured alike). 1 MiB and 10
# tiles take CLIP's 50-token MLP (1 MiB weights, 10 tiles of 5 rows: the model 10%
# faster); 16 tiles took 128-token matmuls too, which lost (GPT-2 8% slower).
PREFETCH_MIN_BYTES = 1 << 20
PREFETCH_MAX_TILES = 10
PREFETCH_MIN_ROWS = 4
PREFETCH_LOCALITY = 3
# PREFETCH_MAX_TILES per CPU the code is tuned for (:func:`prefetch_max_tiles`) where it
# differs: the 10 above were measured on AMD Zen 4. Intel's Sapphire Rapids class gains
# from the prefetch up to ViT's 197 rows (25 tiles): on an Emerald Rapids, chains of
# 128 x 1024 x 1024 and 197 x 768 x 768 matmuls ran 1.24x and 1.11x faster with it
# (benchmarks/streamed_weights.py), ViT-B/16 at batch 1 0.997 -> 0.92x ONNX Runtime's time.
PREFETCH_MAX_TILES_BY_CPU = {"sapphirerapids": 32, "emeraldrapids": 32, "graniterapids": 32}
# Symbolic rows (a library for any sequence length): the prefetches are spread as over
# 1 / SYMBOLIC_PREFETCH_SHARE of the most row tiles that gain, made by the first row
# tiles only, and only where the row tiles, counted at run time, are few enough to gain.
# Without them the symbolic libraries of text models ran 1.10-1.26x their fixed-shape
# time at batch 1 on an Emerald Rapids (DeBERTa-v2 4.70 against 3.74 ms; 2 and 4: 4.10
# and 4.08 ms; GPT-2 4.09 -> 3.70, fixed 3.52).
SYMBOLIC_PREFETCH_SHARE = 2
# A matmul whose B is at most ROW_MAJOR_MAX_B_BYTES (half of AMD Zen 4's 1 MiB L2) sweeps
# all of B's panels per row tile, so that C is written row by row, where its product (per
# batch iteration) is at least ROW_MAJOR_MIN_OUTPUT_BYTES, or where its static shape gives
# the parallel loop at least ROW_MAJOR_MIN_TILES row tiles (:func:`rows_outside`).
ROW_MAJOR_MIN_OUTPUT_BYTES = 1 << 20
ROW_MAJOR_MAX_B_BYTES = 1 << 19
ROW_MAJOR_MIN_TILES = 8
# A symbolic batch axis counts as SYMBOLIC_BATCH items toward ROW_MAJOR_MIN_TILES.
SYMBOLIC_BATCH = 8
# Rows under which a matmul with a packed weight (the same for every batch iteration)
# takes the static batch loops next to its rows as rows too (``_shared_rows``).
MIN_PANEL_ROWS = 64
# An elementwise function whose last axis is whole vectors, at least this many, over at
# least MIN_ROWS rows, runs row by row (VectorizedElementwise).
ROW_VECTORS = 4
MIN_ROWS = 16
# TVM keeps a buffer on the stack only if its scope is "global" and it is under this many
# bytes (its kMaxStackAlloca); any other is a TVMBackendAllocWorkspace call, and a memset,
# per register tile: ~30% of a 1x1 convolution over 16 channels. On the stack LLVM keeps
# the tile in registers from its zeros to the epilogue.
STACK_BYTES = 1024
# A row reduction over a static extent of at least this many elements that no vector
# divides is vectorized nest by nest (VectorizedRowReduction._nest_by_nest).
RAGGED_MIN_EXTENT = 17
# A concatenation along the row into more spans than this stays one loop (each span is a
# loop of its own: code size).
MAX_CONCAT_SPANS = 65
# A block an element-wise consumer reads at this many distinct indices or more (a bilinear
# resize's 4 source pixels) is written once rather than inlined at every tap
# (VectorizedElementwise). A rotary embedding's two reads (x and its rotated half) stay
# inlined.
GATHER_MIN_TAPS = 3
# Marks the zero-padded input copies that zero_pad adds (kept out of the micro-kernel).
PAD_ANNOTATION = "rewriter.zero_pad"


def vector_lanes(target: tvm.target.Target) -> int:
    """float32 lanes of one vector register of ``target``: 16 with AVX-512, 8 with AVX,
    else 4 (SSE, NEON).

    ``llvm_get_vector_width`` is not used: in this TVM build it answers the host's width
    (512 on the CI machine) for every target, so ``avx2`` code got AVX-512-sized tiles.

    >>> vector_lanes(targets.resolve("avx2"))  # doctest: +SKIP
    8
    """
    from tvm.target.codegen import target_has_features

    for feature, lanes in (("avx512f", 16), ("avx", 8)):
        try:
            if target_has_features([feature], target):
                return lanes
        except Exception:  # not an LLVM target, or LLVM does not know the feature
            return 4
    return 4


def pack_width(target: tvm.target.Target) -> int:
    """Columns per panel of a packed matmul weight: the register tile's width on ``target``.

    >>> pack_width(targets.resolve("avx512"))  # doctest: +SKIP
    32
    """
    return PANEL_VECTORS * vector_lanes(target)


def register_tile(rows: int, cols: int, lanes: int, packed: int = 0) -> tuple[int, int] | None:
    """``(tile_i, tile_j)`` of the micro-kernel for a ``rows x cols`` output.

    ``tile_j`` is the packed width ``packed``, or else the largest multiple of ``lanes``
    up to ``PANEL_VECTORS * lanes`` that divides ``cols`` (None if there is none);
    ``tile_i`` the largest divisor of ``rows`` whose tile fits the accumulator registers.

    >>> register_tile(128, 1536, 16, packed=32)
    (8, 32)
    >>> register_tile(128, 40, 16) is None
    True
    """
    tile_j = packed or _largest_divisor(cols, PANEL_VECTORS * lanes, lanes)
    if tile_j is None:
        return None
    tile_i = _largest_divisor(rows, tile_rows(tile_j, lanes))
    return tile_i or 1, tile_j


def padding(rows: int, cols: int, lanes: int, packed: int = 0, depth: int = 0) -> tuple[int, int]:
    """Multiples to pad a ``rows x cols`` output to (1: as it is), for whole register tiles.

    Columns go to whole panels: ``packed`` wide if B is packed, else ``PANEL_VECTORS *
    lanes`` wide where no multiple of ``lanes`` up to that divides them. Rows whose best
    tile (:func:`register_tile`) is under half the tile's height (197 rows: 1) leave too
    few accumulators to hide the FMA latency; they go to whole tiles where that wastes
    a smaller fraction of the work than it gains. Given the ``depth`` (K), rows also go
    to whole L2 row blocks where no row block divides them (:func:`_block_rows`).

    >>> padding(197, 197, 16)
    (8, 32)
    >>> padding(128, 1000, 16), padding(128, 1000, 16, packed=32)
    ((1, 32), (1, 32))
    >>> padding(128, 1024, 16), padding(9, 64, 16)
    ((1, 1), (1, 1))
    >>> padding(1576, 2304, 16, packed=32, depth=768)  # ViT-B/16, batch 8: 5 blocks of 320
    (320, 1)
    """
    if packed:
        width, pad_j = packed, packed if cols % packed else 1
    else:
        divisor = _largest_divisor(cols, PANEL_VECTORS * lanes, lanes)
        width = divisor or PANEL_VECTORS * lanes
        pad_j = 1 if divisor else width
    limit = tile_rows(width, lanes)
    tile_i = _largest_divisor(rows, limit) or 1
    padded = -(-rows // limit) * limit
    pad_i = limit if 2 * tile_i < limit and 2 * tile_i * padded < limit * rows else 1
    if depth:
        # The rows and columns as the matmul rule will see them, padded to whole tiles,
        # so that it cuts k where this plans the row blocks for it.
        tile = pad_i if pad_i > 1 else tile_i
        rows = -(-rows // tile) * tile
        depth = k_block(rows, depth, -(-cols // pad_j) * pad_j) or depth
        block = _block_rows(rows, depth, tile)
        if block > 1:
            pad_i = block
    return pad_i, pad_j


def _block_rows(rows: int, depth: int, tile: int) -> int:
    """Rows per L2 block to pad ``rows`` (a multiple of ``tile``) to, or 1 where they need none.

    The matmul streams every panel of B past one row block of A (``rows x depth`` floats,
    at most :data:`ROW_BLOCK_BYTES`) at a time, so B is read once per row block. The
    blocks divide the rows: where no divisor of the rows comes to half the block limit
    (ViT-B/16 at batch 8: 1576 = 8 x 197 rows, blocks of 8 rows, B read 197 times: 1.5x
    ONNX Runtime's time), the rows go to equal blocks under the limit (5 x 320 = 1600),
    where that adds at most 1/20 of the work.

    >>> _block_rows(1576, 768, 8), _block_rows(1680, 768, 8), _block_rows(200, 3072, 8)
    (320, 1, 1)
    """
    limit = max(ROW_BLOCK_BYTES // (4 * depth), tile) // tile * tile
    if rows <= limit or 2 * (_largest_divisor(rows, limit, tile) or 0) >= limit:
        return 1
    blocks = -(-rows // limit)
    block = -(-rows // (blocks * tile)) * tile
    return block if 20 * (blocks * block - rows) <= rows else 1


def zero_pad(sch: Any, block: Any, pad: tuple[int, int]) -> bool:
    """Pad matmul ``block`` (``..., i, j, k``) to multiples ``pad`` of its rows and columns,
    as :func:`padding` gives them, with ``pad_einsum``; False if there is nothing to pad.

    An input padded along its rows (A) reads its last row there (:func:`clamp_rows`);
    one padded along its last axis (B's columns) is copied, zero-padded, by a new producer
    block (annotated :data:`PAD_ANNOTATION`: the matmul rule runs it as a copy before the
    matmul, and never inlines it, which would put its bounds checks in the
    micro-kernel). The matmul writes a padded result, of which a new consumer block
    copies the real part. Exact: the padded rows and columns are dropped.

    >>> zero_pad(sch, sch.get_sblock("matmul"), (8, 32))  # doctest: +SKIP
    True
    """
    if pad == (1, 1):
        return False
    iter_vars = sch.get(block).iter_vars
    pads = [1] * len(iter_vars)
    pads[-2] = pad[1]
    if pad[0] != 1:
        pads[row_iterator(sch.get(block))] = pad[0]
    before = {sch.get(producer).name_hint for producer in sch.get_producers(block)}
    sch.pad_einsum(block, pads)
    for producer in sch.get_producers(block):
        if sch.get(producer).name_hint not in before and not clamp_rows(sch, producer):
            sch.annotate(producer, PAD_ANNOTATION, 1)
    return True


def rows_parallel(sch: Any, block: Any, lanes: int) -> None:
    """A block's outer loops fused and parallel, its inner loop vectorized in whole
    vectors of ``lanes`` where they divide its (static) extent."""
    from tvm import tirx

    *outer, inner = sch.get_loops(block)
    if outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    extent = sch.get(inner).extent
    if isinstance(extent, tirx.IntImm) and int(extent) % lanes == 0:
        sch.vectorize(sch.split(inner, [None, lanes])[1])


def clamp_rows(sch: Any, copy: Any) -> bool:
    """Replace ``pad_einsum``'s zero-padded ``copy`` of a matmul input by reads of the
    input itself, its padded rows clamped to its last row, and inline it; False (the
    copy kept) where the padding is along the input's last axis.

    The padded rows and columns of the product are dropped, so what they are computed
    from does not matter: a padded row of A may repeat a real one. A's reads are
    broadcasts, one address per row of the register tile, set once per tile (LLVM
    hoists ``min(i, rows - 1)`` out of the ``k`` loop), where the copy wrote and read
    ``rows x depth`` floats once per call (ViT's 197 x 1024 MLP input: 800 KB, 1.1x
    ONNX Runtime's time for its 197 x 1024 x 256 matmul). B's padding is along its
    last axis, whose reads are vectors: clamped, they would be gathers; it keeps its
    copy, which also lays a computed B (``K^T``) out contiguously."""
    import tvm
    from tvm import s_tir, tirx

    stmt = sch.get(copy)
    store = stmt.body
    value = store.value if isinstance(store, tirx.BufferStore) else None
    if not (isinstance(value, tvm.ir.Call) and value.op.name.endswith("if_then_else")):
        return False
    load = value.args[1]
    if not isinstance(load, tvm.ir.TensorLoad) or len(load.indices) != len(store.indices):
        return False
    source, padded = load.source, store.buffer
    grown = [str(full) != str(real) for full, real in zip(padded.shape, source.shape, strict=True)]
    if grown[-1]:
        return False
    indices = [
        tirx.min(index, real - 1) if grew else index
        for index, real, grew in zip(load.indices, source.shape, grown, strict=True)
    ]
    clamped = tirx.BufferStore(padded, tirx.BufferLoad(source, indices), store.indices)
    reads = [tirx.BufferRegion(source, [tvm.ir.Range.from_min_extent(i, 1) for i in indices])]
    new = s_tir.SBlock(stmt.iter_vars, reads, stmt.writes, stmt.name_hint, clamped, stmt.init)
    sch.state.replace(sch.get_sref(copy), new, {stmt: new})
    sch.compute_inline(copy)
    return True


def rows_outside(rows: int, depth: int, cols: int, row_tiles: int | None = None) -> bool:
    """Whether a ``rows x depth x cols`` float32 matmul (per batch iteration) runs its
    row tiles outside its panels of B: each row tile sweeps every panel, and C is
    written row by row, where B is small enough to stay in L2 and either C is past L2
    or ``row_tiles`` (the row tiles of every batch iteration, where the batch is static)
    give the threads enough to split.

    The panels-outside order keeps a ``depth x tile_j`` panel in L1 while every row
    tile streams past it, but writes C in column strips ``tile_j`` floats wide: past
    L2 (Whisper's 1500 x 1500 attention scores per head, 9 MB, ``depth`` 64) each
    strip is partial cache lines spread over every row, written back to memory before
    the next strip fills them. That kernel (4 heads) ran at 1.33x ONNX Runtime's time and
    at 0.73x with the rows outside; where B is past L2 (197 x 768 x 768) the sweep costs
    1.3x. Under L2 the row order still keeps a row tile of A in L1 over the panels, and
    the threads split rows, the rows their producer wrote, instead of panels: the
    attention and MLP matmuls of ViT and BART at batch 8 ran 3-8% faster. A symbolic
    batch axis counts as :data:`SYMBOLIC_BATCH` items where a row block holds all the
    rows; :class:`RegisterTiledMatmul` then fuses the batch into the parallel loop with
    the row tiles, one fork for all of them, as at a fixed batch (MobileViT's 196 x 196
    scores per head at batch 8: 8.0 -> 6.6 ms, the fixed library's 6.3; Swin, the whole
    model: 0.95x the time). Kept serial around the parallel row tiles, Swin's 49-row
    windows ran 1.5-3.5x longer on two threads, one fork per window.

    >>> rows_outside(1500, 64, 1500), rows_outside(197, 64, 197), rows_outside(1576, 768, 2304)
    (True, False, False)
    >>> rows_outside(197, 64, 197, row_tiles=12 * 33), rows_outside(1, 768, 100, row_tiles=1)
    (True, False)
    """
    if depth * cols * 4 > ROW_MAJOR_MAX_B_BYTES:
        return False
    return rows * cols * 4 >= ROW_MAJOR_MIN_OUTPUT_BYTES or (row_tiles or 0) >= ROW_MAJOR_MIN_TILES


def prefetch_max_tiles(target: tvm.target.Target) -> int:
    """Row tiles a streamed weight is prefetched for, at most, in code for ``target``:
    :data:`PREFETCH_MAX_TILES_BY_CPU` of the CPU it is tuned for
    (:func:`.targets.tuned_cpu`), else :data:`PREFETCH_MAX_TILES`.

    >>> prefetch_max_tiles(targets.resolve("sapphirerapids"))  # doctest: +SKIP
    32
    """
    from rewriter.backends.tvm import targets

    return PREFETCH_MAX_TILES_BY_CPU.get(targets.tuned_cpu(target), PREFETCH_MAX_TILES)


def streams_weight(
    weight_bytes: int, tile_rows: int, tiles: int, max_tiles: int | None = None
) -> bool:
    """Whether a packed weight of ``weight_bytes`` read by ``tiles`` register tiles of
    ``tile_rows`` rows streams from memory as it is multiplied, so that its next panel is
    worth prefetching (:func:`prefetch_next_panel`; :data:`PREFETCH_MIN_BYTES`,
    :data:`PREFETCH_MIN_ROWS`, and ``max_tiles``: :func:`prefetch_max_tiles`,
    :data:`PREFETCH_MAX_TILES` where not given).

    >>> streams_weight(768 * 3072 * 4, 7, 7), streams_weight(768 * 3072 * 4, 8, 16)
    (True, False)
    >>> streams_weight(768 * 3072 * 4, 1, 1), streams_weight(256 * 768 * 4, 7, 7)
    (False, False)
    >>> streams_weight(256 * 1024 * 4, 5, 10)  # CLIP's MLP at 50 tokens
    True
    >>> streams_weight(768 * 768 * 4, 8, 25), streams_weight(768 * 768 * 4, 8, 25, max_tiles=32)
    (False, True)
    """
    limit = PREFETCH_MAX_TILES if max_tiles is None else max_tiles
    return (
        weight_bytes >= PREFETCH_MIN_BYTES and tile_rows >= PREFETCH_MIN_ROWS and 0 < tiles <= limit
    )


def prefetch_next_panel(
    sch: Any,
    weight: Any,
    at: Any,
    panel: Any,
    position: Any,
    counts: tuple[int, int],
    guard: Any = None,
) -> Any:
    """``sch`` (a matmul's or convolution's) with the next panel of the packed ``weight``
    (``[panels, K, width]``) prefetched while ``panel`` is multiplied, in the body of the
    loop ``at`` (the micro-kernel's reduction loop; ``position``: how many iterations of
    it this panel's row tiles ran before this one; ``counts``: the panel's row tiles, and
    the ``k`` steps per iteration, unrolled inside).

    With few rows (``tiles`` row tiles: ConvNeXt's 7 x 7 stage at batch 1, 49 x 768 x
    3072), each panel is read from memory by the first row tile, at its pace, and from
    cache by the others: the matmul ran at 3.7 GB/s of weight, 90 GFLOP/s, as ONNX
    Runtime's does. Each iteration of the ``k`` loop now also prefetches
    (``llvm.prefetch``) lines of the next panel, spread evenly over all row tiles (where
    the iterations outnumber the panel's lines, a line every few iterations: a line each
    iteration ran 3.5 panels ahead, and CLIP's patch embedding took 5.5 ms at batch 8
    against 4.1), so the memory stream overlaps the whole panel's arithmetic: 0.95 ->
    0.69x ONNX Runtime's time after a 64 MiB sweep of the cache, 1.00 -> 0.77x in cache
    (one thread). One row (a GEMV) is left to the hardware's stream prefetcher: there
    the prefetches doubled the loads (0.92 -> 1.03x). The panels are contiguous; after
    the last comes the first (of the next batch or row block). No schedule primitive
    inserts a statement: the function is rebuilt with the prefetches, and a new schedule
    returned. Where ``guard`` is given, only iterations where it holds prefetch (symbolic
    rows: the first ``counts[0]`` row tiles, where the rows are few enough to gain)."""
    import tvm_ffi
    from tvm import tirx

    panels, depth, width = (int(extent) for extent in weight.shape)
    tiles, steps = counts
    line = 64 // ((tvm_ffi.dtype(str(weight.dtype)).bits + 7) // 8)  # elements per cache line
    per_iteration, stride = prefetch_spacing(width * steps, line, tiles)
    size = panels * depth * width
    following = tirx.floormod(panel + 1, panels) * (depth * width)
    lines = position * per_iteration if stride == 1 else tirx.floordiv(position, stride)

    def prefetches() -> list[Any]:
        out = []
        for part in range(per_iteration):
            flat = tirx.floormod(following + (lines + part) * line, size)
            index = [
                tirx.floordiv(flat, depth * width),
                tirx.floormod(tirx.floordiv(flat, width), depth),
                tirx.floormod(flat, width),
            ]
            out.append(prefetch(weight, index))
        if stride > 1:
            out = [tirx.IfThenElse(tirx.floormod(position, stride) == 0, out[0], None)]
        return (
            out
            if guard is None
            else [tirx.IfThenElse(guard, tirx.SeqStmt(out) if len(out) > 1 else out[0], None)]
        )

    return first_in_loop(sch, at.loop_var, prefetches())


def prefetch(buffer: Any, index: list[Any], write: bool = False) -> Any:
    """The statement that prefetches ``buffer[index]``'s cache line into L1
    (:data:`PREFETCH_LOCALITY`; ``llvm.prefetch``, for writing where ``write``)."""
    from tvm import tirx

    address = tirx.call_intrin("handle", "tirx.address_of", tirx.BufferLoad(buffer, index))
    flags = [tirx.const(value, "int32") for value in (int(write), PREFETCH_LOCALITY, 1)]  # rw, locality, data
    return tirx.Evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0", address, *flags))


def first_in_loop(sch: Any, loop_var: Any, stmts: list[Any]) -> Any:
    """A schedule of ``sch``'s function with ``stmts`` run first in each iteration of the
    loop over ``loop_var``. No schedule primitive inserts a statement: the function is
    rebuilt, and a new schedule returned."""
    import tvm_ffi
    from tvm import s_tir, tirx

    def with_stmts(loop: Any) -> Any:
        if not loop.loop_var.same_as(loop_var):
            return loop
        body = tirx.SeqStmt([*stmts, loop.body])
        return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, body, loop.thread_binding, loop.annotations)

    func = sch.mod["main"]
    return s_tir.Schedule(func.with_body(tvm_ffi.structural_map(func.body, [(tirx.For, with_stmts)], order="post")))


def prefetch_spacing(elements: int, line: int, tiles: int) -> tuple[int, int]:
    """``(lines, every)``: each ``every``-th iteration of the ``k`` loop prefetches that
    many cache lines (``line`` elements each) of the next panel, where each of ``tiles``
    row tiles runs the loop over the panel, ``elements`` of it an iteration. So the
    prefetches cover at most the next panel, and at least half of it.

    >>> prefetch_spacing(128, 16, 3), prefetch_spacing(128, 16, 8), prefetch_spacing(32, 16, 7)
    ((2, 1), (1, 1), (1, 4))

    More iterations than lines (7 tiles, CLIP's patch embedding, whose reduction loop over
    3 channels takes no :data:`K_UNROLL` steps) prefetch a line every few iterations."""
    if elements >= line * tiles:
        return elements // (line * tiles), 1
    return 1, -(-line * tiles // elements)


def row_iterator(block: Any) -> int:
    """Which iterator of matmul ``block`` (``..., i, j, k``) its rows are tiled along:
    ``i`` (-3), but the static one before it where the weight does not depend on that
    one and ``i`` is symbolic, or shorter (a sequence-first layout, ``X[tokens, batch,
    k] @ W``: torchvision's attention). Padding a batch of 1 to a whole row tile would
    compute 8 rows for 1; a batch of 1 as the rows leaves a one-row tile; a batch of 8
    as the rows, each token a batch iteration, reads every panel of W once per 8 rows
    (torchvision's ViT-B/16 at batch 8: its QKV projection at 49 GFLOP/s)."""
    from tvm import tirx

    iter_vars = block.iter_vars
    if len(iter_vars) < 4 or len(block.reads) < 2:
        return -3
    outer_extent, inner_extent = [iv.dom.extent for iv in iter_vars[-4:-2]]
    if not isinstance(outer_extent, tirx.IntImm) or int(outer_extent) < 2:
        return -3
    if isinstance(inner_extent, tirx.IntImm) and int(inner_extent) >= int(outer_extent):
        return -3
    outer = iter_vars[-4].var
    weight = block.reads[1]
    if any(
        free.same_as(outer)
        for r in weight.region
        for free in tirx.analysis.undefined_vars(r.min, [])
    ):
        return -3
    return -4


def concat_spans(block: Any, loops: int, extent: int) -> list[int] | None:
    """The lengths of the spans into which ``block``'s choices (``if_then_else`` or
    ``Select``) cut its innermost iterator's ``extent``, where each chooses by comparing
    that iterator alone with constants (a concatenation along the row, ``480 <= c``); None
    where none does, a choice depends on more, or the spans would be more than
    MAX_CONCAT_SPANS."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    value = _stored_value(block, loops)
    if value is None:
        return None
    var = block.iter_vars[-1].var
    conditions: list[Any] = []

    def note(node: Any) -> Any:
        if isinstance(node, tirx.Select):
            conditions.append(node.condition)
        elif getattr(node.op, "name", None) == "prim.if_then_else":
            conditions.append(node.args[0])
        return node

    tvm_ffi.structural_map(value, [(tvm.ir.Call, note), (tirx.Select, note)], order="post")
    cuts: set[int] = set()
    for condition in conditions:
        found = _cuts(condition, var)
        if found is None:
            return None
        cuts.update(cut for cut in found if 0 < cut < extent)
    if not cuts or len(cuts) >= MAX_CONCAT_SPANS:
        return None
    bounds = [0, *sorted(cuts), extent]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


def _cuts(condition: Any, var: Any) -> list[int] | None:
    """Where ``condition`` (comparisons of ``var`` alone with constants, combined by
    and, or, not) can change its value along ``var``: ``c`` for ``c <= var`` or ``var < c``,
    ``c + 1`` for ``var <= c`` or ``c < var``, both for ``var == c``. None for any other."""
    from tvm import tirx

    from rewriter.backends.tvm.vector_tails import uses

    if not uses(condition, var):
        return []
    if isinstance(condition, (tirx.And, tirx.Or)):
        left, right = _cuts(condition.a, var), _cuts(condition.b, var)
        return None if left is None or right is None else left + right
    if isinstance(condition, tirx.Not):
        return _cuts(condition.a, var)
    # (the constant's side, then the other's): how far past the constant the value changes
    past = {tirx.LE: (0, 1), tirx.LT: (1, 0), tirx.GE: (1, 0), tirx.GT: (0, 1)}
    for kind, (constant_first, constant_second) in past.items():
        if isinstance(condition, kind):
            if isinstance(condition.a, tirx.IntImm) and condition.b.same_as(var):
                return [int(condition.a) + constant_first]
            if isinstance(condition.b, tirx.IntImm) and condition.a.same_as(var):
                return [int(condition.b) + constant_second]
            return None
    if isinstance(condition, (tirx.EQ, tirx.NE)):
        constant = condition.a if isinstance(condition.a, tirx.IntImm) else condition.b
        other = condition.b if constant is condition.a else condition.a
        if isinstance(constant, tirx.IntImm) and other.same_as(var):
            return [int(constant), int(constant) + 1]
    return None


def _stored_value(block: Any, loops: int) -> Any:
    """The value ``block`` stores, where its iterators are its ``loops`` loops one to one
    and its body one store; None otherwise."""
    from tvm import tirx

    if len(block.iter_vars) != loops or not isinstance(block.body, tirx.BufferStore):
        return None
    return block.body.value


def divisions(block: Any, loops: int) -> list[tuple[Any, int]] | None:
    """``(dividend, divisor)`` of each floor division or remainder by a constant in the
    value ``block`` stores (its loads' index arithmetic); None where :func:`_stored_value`
    is. What :func:`row_period` and :func:`decoded_tail` read."""
    import tvm_ffi
    from tvm import tirx

    value = _stored_value(block, loops)
    if value is None:
        return None
    found: list[tuple[Any, int]] = []

    def note(node: Any) -> Any:
        if isinstance(node.b, tirx.IntImm):
            found.append((node.a, int(node.b)))
        return node

    tvm_ffi.structural_map(value, [(tirx.FloorDiv, note), (tirx.FloorMod, note)], order="post")
    return found


def decoded_tail(block: Any, divided: list[tuple[Any, int]], static: int) -> int | None:
    """How many of ``block``'s axes follow the last one among its ``static`` trailing
    axes, the innermost aside (:func:`row_period`), whose iterator one of the ``divided``
    dividends (:func:`divisions`) holds (a channel shuffle's ``c % 2 * 116 + c // 2``);
    None where none does."""
    from rewriter.backends.tvm.vector_tails import uses

    iter_vars = block.iter_vars
    axes = range(len(iter_vars) - static, len(iter_vars) - 1)
    decoded = [i for i in axes if any(uses(dividend, iter_vars[i].var) for dividend, _ in divided)]
    return len(iter_vars) - 1 - max(decoded) if decoded else None


def row_period(block: Any, divided: list[tuple[Any, int]], extent: int) -> int | None:
    """The greatest common divisor of ``extent`` and every divisor among ``divided``
    (:func:`divisions`) whose dividend holds ``block``'s innermost iterator (``x // 24``,
    ``x % 24``: a row of heads read from ``[..., heads, tokens, 24]``); None if none does.
    A vector whose lanes divide it never straddles two of those periods, so its loads stay
    contiguous."""
    from rewriter.backends.tvm.vector_tails import uses

    var = block.iter_vars[-1].var
    divisors = [divisor for dividend, divisor in divided if uses(dividend, var)]
    return math.gcd(extent, *divisors) if divisors else None


def row_width(length: int, lanes: int, period: int | None) -> int:
    """The widest vector, of ``lanes`` or a half or a quarter of them (at least 2), that
    divides a row of ``length`` and its ``period`` (:func:`row_period`; None: any); 0 if
    none does.

    >>> row_width(196, 16, None), row_width(288, 16, 12), row_width(7, 16, None)
    (4, 4, 0)
    """
    return next(
        (
            w
            for w in (lanes, lanes // 2, lanes // 4)
            if w >= 2 and length % w == 0 and (period is None or period % w == 0)
        ),
        0,
    )


def _spreads(sch: Any, tail: Any, reduction: Any) -> bool:
    """Whether the block ``tail`` iterates over more elements than ``reduction``'s spatial
    iterators do, at static extents (a pad after a matmul: the register tiles would write
    its result only where the matmul's output lies, the padding left unwritten)."""
    from tvm import tirx

    def size(block: Any, spatial_only: bool) -> int | None:
        total = 1
        for iv in sch.get(block).iter_vars:
            if spatial_only and iv.iter_type != tirx.IterVar.DataPar:
                continue
            if not isinstance(iv.dom.extent, tirx.IntImm):
                return None
            total *= int(iv.dom.extent)
        return total

    wide, narrow = size(tail, False), size(reduction, True)
    return wide is not None and narrow is not None and wide > narrow


def gathered_at_taps(sch: Any, block: Any) -> bool:
    """Whether a consumer of ``block`` reads the buffer it writes at :data:`GATHER_MIN_TAPS`
    or more distinct indices (the taps of a resize), not once per element."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    (written,) = [region.source for region in sch.get(block).writes]
    for consumer in sch.get_consumers(block):
        body = sch.get(consumer).body
        if not isinstance(body, tirx.BufferStore):
            continue
        taps: list[Any] = []

        def note(node: Any, taps: list[Any] = taps) -> Any:
            if node.source.same_as(written) and not any(
                tvm_ffi.structural_equal(list(node.indices), list(tap)) for tap in taps
            ):
                taps.append(node.indices)
            return node

        tvm_ffi.structural_map(body.value, [(tvm.ir.TensorLoad, note)], order="post")
        if len(taps) >= GATHER_MIN_TAPS:
            return True
    return False


def copies(block: Any) -> bool:
    """Whether ``block`` stores a value it loads, unchanged (a transpose, a reshape)."""
    import tvm
    from tvm import tirx

    body = block.body
    return isinstance(body, tirx.BufferStore) and isinstance(body.value, tvm.ir.TensorLoad)


def rule(name: str) -> type:
    """One of this module's rule classes by name: ``matmul``, ``row_reduction``,
    ``elementwise``."""
    return _rules()[name]  # type: ignore[no-any-return]


def cpu_rule_base() -> type:
    """The base class of our CPU rules (``_schedule(func)`` returns a schedule or None)."""
    return _rules()["base"]  # type: ignore[no-any-return]


def tile_scope(tile_i: int, tile_j: int, itemsize: int = 4) -> str:
    """The scope of a ``tile_i x tile_j`` register tile's buffer: ``global`` where it fits
    the stack (:data:`STACK_BYTES`), else ``local`` (a workspace allocation per tile).

    >>> tile_scope(7, 32), tile_scope(8, 16), tile_scope(8, 32)
    ('global', 'global', 'local')
    """
    return "global" if tile_i * tile_j * itemsize < STACK_BYTES else "local"


def stack_height(limit: int, tile_j: int, itemsize: int = 4) -> int:
    """The tallest tile height up to ``limit`` whose tile fits the stack (:func:`tile_scope`)
    and keeps at least 3/4 of the ``limit``'s accumulators; else ``limit`` (for a ragged
    tile, which need not divide anything: 4 x 64 floats are 1 KiB, a workspace per
    tile; 3 x 64 stay on the stack).

    >>> stack_height(4, 64), stack_height(8, 32), stack_height(8, 16), stack_height(2, 256)
    (3, 7, 8, 2)
    """
    return next(_stack_heights(limit, tile_j, itemsize), limit)


def stack_rows(rows: int, limit: int, tile_j: int, itemsize: int = 4) -> int | None:
    """The tallest tile height dividing ``rows`` whose tile fits the stack
    (:func:`tile_scope`), where it keeps at least 3/4 of the ``limit``'s accumulators
    (ResNet's 56 x 56 pixels: 7 x 32 tiles, not 8 x 32 ones in a workspace); else None.

    >>> stack_rows(3136, 8, 32), stack_rows(4096, 8, 32), stack_rows(4096, 8, 16)
    (7, None, 8)
    """
    return next((h for h in _stack_heights(limit, tile_j, itemsize) if rows % h == 0), None)


def _stack_heights(limit: int, tile_j: int, itemsize: int) -> Iterator[int]:
    """Tile heights from ``limit`` down to 3/4 of it whose tile fits the stack."""
    for height in range(limit, 0, -1):
        if 4 * height < 3 * limit:
            return
        if tile_scope(height, tile_j, itemsize) == "global":
            yield height


def tile_rows(tile_j: int, lanes: int) -> int:
    """Rows of a register tile ``tile_j`` wide, at most: accumulators fill the registers."""
    accumulators = ACCUMULATORS.get(lanes * 32, 12)
    return min(MAX_TILE_ROWS, max(accumulators * lanes // tile_j, 1))


def row_block(rows: int, depth: int, tile_i: int) -> int:
    """Rows of A per block (a multiple of ``tile_i`` that divides ``rows``): all of them
    if ``rows x depth`` floats fit ROW_BLOCK_BYTES (a convolution's rows are its output
    pixels, ``depth`` the input floats per pixel)."""
    limit = max(ROW_BLOCK_BYTES // (4 * depth), tile_i)
    return _largest_divisor(rows, limit, tile_i) or tile_i


def k_block(rows: int, depth: int, cols: int) -> int:
    """Depth of the blocks the matmul's ``k`` loop is cut into, or 0 to keep it whole.

    The row blocks of A (:func:`row_block`) hold whole rows, ``depth`` floats each, in
    half of L2: at a large depth they are short, and B, when it does not fit in L2
    either, is read from memory once per row block (ViT-B/16's 3072 x 768 MLP weight:
    1.2-1.3x ONNX Runtime's time). Cut into blocks of at most :data:`K_CHUNK` (a divisor
    of ``depth``), the row blocks grow by as much, B's traffic shrinks by as much, and
    the partial sums add up in C. Static rows only.

    >>> k_block(197, 3072, 768), k_block(197, 768, 2304), k_block(64, 3072, 768)
    (768, 0, 0)
    """
    if not (K_CHUNK and rows and depth) or depth < 2 * K_CHUNK:
        return 0
    if 4 * rows * depth <= ROW_BLOCK_BYTES or 4 * depth * cols <= 2 * ROW_BLOCK_BYTES:
        return 0
    return _largest_divisor(depth, K_CHUNK, K_UNROLL) or 0


def dividing_tile(extent: Any, limit: int, multiple_of: int = 1) -> int | None:
    """The largest ``t <= limit``, a multiple of ``multiple_of``, that provably divides
    the symbolic ``extent`` (``(n + 7) // 8 * 8``: 8), or None where none does (1 aside)."""
    from tvm import sym, tirx

    analyzer = sym.Analyzer()
    for candidate in range(limit, 1, -1):
        if candidate % multiple_of == 0 and analyzer.can_prove(
            tirx.floormod(extent, candidate) == 0
        ):
            return candidate
    return None


def _largest_divisor(extent: int, limit: int, multiple_of: int = 1) -> int | None:
    """The largest divisor of ``extent`` that is ``<= limit`` and a multiple of ``multiple_of``."""
    for candidate in range(min(extent, limit), 0, -1):
        if extent % candidate == 0 and candidate % multiple_of == 0:
            return candidate
    return None


_RULES: dict[str, Any] = {}
# Marks the lanes loop of a column reduction, made vectorized after scheduling.
_LANES = "rewriter.column_lanes"


def _rules() -> dict[str, Any]:
    """The rule classes (defined on first use: tvm is imported lazily)."""
    if _RULES:
        return _RULES
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import ScheduleRule

    def static_extents(sch: Any, loops: list[Any]) -> list[int] | None:
        extents = []
        for loop in loops:
            extent = sch.get(loop).extent
            if not isinstance(extent, tirx.IntImm):
                return None
            extents.append(int(extent.value))
        return extents

    class CpuRule(ScheduleRule):
        """A rule for LLVM targets: ``_schedule`` returns a schedule, or None to pass the
        function on; a schedule primitive that refuses also passes it on (logged)."""

        what = "cpu"

        def __init__(self, lanes: int, prefetch_tiles: int | None = None) -> None:
            self.lanes = lanes
            # streams_weight's max_tiles: prefetch_max_tiles of the target.
            self.prefetch_tiles = prefetch_tiles

        def apply(self, func: tirx.PrimFunc, target: Any, _tunable: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
                return None
            try:
                return self._schedule(func)
            except Exception as exc:  # a primitive refused: leave the function to other rules
                logger.debug("%s schedule not applied: %s", self.what, exc)
                return None

        def _schedule(self, func: tirx.PrimFunc) -> Any:
            raise NotImplementedError

    class RegisterTiledMatmul(CpuRule):
        """``C[..., i, j] += A[..., i, k] * B[..., k, j]`` (+ elementwise epilogue), register-tiled.

        B is read either as ``B[..., k, j]`` or packed, ``Bp[j // NB, k, j % NB]``
        (:mod:`rewriter.backends.tvm.relax_passes.pack_weights`); a packed B fixes the tile's width to NB.
        """

        what = "matmul"

        def _schedule(self, func: tirx.PrimFunc) -> Any:
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            reductions = [info for info in infos if not info.is_injective()]
            if len(reductions) != 1 or not reductions[0].dom_kind().endswith("SR"):
                return None
            packed = _matmul_b_layout(sch, reductions[0].block_rv, self.lanes)
            if packed is None:
                return None
            gemv = not reductions[0].dom_kind().endswith("SSR")
            if not packed:  # a packed B was padded, if need be, when it was packed
                infos = self._pad(sch, infos, reductions[0].block_rv, gemv)
                reductions = [info for info in infos if not info.is_injective()]
                if len(reductions) != 1:
                    return None
            position = infos.index(reductions[0])
            # Producers (e.g. a transpose of B) are computed inline into the matmul, or
            # into the zero-padded copy of its input they feed; those copies stay apart.
            pad_copies = [info.block_rv for info in infos[:position] if _is_pad(sch, info)]
            for info in infos[:position]:
                if not _is_pad(sch, info):
                    sch.compute_inline(info.block_rv)
            epilogue = infos[position + 1 :]
            if epilogue and _spreads(sch, epilogue[-1].block_rv, reductions[0].block_rv):
                return None  # an epilogue over more elements (a pad): the tiles cover too few
            for info in epilogue[:-1]:
                sch.compute_inline(info.block_rv)
            block = reductions[0].block_rv
            loops = sch.get_loops(block)
            # Batch loops may be symbolic (a model compiled for any batch size): they only
            # feed the parallel loop. Symbolic rows (batch x tokens) and columns (keys)
            # were padded to whole register tiles, and depth (keys, for P x V) is a loop.
            if gemv:
                # One row (a GEMV, its unit row loop normalized away): tile a unit loop.
                sch.add_unit_loop(loops[-2])
                loops = sch.get_loops(block)
            elif row_iterator(sch.get(block)) == -4:
                # Sequence-first: the static tokens are the rows, the batch outside.
                sch.reorder(loops[-3], loops[-4])
                loops = sch.get_loops(block)
            *batch, i, j, k = loops
            if packed and batch and not gemv:
                batch, i = self._shared_rows(sch, block, batch, i, packed)
            rows = 1 if gemv else (static_extents(sch, [i]) or [0])[0]
            cols = (static_extents(sch, [j]) or [0])[0]
            depth = (static_extents(sch, [k]) or [0])[0]
            if cols:
                tile = register_tile(rows or MAX_TILE_ROWS, cols, self.lanes, packed)
            else:
                width = dividing_tile(sch.get(j).extent, PANEL_VECTORS * self.lanes, self.lanes)
                tile = (1, width) if width else None
            if tile is None:
                return None
            tile_i, tile_j = tile
            if not rows:  # symbolic: the tallest tile that divides the (padded) rows
                tile_i = dividing_tile(sch.get(i).extent, tile_rows(tile_j, self.lanes)) or 1
            elif not gemv:  # a tile on the stack, in registers, where one divides the rows
                tile_i = stack_rows(rows, tile_rows(tile_j, self.lanes), tile_j) or tile_i
            jo, ji = sch.split(j, [None, tile_j])
            chunk = k_block(rows, depth, cols)
            ko = None
            if chunk:
                ko, k = sch.split(k, [None, chunk])
                depth = chunk
            k_loops = [k]
            if depth % K_UNROLL == 0 and depth > K_UNROLL:
                k_loops = list(sch.split(k, [None, K_UNROLL]))
            if rows:
                rows_per_block = row_block(rows, depth, tile_i) if depth else tile_i
                mc, mo, mi = sch.split(i, [None, rows_per_block // tile_i, tile_i])
                outer = [*batch, mc, jo]
            else:
                # Symbolic rows, padded to whole tiles: no row of the micro-kernel is
                # masked (TVM's LoopPartition, which would peel a masked last tile off,
                # fails on symbolic bounds, and a branch per row costs 2x).
                mo, mi = sch.split(i, [None, tile_i])
                outer = [*batch, jo]
            # Panels of B outside, rows of A inside: a K x tile_j panel of B stays in
            # cache while every row tile of the row block streams past it (the other way
            # round where all of B fits L2 and C is past it, or the threads get row tiles
            # to split: rows_outside).
            scope = tile_scope(tile_i, tile_j)
            if ko is not None:
                # Column blocks of PANEL_GROUP panels, each through every k block.
                group = _largest_divisor(-(-cols // tile_j), PANEL_GROUP) or 1
                jb, jg = sch.split(jo, [None, group])
                sch.reorder(*batch, mc, jb, ko, mo, jg, *k_loops, mi, ji)
                return self._k_blocked(
                    sch, block, len(batch) + 2, len(k_loops), epilogue, pad_copies, scope
                )
            static_batch = static_extents(sch, batch)
            tiles = -(-rows // tile_i) if rows else 0
            row_tiles = None
            if rows and static_batch is not None:
                row_tiles = math.prod(static_batch) * tiles
            elif rows and rows_per_block == rows:
                # A symbolic batch counted as SYMBOLIC_BATCH items, as in rows_outside;
                # the batch, fused into the parallel loop with the row tiles, is one fork.
                items = [(static_extents(sch, [loop]) or [SYMBOLIC_BATCH])[0] for loop in batch]
                row_tiles = math.prod(items) * tiles
            swept = bool(rows and cols and depth) and rows_outside(rows, depth, cols, row_tiles)
            if swept:  # row tiles outside, every panel swept per row tile
                outer = [*batch, mc, mo]
                sch.reorder(*outer, jo, *k_loops, mi, ji)
            else:
                sch.reorder(*outer, mo, *k_loops, mi, ji)
            tile_loop = jo if swept else mo
            apart = bool(epilogue) and not _provably_covered(sch, epilogue[-1].block_rv)
            if apart:  # the tile accumulates in the padded result; the epilogue a pass after
                tail = None
            elif epilogue:
                tail = epilogue[-1].block_rv
                sch.reverse_compute_at(tail, tile_loop)
                sch.set_scope(block, 0, scope)
            else:
                tail = sch.cache_write(block, 0, scope)
                sch.reverse_compute_at(tail, tile_loop)
            # Annotate before decompose_reduction: the update block alone is no longer
            # a reduction block, and vectorize/parallel refuse loops over it.
            sch.vectorize(ji)
            sch.unroll(mi)
            if len(k_loops) == 2:
                sch.unroll(k_loops[1])
            if tail is None:
                rows_parallel(sch, epilogue[-1].block_rv, self.lanes)
            elif (static_extents(sch, sch.get_loops(tail)[-1:]) or [1])[0] % self.lanes == 0:
                sch.vectorize(sch.get_loops(tail)[-1])
            if not cols and batch:
                # Symbolic panels stay a serial loop inside the parallel batch: fused into
                # it, their index is a division by a run-time extent, evaluated per
                # element in the epilogue's bounds check (LLVM cannot hoist a division
                # out of a branch): the attention scores ran at 8x the fixed-size time.
                sch.parallel(sch.fuse(*batch) if len(batch) > 1 else batch[0])
            elif swept and static_batch is None and rows_outside(rows, depth, cols):
                # A symbolic batch stays a serial loop outside: fused with it, the row
                # tiles' index let the register tile's buffer grow to 51 KB (ConvNeXt's
                # 3136 x 384 x 96 MLP, 2.2x its time under a fixed batch).
                symbolic = [static_extents(sch, [loop]) is None for loop in batch]
                last = len(symbolic) - symbolic[::-1].index(True)
                sch.parallel(sch.fuse(*batch[last:], mc, mo))
            else:
                sch.parallel(sch.fuse(*outer))
            sch.decompose_reduction(block, k_loops[0])
            for copy in pad_copies:
                # Once per call, before the matmul: rows in parallel, vectorized along them.
                self._unmasked_copy(sch, copy)
                *outer, inner = sch.get_loops(copy)
                sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
                if static_extents(sch, [inner]) is not None:
                    sch.vectorize(inner)
                elif dividing_tile(sch.get(inner).extent, self.lanes, self.lanes):
                    sch.vectorize(sch.split(inner, [None, self.lanes])[1])  # padded columns
            limit = PREFETCH_MAX_TILES if self.prefetch_tiles is None else self.prefetch_tiles
            # Symbolic rows: the prefetches spread as over a share of the most row tiles
            # that gain (SYMBOLIC_PREFETCH_SHARE), where the row tiles at run time gain.
            nominal = tiles or max(1, limit // SYMBOLIC_PREFETCH_SHARE)
            if packed and not swept and streams_weight(depth * cols * 4, tile_i, nominal, limit):
                # The update's loops: parallel (..., panels), row tiles, k (and its
                # unrolled steps), the tile; it reads C, A, B.
                kernel = [sch.get(loop) for loop in sch.get_loops(block)]
                parallel, row_tile, k_outer = kernel[:3]
                steps = int(kernel[3].extent) if len(k_loops) == 2 else 1
                weight = sch.get(block).reads[-1].source
                panel = tirx.floormod(parallel.loop_var, int(weight.shape[0]))
                position = row_tile.loop_var * k_outer.extent + k_outer.loop_var
                guard = None
                if not tiles:  # the next panel once, by the first row tiles; where few enough run
                    guard = tirx.all(position < nominal * k_outer.extent, row_tile.extent <= limit)
                return prefetch_next_panel(
                    sch, weight, k_outer, panel, position, (nominal, steps), guard
                )
            return sch

        def _unmasked_copy(self, sch: Any, copy: Any) -> None:
            """Zero-padded ``copy`` (static rows) as two vector loops per row: zeros over the
            padded row, then the input's row over its real part. As one loop its
            ``if_then_else(j < n, ...)`` made TVM's vectorizer write it element by element
            (Whisper's K^T, 64 x 1504 per head: 385k scalar stores a call)."""
            inner = sch.get_loops(copy)[-1]
            if static_extents(sch, [inner]) is None or not sch.can_decompose_padding(copy, inner):
                return
            zeros = sch.decompose_padding(copy, inner)
            sch.vectorize(sch.get_loops(zeros)[-1])

        def _shared_rows(
            self, sch: Any, block: Any, batch: list[Any], i: Any, width: int
        ) -> tuple[list[Any], Any]:
            """``(batch, i)``, the static batch loops next to the rows fused into them
            where the rows alone are fewer than :data:`MIN_PANEL_ROWS`: the packed weight is
            the same for every batch iteration, and each of its panels should serve many
            rows while it is in cache. ConvNeXt's MLP over ``[1, 7, 7, 768]`` had rows of
            7 pixels inside a loop over the 7 image rows: every image row streamed the
            9 MiB weight again. Fused, the 49 pixels are 7 tiles of one sweep. Only where
            the fused rows' register tile divides the inner rows or is a multiple of them
            (the epilogue of a tile then covers whole image rows or a part of one)."""
            inner = static_extents(sch, [i])
            if not inner or inner[0] >= MIN_PANEL_ROWS:
                return batch, i
            shared: list[Any] = []
            total = inner[0]
            for loop in reversed(batch):
                extent = static_extents(sch, [loop])
                if extent is None or total >= MIN_PANEL_ROWS:
                    break
                shared.insert(0, loop)
                total *= extent[0]
            if not shared:
                return batch, i
            tile_i = (register_tile(total, width, self.lanes, width) or (1, width))[0]
            tile_i = stack_rows(total, tile_rows(width, self.lanes), width) or tile_i
            if tile_i % inner[0] and inner[0] % tile_i:
                return batch, i
            return batch[: len(batch) - len(shared)], sch.fuse(*shared, i)

        def _k_blocked(
            self,
            sch: Any,
            block: Any,
            n_outer: int,
            n_k: int,
            epilogue: list[Any],
            pad_copies: list[Any],
            scope: str,
        ) -> Any:
            """Schedule ``block``, its loops ``outer..., ko, mo, jg, k..., mi, ji`` (``n_outer``
            parallel loops: batch, row blocks, column blocks) in depth blocks (:func:`k_block`):
            in each column block, for each block of ``k``, each register tile (``rfactor``:
            the block's partial sums) adds into C; C's block is zeroed before its first
            ``k`` block, and the epilogue reads C after, row-parallel."""
            from tvm import tirx

            loops = sch.get_loops(block)
            rf = sch.rfactor(loops[n_outer], factor_axis=0)
            sch.set_scope(rf, 0, scope)  # the register tile: on the stack if it fits
            loops = sch.get_loops(rf)
            sch.reverse_compute_at(block, loops[n_outer + 2])  # after each tile's k loop
            sch.vectorize(loops[-1])
            sch.unroll(loops[-2])
            if n_k == 2:
                sch.unroll(loops[-3])
            accumulate = sch.get_loops(block)
            sch.vectorize(accumulate[-1])
            sch.unroll(accumulate[-2])
            sch.parallel(sch.fuse(*loops[:n_outer]) if n_outer > 1 else loops[0])
            sch.decompose_reduction(rf, loops[n_outer + 3])
            zero = sch.decompose_reduction(block, loops[n_outer])  # C's block, in the thread
            inner = sch.get_loops(zero)[-1]
            extent = sch.get(inner).extent
            if isinstance(extent, tirx.IntImm) and int(extent) % self.lanes == 0:
                sch.vectorize(sch.split(inner, [None, self.lanes])[1])
            for nest in [*pad_copies, *[info.block_rv for info in epilogue[-1:]]]:
                rows_parallel(sch, nest, self.lanes)
            return sch

        def _pad(self, sch: Any, infos: list[Any], block: Any, gemv: bool) -> list[Any]:
            """``infos`` once matmul ``block`` (B unpacked) is padded to whole register
            tiles, if it needs to be (:func:`padding`, :func:`zero_pad`). Symbolic rows go
            to a multiple of the tile's height and symbolic columns to whole panels, always:
            a masked tile would branch per row (TVM's LoopPartition, which would peel it
            off, fails on symbolic bounds). A copy of B costs depth x columns, against
            rows x depth x columns for the matmul."""
            loops = sch.get_loops(block)
            row = row_iterator(sch.get(block))
            rows = 1 if gemv else (static_extents(sch, [loops[row]]) or [0])[0]
            cols = (static_extents(sch, loops[-2:-1]) or [0])[0]
            if cols:
                depth = (static_extents(sch, loops[-1:]) or [0])[0]
                pad_i, pad_j = padding(rows or 1, cols, self.lanes, depth=depth)
                tile = register_tile(MAX_TILE_ROWS, -(-cols // pad_j) * pad_j, self.lanes)
                width = tile[1] if tile is not None else PANEL_VECTORS * self.lanes
            else:
                width = pad_j = PANEL_VECTORS * self.lanes
                pad_i = 1
            if not rows:
                pad_i = tile_rows(width, self.lanes)
            if not zero_pad(sch, block, (pad_i, pad_j)):
                return infos
            return normalize_prim_func(sch) or []

    def _provably_covered(sch: Any, tail: Any) -> bool:
        """Whether TVM proves that the padded result covers what matmul epilogue ``tail``
        reads, which ``reverse_compute_at`` needs. Its analyzer cannot prove ``2n <= (2n +
        7) // 8 * 8`` (rows with a constant factor: XLNet's relative positions, ``2 *
        sequence * batch``); there the epilogue stays a pass of its own after the matmul,
        rows in parallel, and the register tiles are whole (else the function went to
        TVM's scalar lowering: 32 of the model's 40 ms). The flag is TVM's own, cached
        per block by the schedule state (its ``_get_cached_flags``: a private method; a
        TVM without it raises, and the rule passes the function on)."""
        return bool(sch.state._get_cached_flags(sch.get_sref(tail)).region_cover)

    def _is_pad(sch: Any, info: Any) -> bool:
        return PAD_ANNOTATION in sch.get(info.block_rv).annotations

    def _matmul_b_layout(sch: Any, block: Any, lanes: int) -> int | None:
        """0 for ``A[..., i, k] * B[..., k, j]``, NB for a packed ``Bp[j // NB, k, j % NB]``,
        None for anything else (``lanes``: of the target's vectors)."""
        stmt = sch.get(block)
        if len(stmt.reads) != 2 or len(stmt.writes) != 1:
            return None
        j_var = stmt.iter_vars[-2].var
        k_var = stmt.iter_vars[-1].var
        a_index = [r.min for r in stmt.reads[0].region]
        b_index = [r.min for r in stmt.reads[1].region]
        if not a_index[-1].same_as(k_var) or len(b_index) < 2:
            return None
        if b_index[-1].same_as(j_var) and b_index[-2].same_as(k_var):
            if len(b_index) == 3 and _one_panel(
                b_index[0], stmt.iter_vars[-2], stmt.reads[1].source, PANEL_VECTORS * lanes
            ):
                return int(stmt.reads[1].source.shape[2])
            return 0
        return _packed_width(b_index, j_var, k_var, stmt.reads[1].source)

    def _one_panel(panel: Any, j_iter: Any, buffer: Any, widest: int) -> bool:
        """Whether B is packed in one panel as wide as the output: ``Bp[0, k, j]``, the
        ``j // NB`` and ``j % NB`` of :func:`_packed_width` simplified away (a head of 32
        classes: unrecognized, it fell to TVM's generic reduction, 46x ORT's time at
        symbolic rows). Not past ``widest`` (a panel's width, :func:`pack_width`): a
        batched product of one batch, ``B[0, k, j]``, reads the same (Mask2Former's
        masks, 50 queries x 3136 pixels, were one tile 3136 columns wide: 7.4 ms a call,
        5 GFLOP/s)."""
        width = buffer.shape[2]
        return (
            isinstance(panel, tirx.IntImm)
            and int(panel) == 0
            and isinstance(buffer.shape[0], tirx.IntImm)
            and int(buffer.shape[0]) == 1
            and isinstance(width, tirx.IntImm)
            and int(width) <= widest
            and isinstance(j_iter.dom.extent, tirx.IntImm)
            and int(j_iter.dom.extent) == int(width)
        )

    def _packed_width(index: list[Any], j_var: Any, k_var: Any, buffer: Any) -> int | None:
        if len(index) != 3 or not index[1].same_as(k_var):
            return None
        div, mod = index[0], index[2]
        if not (isinstance(div, tirx.FloorDiv) and isinstance(mod, tirx.FloorMod)):
            return None
        width = buffer.shape[2]
        for expr in (div, mod):
            if not (expr.a.same_as(j_var) and isinstance(expr.b, tirx.IntImm)):
                return None
            if not isinstance(width, tirx.IntImm) or int(expr.b) != int(width):
                return None
        return int(width)

    class VectorizedRowReduction(CpuRule):
        """Reductions over the last axis with elementwise neighbours (layer norm, softmax).

        One row per iteration of the parallel loop, every block computed at it. Each
        sum or max over the row is split by the vector width and ``rfactor``-ed: the
        row accumulates ``lanes`` partial results in one vector (FMA-free adds, no
        loop-carried scalar chain), then folds them. Elementwise blocks with a single
        consumer are inlined, the others vectorized.
        """

        what = "row reduction"

        def _schedule(self, func: tirx.PrimFunc) -> Any:
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is not None and self._lone_row_reduction(infos):
                return self._reduction_last(sch, infos)
            if infos is None or len(infos) < 2 or not infos[-1].is_injective():
                return None
            kinds = [info.dom_kind() for info in infos]
            if all(info.is_injective() for info in infos):
                return None
            lead = min(len(kind) - len(kind.lstrip("S")) for kind in kinds)
            # One row: the elementwise blocks lost its unit axis to normalization (their
            # one loop runs along the row), the reductions kept it ("SR"). The row loop is
            # a unit loop added to the last block. (dlight's Reduction, which took these
            # before, nested the whole softmax in a loop over the row's elements: 2.4 ms
            # for a 1000-class head, 9.7 ms for 1500.)
            # A last block with one loop is one row only where the reductions reduce one
            # row: a norm's statistics over 256 rows of 3199 (variance -> sqrt) end in a
            # block over the 256 rows, which must stay the parallel row loop.
            single_row = (
                len(sch.get_loops(infos[-1].block_rv)) == 1
                and not infos[-1].dom_kind().endswith("R")
                and all(
                    _spatial_size(sch, info.block_rv) == 1
                    for info in infos
                    if not info.is_injective()
                )
            )
            if single_row:
                lead = 1
            if lead == 0:
                return None
            for info, kind in zip(infos, kinds, strict=True):
                if not info.is_injective() and kind != "S" * (len(kind) - 1) + "R":
                    return None
            for info in infos[:-1]:
                if info.is_injective() and len(sch.get_consumers(info.block_rv)) == 1:
                    sch.compute_inline(info.block_rv)
            blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
            if not single_row and any(self._ragged(sch, block) for block in blocks[:-1]):
                return self._nest_by_nest(sch, blocks, lead)
            partials = []
            for block in blocks[:-1]:
                if _is_reduction(sch, block):
                    partial = self._vector_partials(sch, block)
                    if partial is not None:
                        partials.append(partial)
            if single_row:
                sch.add_unit_loop(sch.get_loops(blocks[-1])[0])
            loops = sch.get_loops(blocks[-1])
            if len(loops) < lead:  # (as many: one value per row, a norm's statistics)
                return None
            row = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
            sch.parallel(row)
            self._vectorize_inner(sch, blocks[-1])
            for block in reversed(sch.get_child_blocks(sch.get_sblock("root"))[:-1]):
                sch.compute_at(block, row, preserve_unit_loops=True)
            for block in sch.get_child_blocks(sch.get_sblock("root"))[:-1]:
                if not _is_reduction(sch, block):
                    self._vectorize_inner(sch, block)
            for partial in partials:
                if not self._vectorize_partial(sch, partial):
                    return None
            return sch

        def _vectorize_partial(self, sch: Any, partial: Any) -> bool:
            """The partial sums of ``partial`` (an ``rfactor`` computed at its row loop:
            under the row the lane loop first, unit loops, the chunk loop last) in one
            vector, the chunk loop inside; False where the lanes are not one vector."""
            loops = sch.get_loops(partial)
            lane, chunk = loops[1], loops[-1]
            if static_extents(sch, [lane]) != [self.lanes]:
                return False
            sch.reorder(chunk, lane)
            sch.vectorize(lane)
            sch.decompose_reduction(partial, chunk)
            return True

        @staticmethod
        def _lone_row_reduction(infos: list[Any]) -> bool:
            """Whether the function ends in its one reduction, over the last axis, with
            only elementwise blocks before it (``(a * b).sum(-1)``: Deformable DETR's
            sampled values weighted and summed, 16 points a head)."""
            kind = infos[-1].dom_kind()
            return (
                not infos[-1].is_injective()
                and len(kind) >= 2
                and kind == "S" * (len(kind) - 1) + "R"
                and all(info.is_injective() for info in infos[:-1])
            )

        def _reduction_last(self, sch: Any, infos: list[Any]) -> Any:
            """A function ending in its row reduction (:meth:`_lone_row_reduction`): the
            elementwise blocks inlined, the output's elements in parallel, and the row
            summed as ``lanes`` partial sums in a vector (a reduction of a whole number
            of vectors) before one fold; TVM's default lowering ran it scalar on one
            thread (4x ONNX Runtime's time)."""
            for info in infos[:-1]:
                if len(sch.get_consumers(info.block_rv)) != 1:
                    return None
                sch.compute_inline(info.block_rv)
            block = sch.get_child_blocks(sch.get_sblock("root"))[-1]
            extents = static_extents(sch, sch.get_loops(block)[-1:])
            partial = None
            if extents is not None and extents[0] >= self.lanes and extents[0] % self.lanes == 0:
                _, lane = sch.split(sch.get_loops(block)[-1], [None, self.lanes])
                partial = sch.rfactor(lane, factor_axis=len(sch.get(block).writes[0].region))
            loops = sch.get_loops(block)
            row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
            sch.parallel(row)
            if partial is not None:
                sch.compute_at(partial, row, preserve_unit_loops=True)
                if not self._vectorize_partial(sch, partial):
                    return None
            return sch

        def _ragged(self, sch: Any, block: Any) -> bool:
            """Whether ``block`` reduces over a static extent that no vector divides (of at
            least :data:`RAGGED_MIN_EXTENT`) or over a symbolic one."""
            if not _is_reduction(sch, block):
                return False
            extents = static_extents(sch, sch.get_loops(block)[-1:])
            if extents is None:  # symbolic (frames of audio of any length): may be ragged
                return True
            return extents[0] >= RAGGED_MIN_EXTENT and extents[0] % self.lanes != 0

        def _nest_by_nest(self, sch: Any, blocks: list[Any], lead: int) -> Any:
            """Each block in its own loop nest, rows in parallel, for functions with a row
            reduction over an extent no vector divides (wav2vec2's group norm over 3199
            frames): such a reduction ran scalar, a loop-carried add per element, at 10x
            the time of 3200. Its ``lanes`` partial results (:meth:`_vector_partials`)
            come from a split whose predicate masks the last vector's lanes past the row;
            ``pragma_loop_partition_hint`` has TVM's ``LoopPartition`` peel that last
            vector off, so all the others are whole vectors. The predicate survives only
            where the partial block is never moved: ``compute_at`` rebuilds a block's
            loops from the regions it must cover and drops it (the partial sums then read
            past the row), so no nest is computed at another's row loop here, and the row
            is read once per reduction (from cache: a few KiB). Each fold of a row's
            partial sums is moved into the row loop that made them instead
            (``reverse_compute_at`` rebuilds the fold's loops, which have no predicate):
            the partials are then one vector a row, an allocation of 64 bytes on the stack
            that LLVM keeps in a register, not a heap buffer of every row's that each
            vector of the row stored to and reloaded (wav2vec2's group-norm statistics
            over a symbolic number of frames: 0.48 -> 0.19 ms). Under a symbolic row count
            the hint is left out: TVM's LoopPartition then mixed int32 and int64 bounds
            (the data-type narrowing before it had made the vector loops int32) and the
            build failed (Swin's window softmax, [batch x 64, 2, 49, 49], compiled
            without the rewrite); ``vector_tails`` splits the masked vector off instead."""
            rows = sch.get_loops(blocks[0])[:lead]
            hint = static_extents(sch, rows) is not None
            for block in blocks:
                reduction = _is_reduction(sch, block)
                partial = self._vector_partials(sch, block, ragged=True) if reduction else None
                loops = sch.get_loops(partial if partial is not None else block)
                if len(loops) < lead:
                    return None
                row = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
                sch.parallel(row)
                if partial is not None:
                    sch.reverse_compute_at(block, row, preserve_unit_loops=True)
                    chunk, lane = sch.get_loops(partial)[-2:]
                    sch.vectorize(lane)
                    if hint:
                        sch.annotate(chunk, "pragma_loop_partition_hint", 1)
                    sch.decompose_reduction(partial, chunk)
                elif not reduction:
                    self._vectorize_ragged_inner(sch, block, hint)
            return sch

        def _vectorize_ragged_inner(self, sch: Any, block: Any, hint: bool) -> None:
            """An elementwise nest of :meth:`_nest_by_nest`: its inner loop split by the
            vector width and vectorized, whole vectors or not (a softmax's exponentials
            over 197 keys): the split's predicate masks the last vector's lanes, and
            LoopPartition peels that vector off (with ``hint``), as for the partial sums."""
            loops = sch.get_loops(block)
            extents = static_extents(sch, loops[-1:])
            if len(loops) < 2 or (extents is not None and extents[0] < self.lanes):
                return
            if extents is not None and extents[0] % self.lanes == 0:
                self._vectorize_inner(sch, block)
                return
            vectors, lane = sch.split(loops[-1], [None, self.lanes])
            sch.vectorize(lane)
            if hint:
                sch.annotate(vectors, "pragma_loop_partition_hint", 1)

        def _vector_partials(self, sch: Any, block: Any, ragged: bool = False) -> Any:
            """``rfactor`` the row reduction of ``block`` into ``lanes`` partial results, or
            None; with ``ragged``, also over an extent no vector divides or a symbolic one
            (the split's predicate masks the last vector's lanes past the row)."""
            loop = sch.get_loops(block)[-1]
            extents = static_extents(sch, [loop])
            if extents is None:
                if not ragged:
                    return None
            elif extents[0] <= self.lanes or (extents[0] % self.lanes and not ragged):
                return None
            _, lane = sch.split(loop, [None, self.lanes])
            return sch.rfactor(lane, factor_axis=len(sch.get(block).writes[0].region))

        def _vectorize_inner(self, sch: Any, block: Any) -> None:
            loops = sch.get_loops(block)
            if len(loops) < 2 or sch.get(loops[-1]).kind == tirx.ForKind.VECTORIZED:
                return
            extent = (static_extents(sch, [loops[-1]]) or [0])[0]
            if extent and extent % self.lanes == 0:
                _, lane = sch.split(loops[-1], [None, self.lanes])
                sch.vectorize(lane)

    def _spatial_size(sch: Any, block: Any) -> int:
        """The product of ``block``'s spatial extents (0 where one is symbolic)."""
        size = 1
        for iv in sch.get(block).iter_vars:
            if iv.iter_type != tirx.IterVar.CommReduce:
                extent = iv.dom.extent
                size *= int(extent) if isinstance(extent, tirx.IntImm) else 0
        return size

    def _is_reduction(sch: Any, block: Any) -> bool:
        return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)

    def _vectorize_marked(func: tirx.PrimFunc) -> tirx.PrimFunc:
        """``func`` with each loop annotated :data:`_LANES` made a vectorized loop."""

        import tvm_ffi

        def vectorized(loop: Any) -> Any:
            if _LANES not in loop.annotations:
                return loop
            annotations = {k: v for k, v in loop.annotations.items() if k != _LANES}
            return tirx.For(
                loop.loop_var, loop.min, loop.extent, tirx.ForKind.VECTORIZED, loop.body,
                loop.thread_binding, annotations,
            )

        return func.with_body(tvm_ffi.structural_map(func.body, [(tirx.For, vectorized)], order="post"))

    class VectorizedColumnReduction(CpuRule):
        """Reductions over outer axes that keep the innermost one, with elementwise
        neighbours: a channels-last instance norm's statistics over the pixels, ``[n, h,
        w, c] -> [n, 1, 1, c]`` (RAFT's feature encoders: 16 of its 81 ms under dlight's
        scalar reduction, one channel at a time, strided).

        Each reduction's kept innermost axis is split by the widest vector that divides
        it and moved inside the reduction loops: a vector of channels accumulates over
        the pixels, reading whole lines, each channel summed in the order the scalar loop
        sums it (exact); the kept axes outside it are the parallel loop. Producers with
        one consumer that do not read a reduction's result (the ``x - mean`` before the
        squares) are inlined into their consumer; every other block (the statistics:
        ``mean``, ``sqrt(var + eps)``) is vectorized along its innermost axis.
        """

        what = "column reduction"

        def _schedule(self, func: tirx.PrimFunc) -> Any:
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None or all(info.is_injective() for info in infos):
                return None
            results = {
                sch.get(info.block_rv).writes[0].source for info in infos if not info.is_injective()
            }
            for info in infos[:-1]:
                stmt = sch.get(info.block_rv)
                reads_result = any(read.source in results for read in stmt.reads)
                if info.is_injective() and not reads_result and len(sch.get_consumers(info.block_rv)) == 1:
                    sch.compute_inline(info.block_rv)
            blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
            reductions = [block for block in blocks if _is_reduction(sch, block)]
            if not all(self._column(sch, block) for block in reductions):
                return None
            for block in blocks:
                if block in reductions:
                    self._reduce_columns(sch, block)
                else:
                    self._vectorize_rows(sch, block)
            return s_tir.Schedule(_vectorize_marked(sch.mod["main"]))

        def _width(self, extent: Any) -> int | None:
            """The widest vector (``lanes``, half, ..., at least 4) that divides a static
            ``extent``."""
            if not isinstance(extent, tirx.IntImm):
                return None
            width = self.lanes
            while int(extent) % width:
                width //= 2
            return width if width >= 4 else None

        def _column(self, sch: Any, block: Any) -> bool:
            """Whether ``block`` is ``out[s..., c] = reduce(in[..., c])`` over reduction
            iterators after its kept ones, ``c`` (the last kept one) the innermost index
            of every buffer it reads, of a width a vector divides."""
            stmt = sch.get(block)
            kinds = "".join("R" if iv.iter_type == tirx.IterVar.CommReduce else "S" for iv in stmt.iter_vars)
            kept = len(kinds) - len(kinds.lstrip("S"))
            if kept == 0 or kinds != "S" * kept + "R" * (len(kinds) - kept):
                return False
            loops = sch.get_loops(block)
            if len(loops) != len(kinds) or self._width(sch.get(loops[kept - 1]).extent) is None:
                return False
            inner = stmt.iter_vars[kept - 1].var
            for read in stmt.reads:
                last = read.region[-1]
                if not (last.min.same_as(inner) and isinstance(last.extent, tirx.IntImm) and int(last.extent) == 1):
                    return False
            return True

        def _reduce_columns(self, sch: Any, block: Any) -> None:
            stmt = sch.get(block)
            kept = sum(iv.iter_type != tirx.IterVar.CommReduce for iv in stmt.iter_vars)
            loops = sch.get_loops(block)
            width = self._width(sch.get(loops[kept - 1]).extent)
            outer, inner = sch.split(loops[kept - 1], [None, width])
            sch.reorder(*loops[: kept - 1], outer, *loops[kept:], inner)
            sch.parallel(sch.fuse(*loops[: kept - 1], outer))  # before the init is split off
            init = sch.decompose_reduction(block, loops[kept])
            sch.vectorize(sch.get_loops(init)[-1])
            # TVM's vectorize refuses a loop inside a reduction's loops (the update block is
            # then not "local" to it), though the lanes are independent sums: the loop is
            # marked, and made vectorized once the schedule is done (_vectorize_marked).
            sch.annotate(inner, _LANES, 1)

        def _vectorize_rows(self, sch: Any, block: Any) -> None:
            loops = sch.get_loops(block)
            width = self._width(sch.get(loops[-1]).extent)
            if width is None:
                if len(loops) > 1:
                    sch.parallel(sch.fuse(*loops[:-1]))
                return
            outer, inner = sch.split(loops[-1], [None, width])
            sch.vectorize(inner)
            sch.parallel(sch.fuse(*loops[:-1], outer))

    class VectorizedElementwise(CpuRule):
        """Injective blocks, inlined into the last (but a computed one read at several
        taps: :func:`gathered_at_taps`): its static inner loops fused and vectorized by
        the widest vector (16, 8 or 4 lanes on AVX-512) that divides them, the outer ones
        (symbolic sizes: a batch) parallel."""

        what = "elementwise"

        def _schedule(self, func: tirx.PrimFunc) -> Any:
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None or not all(info.is_injective() for info in infos):
                return None
            # A block some consumer gathers from at several taps (a bilinear resize reads 4
            # source pixels, a bicubic one 16) stays a loop of its own: inlined, it was
            # recomputed at every tap, with the producers inlined into it. GLPN's decoder
            # upsamples a fused ``x * a + y * b`` twice (56 -> 112 -> 224): the product ran
            # 16 times per output element and the first resize 4 times, 17 ms against
            # 1.2 ms once each is written once.
            # A copy (a transpose, a reshape: SegFormer's four maps before their resizes)
            # is inlined still: its taps cost index arithmetic only. Blocks are taken in
            # order, each after its producers were inlined into it.
            gathered = []
            for info in infos[:-1]:
                if gathered_at_taps(sch, info.block_rv) and not copies(sch.get(info.block_rv)):
                    gathered.append(info.block_rv)
                else:
                    sch.compute_inline(info.block_rv)
            for block in gathered:
                self._schedule_block(sch, block)  # None: it stays as it is, serial
            return self._schedule_block(sch, infos[-1].block_rv)

        def _schedule_block(self, sch: Any, block: Any) -> Any:
            """``sch`` with the injective ``block``'s loops vectorized and parallel (the
            class docstring); None where no schedule applies."""
            loops = sch.get_loops(block)
            if not loops:
                return None
            static = len(loops)
            while static > 0 and static_extents(sch, [loops[static - 1]]) is not None:
                static -= 1
            outer, inner = loops[:static], loops[static:]
            if not inner and len(outer) > 1:
                # Every extent symbolic ([batch, heads, sequence, sequence]: attention
                # scores masked, T5's position buckets): the rows in parallel, each row in
                # whole vectors and a masked last one (split into a vector case and a
                # scalar tail before lowering: vector_tails). Left to LLVM, a row of
                # run-time length stayed scalar: DeBERTa's masked scores at batch 8 ran
                # 3x their fixed-size time.
                sch.parallel(sch.fuse(*outer[:-1]) if len(outer) > 2 else outer[0])
                _, lanes = sch.split(outer[-1], [None, self.lanes])
                sch.vectorize(lanes)
                return sch
            if not inner:
                return None
            extents = static_extents(sch, inner) or []
            spans = concat_spans(sch.get(block), len(loops), extents[-1])
            if spans is not None:
                # A concatenation along the row (channels last: DenseNet's growing feature
                # maps, Inception's branches): each input's span of the row a loop of its
                # own, which LLVM vectorizes; vectorized across spans, every vector loaded
                # from all the inputs and selected (a 13-way concat: 0.79 ms, 0.045 apart).
                sch.loop_partition(inner[-1], [*spans[:-1], None])
                rest = [*outer, *inner[:-1]]
                if rest:
                    sch.parallel(sch.fuse(*rest) if len(rest) > 1 else rest[0])
                return sch
            divided = divisions(sch.get(block), len(loops))
            period = row_period(sch.get(block), divided, extents[-1]) if divided else None
            axes = len(inner)  # the block's static trailing axes (the split below adds a loop)
            split = False
            if period is not None and period < extents[-1] and period % (self.lanes // 4) == 0:
                split = True
                # Rows of heads (``[b, 49, 2 x 24] <- [b, 2, 49, 24]``): the row split at
                # the heads, so that no vector straddles two of them (16-lane vectors over
                # Swin's 48-float rows gathered every element: 25x the 8-lane copy).
                heads, head = sch.split(inner[-1], [None, period])
                inner = [*inner[:-1], heads, head]
                extents = [*extents[:-1], extents[-1] // period, period]
            whole = extents[-1] % self.lanes == 0 and extents[-1] >= ROW_VECTORS * self.lanes
            # A row of half vectors (24, 40 floats): fused, the vectors would straddle rows
            # and gather element by element (Swin's 24-wide head transpose: 4.8x).
            half = extents[-1] % self.lanes != 0 and extents[-1] % (self.lanes // 2) == 0
            if len(inner) > 1 and (whole or half) and math.prod(extents[:-1]) >= MIN_ROWS:
                # Rows of whole vectors: each row's index arithmetic (a resize's source
                # pixel and weights, a concat's input) is computed once per row, not once
                # per vector from a fused index (SegFormer's resize + concat: 3.3x).
                _, lanes = sch.split(inner[-1], [None, self.lanes if whole else self.lanes // 2])
                sch.vectorize(lanes)
                sch.parallel(sch.fuse(*outer, *inner[:-1]))
                return sch
            after = decoded_tail(sch.get(block), divided, axes) if divided else None
            if after is not None and 0 < after < axes:
                after += int(split)  # block axes to loops: the row is two loops if split
                # An axis whose index the loads decode (a channel shuffle's ``c % 2 * 116 +
                # c // 2``) before the last: rows up to it in parallel, decoded once a row,
                # and the axes after it one row, in the widest vectors that divide it
                # (ShuffleNetV2's shuffle at batch 8: 16-lane vectors across its channels of
                # 14 x 14 pixels decoded every lane, 1.89 ms; rows of 196 in 4 lanes, 0.05).
                row = sch.fuse(*inner[-after:]) if after > 1 else inner[-1]
                length = math.prod(extents[-after:])
                width = row_width(length, self.lanes, period)
                if width:
                    _, lanes = sch.split(row, [None, width])
                    sch.vectorize(lanes)
                rest = [*outer, *inner[:-after]]
                sch.parallel(sch.fuse(*rest) if len(rest) > 1 else rest[0])
                return sch
            row = sch.fuse(*inner) if len(inner) > 1 else inner[0]
            total = static_extents(sch, [row])[0]  # type: ignore[index]
            if total < self.lanes:
                if outer:
                    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
                return sch if outer else None
            # The widest vector that divides the row. None does (an odd row): the row stays
            # scalar. (Whole vectors and a masked last one peeled off by LoopPartition would
            # be faster, but TVM's LoopPartition fails on such loops, mixing int32 and int64
            # bounds.)
            width = row_width(total, self.lanes, period)
            if not width:
                if outer:
                    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
                return sch
            vectors, lanes = sch.split(row, [None, width])
            sch.vectorize(lanes)
            if len(outer) > 1 and static_extents(sch, outer[1:]) is None:
                # Two symbolic loops (batch, tokens): fused with the vectors, every vector
                # would decode its index by divisions by run-time extents (a transpose of
                # BERT's heads ran 1.6x its fixed-size time); the vectors stay serial.
                sch.parallel(sch.fuse(*outer))
            else:  # a static or a leading symbolic extent: divisions by constants
                sch.parallel(sch.fuse(*outer, vectors))
            return sch

    _RULES["base"] = CpuRule
    _RULES["matmul"] = RegisterTiledMatmul
    _RULES["elementwise"] = VectorizedElementwise
    _RULES["row_reduction"] = VectorizedRowReduction
    _RULES["column_reduction"] = VectorizedColumnReduction
    return _RULES
