"""CPU schedules: what TVM's default CPU pipeline leaves as scalar loops.

TVM's generic CPU pipeline schedules nothing, so a matmul runs as a scalar triple
loop. :func:`cpu_schedule` applies, through ``tvm.s_tir.dlight``'s
``ApplyDefaultSchedule`` (first rule that fits each PrimFunc wins; functions marked
``tirx.is_scheduled``, like our kernels, are skipped):

* :class:`RegisterTiledMatmul`: ``C[..., i, j] += A[..., i, k] * B[..., k, j]``
  with an elementwise epilogue. A ``TILE_I x TILE_J`` block of C is accumulated in
  registers (a local buffer: 4 x 64 floats are 16 AVX-512 registers), the ``k``
  loop is outside the tile, ``j`` is vectorized, ``i`` unrolled; the epilogue runs
  on the tile before it is stored; the outer tile loop is parallel.
* dlight's CPU ``Reduction`` (layer norm and similar row reductions).
* :class:`VectorizedElementwise`: injective functions with static shapes: the
  fused loop is split by the vector width, vectorized, and the outer part parallel.

>>> mod = cpu_schedule(target)(mod)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger(__name__)

# The register tile: TILE_I rows of A times TILE_J columns of B.
TILE_I = 4
TILE_J = 64
# Loops above this many iterations are left rolled when unrolling the tile.
UNROLL_MAX_STEP = 64


def cpu_schedule(target: tvm.target.Target) -> tvm.transform.Pass:
    """The module pass that schedules every unscheduled PrimFunc for CPU ``target``."""
    from tvm.s_tir import dlight as dl

    lanes = _vector_lanes(target)
    return dl.ApplyDefaultSchedule(
        _rules()["matmul"](lanes),
        dl.cpu.Reduction(),
        _rules()["elementwise"](lanes),
    )


def _vector_lanes(target: tvm.target.Target) -> int:
    """float32 lanes of one vector register of ``target``."""
    from tvm.target.codegen import llvm_get_vector_width

    try:
        bits = int(llvm_get_vector_width(target))
    except Exception:  # not an LLVM target, or LLVM cannot tell
        bits = 128
    # Sapphire Rapids tunes for 256-bit vectors but has 512-bit registers.
    mattr = [str(a) for a in target.attrs.get("mattr", [])]
    if "+avx512f" in mattr:
        bits = 512
    return max(bits // 32, 4)


def _largest_divisor(extent: int, limit: int, multiple_of: int = 1) -> int | None:
    """The largest divisor of ``extent`` that is ``<= limit`` and a multiple of ``multiple_of``."""
    for candidate in range(min(extent, limit), 0, -1):
        if extent % candidate == 0 and candidate % multiple_of == 0:
            return candidate
    return None


_RULES: dict[str, Any] = {}


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

    class RegisterTiledMatmul(ScheduleRule):
        """``C[..., i, j] += A[..., i, k] * B[..., k, j]`` (+ elementwise epilogue), register-tiled."""

        def __init__(self, lanes: int) -> None:
            self.lanes = lanes

        def apply(self, func: tirx.PrimFunc, target: Any, _tunable: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
                return None
            try:
                return self._schedule(func)
            except Exception as exc:  # a primitive refused: leave the function to other rules
                logger.debug("matmul schedule not applied: %s", exc)
                return None

        def _schedule(self, func: tirx.PrimFunc) -> Any:
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            reductions = [info for info in infos if not info.is_injective()]
            if len(reductions) != 1 or reductions[0].dom_kind()[-2:] != "SR":
                return None
            if not reductions[0].dom_kind().endswith("SSR") or not _is_matmul(
                sch, reductions[0].block_rv
            ):
                return None
            position = infos.index(reductions[0])
            # Producers (e.g. a transpose of B) are computed inline into the matmul.
            for info in infos[:position]:
                sch.compute_inline(info.block_rv)
            epilogue = infos[position + 1 :]
            for info in epilogue[:-1]:
                sch.compute_inline(info.block_rv)
            block = reductions[0].block_rv
            loops = sch.get_loops(block)
            extents = static_extents(sch, loops)
            if extents is None:
                return None
            *batch, i, j, k = loops
            tile_i = _largest_divisor(extents[-3], TILE_I) or 1
            tile_j = _largest_divisor(extents[-2], TILE_J, self.lanes)
            if tile_j is None:
                return None
            io, ii = sch.split(i, [None, tile_i])
            jo, ji = sch.split(j, [None, tile_j])
            sch.reorder(*batch, io, jo, k, ii, ji)
            if epilogue:
                tail = epilogue[-1].block_rv
                sch.reverse_compute_at(tail, jo)
                sch.set_scope(block, 0, "local")
            else:
                tail = sch.cache_write(block, 0, "local")
                sch.reverse_compute_at(tail, jo)
            # Annotate before decompose_reduction: the update block alone is no longer
            # a reduction block, and vectorize/parallel refuse loops over it.
            sch.vectorize(ji)
            sch.unroll(ii)
            inner = sch.get_loops(tail)[-1]
            if (static_extents(sch, [inner]) or [1])[0] % self.lanes == 0:
                sch.vectorize(inner)
            sch.parallel(sch.fuse(*batch, io) if batch else io)
            sch.decompose_reduction(block, k)
            return sch

    def _is_matmul(sch: Any, block: Any) -> bool:
        """Two operands read; the last spatial iter indexes B's last axis (contiguous j)."""
        stmt = sch.get(block)
        if len(stmt.reads) != 2 or len(stmt.writes) != 1:
            return False
        j_var = stmt.iter_vars[-2].var
        k_var = stmt.iter_vars[-1].var
        b_last = stmt.reads[1].region[-1].min
        a_last = stmt.reads[0].region[-1].min
        return b_last.same_as(j_var) and a_last.same_as(k_var)

    class VectorizedElementwise(ScheduleRule):
        """A single injective block with static shapes: vectorize the fused loop."""

        def __init__(self, lanes: int) -> None:
            self.lanes = lanes

        def apply(self, func: tirx.PrimFunc, target: Any, _tunable: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
                return None
            try:
                sch = s_tir.Schedule(func)
                infos = normalize_prim_func(sch)
                if infos is None or not all(info.is_injective() for info in infos):
                    return None
                for info in infos[:-1]:
                    sch.compute_inline(info.block_rv)
                block = infos[-1].block_rv
                loops = sch.get_loops(block)
                extents = static_extents(sch, loops)
                if not loops or extents is None:
                    return None
                fused = sch.fuse(*loops)
                total = 1
                for extent in extents:
                    total *= extent
                if total % self.lanes:
                    return None
                outer, inner = sch.split(fused, [None, self.lanes])
                sch.vectorize(inner)
                sch.parallel(outer)
                return sch
            except Exception as exc:
                logger.debug("elementwise schedule not applied: %s", exc)
                return None

    _RULES["matmul"] = RegisterTiledMatmul
    _RULES["elementwise"] = VectorizedElementwise
    return _RULES
