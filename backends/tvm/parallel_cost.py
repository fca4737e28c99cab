"""The TIR pipeline of our CPU builds: TVM's, with each parallel loop run serially where
its work is too small to pay for waking the thread pool.

A parallel loop is a launch on TVM's thread pool: the calling thread takes the first
share and waits for the others, which sleep between launches
(``TVM_THREAD_POOL_SPIN_COUNT=0``, or a pool sharing its cores) and take tens of
microseconds to wake. On two threads a layer norm over 128 x 256 ran in 34 us against
9 us on one. Like Eigen's cost model (which ONNX Runtime's CPU kernels use: a task
under ~100k cycles stays on the caller), each parallel loop's work is estimated from
what it executes, and a loop under :data:`PARALLEL_MIN_NS` runs on the calling thread.

The estimate is counted on the lowered loop nest (after vectorization, so a vector
store counts once): :data:`STORE_NS` per store into memory, :data:`TILE_STORE_NS` per
store into a buffer allocated inside the loop (a register tile or a cache: no memory
traffic), plus :data:`BYTE_NS` per byte of the function's arguments (what a
memory-bound kernel such as a batch-1 matrix-vector product costs). Where the extents
are symbolic the test is made at run time: the loop becomes
``if work < PARALLEL_MIN_NS: serial loop else: parallel loop`` over the same body
(:func:`tvm.tirx.transform.ConvertSSA` then renames the copy's definitions).

Before lowering, the pipeline also splits vector loops with masked lanes into a
full-vector case and a tail (:mod:`rewriter.backends.tvm.vector_tails`); after it,
float32 ``log`` becomes a polynomial in the loop's vector width
(:mod:`rewriter.backends.tvm.vector_log`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tvm

#: Work under which a parallel loop runs on the calling thread (ns, estimated).
PARALLEL_MIN_NS = 100_000.0
#: Cost of one executed store into memory (a vector store counts once).
STORE_NS = 0.3
#: Cost of one store into a buffer allocated inside the loop (a register tile).
TILE_STORE_NS = 0.05
#: Cost of one byte of the function's arguments.
BYTE_NS = 0.06

#: A parallel loop annotated so stays parallel, whatever its work: a recurrence's step,
#: launched once per step within one call, while our pool's workers spin
#: (:mod:`rewriter.backends.tvm.thread_pool`: about 1.2 us a launch). The GRU of
#: ``benchmarks/zoo.py`` at batch 1 (eight tasks of about a microsecond a step) ran its
#: recurrence on the calling thread, 2.0 ms on one thread and on two: 0.95-1.01x ONNX
#: Runtime's time on two threads; with its steps parallel 0.70-0.75x (fixed and symbolic
#: libraries, 0.69-0.78x their time), one thread and batch 8 unchanged, the LSTM too
#: (0.99-1.01x; AMD Zen 4, side by side).
EVERY_STEP = "rewriter.parallel_every_step"

PIPELINE = "rewriter_cpu"
_ARG_BYTES = "rewriter.argument_bytes"


def pipeline_name() -> str:
    """Register our TIR pipeline with TVM (once) and return its name for ``relax.build``."""
    from tvm.s_tir import pipeline as s_tir_pipeline
    from tvm.tirx import compilation_pipeline

    if PIPELINE not in compilation_pipeline.PIPELINE_MAP:

        def factory() -> tuple[Any, Any, Any]:
            import tvm
            from tvm import tirx

            from rewriter.backends.tvm import stack_tiles, vector_log, vector_tails

            main, host, device = s_tir_pipeline.default_s_tir_pipeline()
            lower = tvm.transform.Sequential([_argument_bytes_pass(), vector_tails.unswitch_pass(), main])

            def finalize_host() -> tvm.transform.Pass:
                passes = [
                    _serial_small_loops_pass(),
                    tirx.transform.ConvertSSA(),
                    stack_tiles.stack_tiles_pass(),  # small tiles on the stack, not the heap
                    host(),
                    vector_log.log_pass(),  # after LowerIntrin: its analyzer would expand it
                ]
                return tvm.transform.Sequential(passes)

            return lower, finalize_host, device

        compilation_pipeline.PIPELINE_MAP[PIPELINE] = factory
    return PIPELINE


def argument_bytes(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimExpr:
    """The bytes of ``func``'s buffer arguments, as a float64 expression of its sizes."""
    from tvm import tirx

    from rewriter.backends.tvm.stack_tiles import dtype_bytes

    total = tirx.const(0.0, "float64")
    for param in func.params:
        kind = getattr(param, "ty", None)
        if not isinstance(kind, tirx.BufferType):
            continue
        size = tirx.const(float(dtype_bytes(kind.dtype)), "float64")
        for extent in kind.shape:
            size = size * tirx.Cast("float64", extent)
        total = total + size
    return total


def work_ns(stmt: tvm.tirx.Stmt, tiles: frozenset[Any] = frozenset()) -> tvm.tirx.PrimExpr:
    """Estimated time of ``stmt``'s stores (ns, float64), those into ``tiles`` (buffer data
    vars allocated inside) at :data:`TILE_STORE_NS`."""
    from tvm import tirx

    if isinstance(stmt, tirx.SeqStmt):
        total = tirx.const(0.0, "float64")
        inner = set(tiles)
        for child in stmt.seq:
            if isinstance(child, tirx.AllocBuffer):
                inner.add(child.buffer.data)
            total = total + work_ns(child, frozenset(inner))
        return total
    if isinstance(stmt, tirx.For):
        return tirx.Cast("float64", stmt.extent) * work_ns(stmt.body, tiles)
    if isinstance(stmt, tirx.IfThenElse):
        then = work_ns(stmt.then_case, tiles)
        return then if stmt.else_case is None else then + work_ns(stmt.else_case, tiles)
    if isinstance(stmt, tirx.BufferStore):
        return tirx.const(TILE_STORE_NS if stmt.buffer.data in tiles else STORE_NS, "float64")
    if isinstance(stmt, tirx.Evaluate):
        return tirx.const(STORE_NS, "float64")
    body = getattr(stmt, "body", None)
    return work_ns(body, tiles) if isinstance(body, tirx.Stmt) else tirx.const(0.0, "float64")


def _argument_bytes_pass() -> tvm.transform.Pass:
    from tvm import tirx

    def annotate(func: tirx.PrimFunc, _mod: Any, _ctx: Any) -> tirx.PrimFunc:
        return func.with_attr(_ARG_BYTES, argument_bytes(func))

    return tirx.transform.prim_func_pass(annotate, opt_level=0, name="RewriterArgumentBytes")


def _serial_small_loops_pass() -> tvm.transform.Pass:
    from tvm import sym, tirx

    def rewrite(func: tirx.PrimFunc, _mod: Any, _ctx: Any) -> tirx.PrimFunc:
        attrs = func.attrs or {}
        extra = attrs.get(_ARG_BYTES) if _ARG_BYTES in attrs else None
        loops = _Loops(sym.Analyzer(), extra)
        body = loops.visit(func.body, list(func.params))
        return func if body.same_as(func.body) else func.with_body(body)

    return tirx.transform.prim_func_pass(rewrite, opt_level=0, name="RewriterSerialSmallLoops")


class _Loops:
    """Rebuilds the statements on the way to each parallel loop; nothing else changes."""

    def __init__(self, analyzer: Any, argument_bytes: Any) -> None:
        self.analyzer = analyzer
        self.argument_bytes = argument_bytes

    def visit(self, stmt: Any, defined: list[Any]) -> Any:
        from tvm import tirx

        if isinstance(stmt, tirx.SeqStmt):
            scope = list(defined)
            children = []
            for child in stmt.seq:
                children.append(self.visit(child, scope))
                if isinstance(child, tirx.Bind):
                    scope.append(child.var)
            if all(new.same_as(old) for new, old in zip(children, stmt.seq, strict=True)):
                return stmt
            return tirx.SeqStmt(children)
        if isinstance(stmt, tirx.For):
            if stmt.kind == tirx.ForKind.PARALLEL:
                return self.parallel(stmt, defined)
            body = self.visit(stmt.body, [*defined, stmt.loop_var])
            return stmt if body.same_as(stmt.body) else _rebuilt(stmt, body, stmt.kind)
        if isinstance(stmt, tirx.IfThenElse):
            then = self.visit(stmt.then_case, defined)
            other = None if stmt.else_case is None else self.visit(stmt.else_case, defined)
            if then.same_as(stmt.then_case) and (other is None or other.same_as(stmt.else_case)):
                return stmt
            return tirx.IfThenElse(stmt.condition, then, other)
        if isinstance(stmt, tirx.AttrStmt):
            body = self.visit(stmt.body, defined)
            return stmt if body.same_as(stmt.body) else tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body)
        return stmt

    def parallel(self, loop: Any, defined: list[Any]) -> Any:
        from tvm import tirx

        if EVERY_STEP in (loop.annotations or {}):
            return loop
        cost = work_ns(loop)
        if self.argument_bytes is not None:
            with_bytes = cost + self.argument_bytes * tirx.const(BYTE_NS, "float64")
            if not tirx.analysis.undefined_vars(with_bytes, defined):
                cost = with_bytes
        cost = self.analyzer.simplify(cost)
        if tirx.analysis.undefined_vars(cost, defined):
            return loop  # sized by values computed inside: left parallel
        serial = _rebuilt(loop, loop.body, tirx.ForKind.SERIAL)
        if isinstance(cost, tirx.FloatImm):
            return serial if cost.value < PARALLEL_MIN_NS else loop
        return tirx.IfThenElse(cost < tirx.const(PARALLEL_MIN_NS, "float64"), serial, loop)


def _rebuilt(loop: Any, body: Any, kind: Any) -> Any:
    """``loop`` over ``body`` as a ``kind`` loop."""
    from tvm import tirx

    return tirx.For(loop.loop_var, loop.min, loop.extent, kind, body, loop.thread_binding, loop.annotations)
