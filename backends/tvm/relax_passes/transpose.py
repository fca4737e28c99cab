"""Transposes on the CPU: copied in square tiles, so both sides stay in cache.

A transpose whose input and output have different innermost axes (``NHWC -> NCHW`` at
the end of a channels-last convolution stack, ``[b, s, h, d] -> [b, h, s, d]`` is not
one: its innermost axis stays) reads one element per cache line when it walks the output
in order: every output row touches as many input lines as it has elements, and the
lines are evicted before their neighbours are used (ResNet's last transpose ran at
~10 ns per element). :func:`rule` (``BlockedTranspose``) walks ``tile x tile`` blocks
instead: ``tile`` input lines feed ``tile`` vector stores along the output's innermost
axis, all within L1.

>>> mod = dl.ApplyDefaultSchedule(rule()(16))(mod)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

_RULE: list[Any] = []


def rule() -> Any:
    """The rule class (defined on first use: tvm is imported lazily)."""
    if _RULE:
        return _RULE[0]
    import tvm
    from tvm import s_tir, sym, tirx

    from rewriter.backends.tvm.relax_passes import schedules
    from rewriter.backends.tvm.vector_tails import uses

    class BlockedTranspose(schedules.cpu_rule_base()):  # type: ignore[misc]
        """One copy block ``Y[i...] = X[perm(i...)]`` whose innermost axes differ, both at
        least one tile (``lanes``) long: tiled, the output's innermost axis vectorized
        where tiles are whole; one of them shorter: :func:`short_axis`. Or one block that
        computes its output from inputs it reads transposed (:func:`computed`)."""

        what = "transpose"

        def _schedule(self, func: Any) -> Any:
            sch = self._copy(func)
            return sch if sch is not None else computed(func, self.lanes)

        def _copy(self, func: Any) -> Any:
            sch = s_tir.Schedule(func)
            blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
            # A transpose and the reshapes TVM fused after it (wav2vec2's feature
            # projection: a transpose then an identity reshape), else before it (ViT's
            # keys split into heads): one copy block.
            if not inline_all(sch, list(reversed(blocks[1:])), sch.reverse_compute_inline):
                sch = s_tir.Schedule(func)
                blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
                if not inline_all(sch, blocks[:-1], sch.compute_inline):
                    return None
            blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
            if len(blocks) != 1:
                return None
            block = blocks[0]
            stmt = sch.get(block)
            if len(stmt.reads) != 1 or len(stmt.writes) != 1:
                return None
            if any(iv.iter_type != tirx.IterVar.DataPar for iv in stmt.iter_vars):
                return None
            if not schedules.copies(stmt):
                return None  # a copy, nothing computed
            ivars = [iv.var for iv in stmt.iter_vars]
            write_index = list(stmt.body.indices)
            # An input axis that is two output axes merged (a reshape fused before the
            # transpose: ViT's keys [b, s, h * d] -> [b, h, d, s]) stands for its inner one.
            analyzer = sym.Analyzer()
            for iv in stmt.iter_vars:  # the inlined reshape's index, simplified in bounds
                analyzer.bind(iv.var, iv.dom)
            read_index = [
                without_offset(merged_inner(analyzer.simplify(index), stmt.iter_vars))
                for index in stmt.body.value.indices
            ]
            # Iterators, unit axes (constant 0), or, before the input's innermost axis, an
            # iterator split by a constant (an output axis that is two of the input's: heads
            # merged into a symbolic batch, RoBERTa's keys [b, s, h * d] -> [b * h, d, s]).
            for index in write_index + read_index[:-1]:
                if not (isinstance(index, tirx.IntImm) or _iterator(split_of(index), ivars)):
                    return None
            if not _iterator(read_index[-1], ivars) or not _iterator(write_index[-1], ivars):
                return None
            loops = sch.get_loops(block)
            if len(loops) != len(ivars):
                return None
            out_inner = next(i for i, v in enumerate(ivars) if v.same_as(write_index[-1]))
            in_inner = next(i for i, v in enumerate(ivars) if v.same_as(read_index[-1]))
            if out_inner == in_inner:
                return None
            size = self.lanes
            extents = [iv.dom.extent for iv in stmt.iter_vars]
            static = [isinstance(extents[axis], tirx.IntImm) for axis in (out_inner, in_inner)]
            short = [
                axis
                for axis, known in zip((out_inner, in_inner), static, strict=True)
                if known and int(extents[axis]) < size
            ]
            if len(short) == 2:
                return None
            if short:
                return short_axis(
                    sch, loops, short[0], in_inner if short[0] == out_inner else out_inner, size
                )
            return tiled(sch, loops, out_inner, in_inner, extents, size)

    def tiled(sch: Any, loops: list[Any], out_inner: int, in_inner: int, extents: list[Any], size: int) -> Any:
        """``sch`` with the loops of the output's innermost axis (``out_inner``) and of the
        input's (``in_inner``) cut into ``size x size`` tiles, the output's axis inside.

        The output's axis is vectorized where whole tiles cover it, and where both axes
        are symbolic (DeBERTa's p2c scores, [batch x heads, sequence, sequence] swapped):
        its lanes past the end are masked, and the masked last vector is split off before
        lowering (vector_tails). As elementwise vectors, those gathered their elements one
        column apart (1.5x a scalar loop, which is 3x a tiled transpose at fixed sizes)."""
        static = [isinstance(extents[axis], tirx.IntImm) for axis in (out_inner, in_inner)]
        a_outer, a_inner = sch.split(loops[out_inner], [None, size])
        b_outer, b_inner = sch.split(loops[in_inner], [None, size])
        rest = [loop for i, loop in enumerate(loops) if i not in (out_inner, in_inner)]
        sch.reorder(*rest, b_outer, a_outer, b_inner, a_inner)
        whole = (
            all(static)
            and int(extents[out_inner]) % size == 0
            and int(extents[in_inner]) % size == 0
        )
        # Whole tiles along the output's axis at a symbolic input axis (EnCodec's 64
        # channels out of [batch, 64, frames]): the bounds check of the last tile is the
        # same for every lane of the vector.
        lanes_whole = static[0] and not static[1] and int(extents[out_inner]) % size == 0
        if whole or lanes_whole or not any(static):
            sch.vectorize(a_inner)
        if all(static):
            sch.parallel(sch.fuse(*rest, b_outer, a_outer))
            return sch
        # One axis symbolic (wav2vec2's NWC -> NCW around its group norm, over the
        # frames): its tiles a serial loop inside the parallel one, whose index then
        # divides by constants only (a per-element division by a run-time extent
        # otherwise). Walked column by column it ran at 12 ns per element. Both
        # symbolic: the input's tiles are the parallel loop.
        if static[0] and not static[1]:  # the symbolic tiles outside the static ones
            sch.reorder(a_outer, b_outer)
            sch.parallel(sch.fuse(*rest, a_outer) if rest else a_outer)
        else:
            sch.parallel(sch.fuse(*rest, b_outer) if rest else b_outer)
        return sch

    def computed(func: Any, size: int) -> Any:
        """A single block that computes its output from inputs it reads transposed, tiled
        as a copy is (:func:`tiled`): every load that varies along the output's innermost
        axis has that axis outside its own innermost index, and those all step along one
        other iterator (:func:`transposed_axis`), both axes static and at least a tile
        long (tiles across ViT's 197 tokens: 0.35 ms for 64 x 197 x 64 floats scaled, 1.26
        as elementwise vectors; 16-lane vectors where tiles are whole). Llama's keys,
        rotated (RoPE) and written transposed for ``Q @ K^T`` in one fused function: as
        elementwise vectors along the tokens, each lane read another 512-byte row of the
        keys and of the sine and cosine tables."""
        sch = s_tir.Schedule(func)
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
        if not blocks or not inline_all(sch, blocks[:-1], sch.compute_inline):
            return None
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
        if len(blocks) != 1:
            return None
        stmt = sch.get(blocks[0])
        if any(iv.iter_type != tirx.IterVar.DataPar for iv in stmt.iter_vars):
            return None
        if not isinstance(stmt.body, tirx.BufferStore):
            return None
        ivars = [iv.var for iv in stmt.iter_vars]
        out = stmt.body.indices[-1]
        loops = sch.get_loops(blocks[0])
        if len(loops) != len(ivars) or not any(out.same_as(v) for v in ivars):
            return None
        inner = transposed_axis(stmt, out)
        if inner is None:
            return None
        out_inner = next(i for i, v in enumerate(ivars) if v.same_as(out))
        in_inner = next(i for i, v in enumerate(ivars) if v.same_as(inner))
        extents = [iv.dom.extent for iv in stmt.iter_vars]
        for axis in (out_inner, in_inner):
            if not isinstance(extents[axis], tirx.IntImm) or int(extents[axis]) < size:
                return None
        return tiled(sch, loops, out_inner, in_inner, extents, size)

    def transposed_axis(stmt: Any, out: Any) -> Any:
        """The iterator along which every load of the block ``stmt`` that varies with the
        output's innermost iterator ``out`` reads contiguous elements: its last index is
        ``iterator + terms without it`` (indices simplified over the iterators' domains
        and the conditions the load is under: a rotation's ``x[..., d - 32]`` where
        ``d >= 32``). None where a load reads along ``out``, another index form (an image
        row split from a flattened axis, ``p // 28, p % 28``: tiled, 1.5x slower than as
        vectors), or the loads differ."""
        analyzer = sym.Analyzer()
        for iv in stmt.iter_vars:
            analyzer.bind(iv.var, iv.dom)
        iterators = [iv.var for iv in stmt.iter_vars]
        inner = None
        for load, conditions in guarded_loads(stmt.body.value, []):
            with analyzer.constraint_scope(analyzer.simplify(tirx.all(*conditions, tirx.const(True)))):
                indices = [analyzer.simplify(index) for index in load.indices]
            if not any(uses(index, out) for index in indices):
                continue  # the same for every output element along ``out`` (a broadcast)
            if uses(indices[-1], out):
                return None
            along = [var for var in iterators if uses(indices[-1], var) and unit_step(indices[-1], var)]
            if len(along) != 1 or (inner is not None and not along[0].same_as(inner)):
                return None
            inner = along[0]
        return inner

    def guarded_loads(expr: Any, conditions: list[Any]) -> list[tuple[Any, list[Any]]]:
        """The loads in ``expr``, each with the conditions of the ``if_then_else`` (or
        ``Select``) branches it is under."""
        if isinstance(expr, tvm.ir.TensorLoad):
            return [(expr, conditions)]
        branches = None
        if isinstance(expr, tvm.ir.Call) and expr.op.name == "prim.if_then_else":
            branches = expr.args
        elif isinstance(expr, tirx.Select):
            branches = (expr.condition, expr.true_value, expr.false_value)
        if branches is not None:
            condition, then, otherwise = branches
            return (
                guarded_loads(condition, conditions)
                + guarded_loads(then, [*conditions, condition])
                + guarded_loads(otherwise, [*conditions, tirx.Not(condition)])
            )
        children: list[Any] = list(expr.args) if isinstance(expr, tvm.ir.Call) else []
        children += [getattr(expr, field) for field in ("a", "b", "value", "body") if hasattr(expr, field)]
        return [found for child in children for found in guarded_loads(child, conditions)]

    def unit_step(index: Any, var: Any) -> bool:
        """Whether ``index`` is ``var`` plus terms without it."""
        coefficients = sym.detect_linear_equation(index, [var])
        return (
            len(coefficients) == 2
            and isinstance(coefficients[0], tirx.IntImm)
            and int(coefficients[0]) == 1
            and not uses(coefficients[1], var)
        )

    def inline_all(sch: Any, blocks: list[Any], inline: Any) -> bool:
        """Whether ``inline`` took every one of ``blocks``."""
        for block in blocks:
            try:
                inline(block)
            except Exception:  # not a copy whose index TVM can inline or invert
                return False
        return True

    def without_offset(index: Any) -> Any:
        """``i`` for an index ``i + c`` or ``i - c`` of an iterator ``i`` and a constant ``c``
        (a slice fused before the transpose: ShuffleNetV2's second half of the channels,
        moved last); ``index`` itself otherwise."""
        offset = isinstance(index, (tirx.Add, tirx.Sub)) and isinstance(index.b, tirx.IntImm)
        return index.a if offset and isinstance(index.a, tirx.Var) else index

    def _iterator(index: Any, ivars: list[Any]) -> bool:
        return any(index.same_as(v) for v in ivars)

    def split_of(index: Any) -> Any:
        """``i`` for an index ``i // c`` or ``i % c`` of an iterator ``i`` and a constant
        ``c`` (one part of an output axis that is two input axes); ``index`` otherwise."""
        split = isinstance(index, (tirx.FloorDiv, tirx.FloorMod)) and isinstance(index.b, tirx.IntImm)
        return index.a if split and isinstance(index.a, tirx.Var) else index

    def merged_inner(index: Any, iter_vars: list[Any]) -> Any:
        """``b`` for an index ``a * n + b`` of two iterators (``a`` or a part of one,
        :func:`split_of`), ``b``'s extent ``n`` (two axes of the output that are one of the
        input); ``index`` itself otherwise."""
        if not isinstance(index, tirx.Add):
            return index
        outer, inner = index.a, index.b
        if not isinstance(outer, tirx.Mul) or not isinstance(inner, tirx.Var):
            return index
        factor, var = (outer.b, outer.a) if isinstance(outer.b, tirx.IntImm) else (outer.a, outer.b)
        var = split_of(var)
        if not isinstance(factor, tirx.IntImm) or not isinstance(var, tirx.Var):
            return index
        extents = [iv.dom.extent for iv in iter_vars if iv.var.same_as(inner)]
        if not any(iv.var.same_as(var) for iv in iter_vars) or len(extents) != 1:
            return index
        if not isinstance(extents[0], tirx.IntImm) or int(extents[0]) != int(factor):
            return index
        return inner

    def short_axis(sch: Any, loops: list[Any], short: int, long: int, size: int) -> Any:
        """A transpose whose one innermost axis is shorter than a vector (an image's 3
        channels, NCHW -> NHWC, before the first convolution): the long axis in whole
        vectors (contiguous on its side), the short one unrolled inside, one strided access
        per element on its side (tiles of ``size x size`` do not fit; each element as
        TVM's elementwise vectors gathered it took 15x longer)."""
        extent = sch.get(loops[long]).extent  # symbolic: a batch of frames, say
        outer, inner = sch.split(loops[long], [None, size])
        rest = [loop for i, loop in enumerate(loops) if i not in (short, long)]
        sch.reorder(*rest, outer, loops[short], inner)
        sch.unroll(loops[short])
        if isinstance(extent, tirx.IntImm) and int(extent) % size == 0:
            sch.vectorize(inner)
        sch.parallel(sch.fuse(*rest) if rest else outer)
        return sch

    _RULE.append(BlockedTranspose)
    return BlockedTranspose
