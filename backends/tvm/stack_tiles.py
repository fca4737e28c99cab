"""Small buffers of a constant size (a matmul's register tile) kept on the stack.

TVM's ``LowerTVMBuiltin`` gives a CPU buffer a stack slot only under 1 KiB
(``kMaxStackAlloca``); a bigger one is a ``TVMBackendAllocWorkspace`` call, a heap
pointer LLVM cannot promote to registers. The matmul's 8 x 32 float accumulator tile is
exactly 1 KiB: its initial zeros were a ``memset`` of the heap tile before every row
tile, and the tile was stored to memory and read back for the epilogue (Phi-3's symbolic
library at batch 8: ``memset`` 5% of the call's samples, one thread). With
``disable_lower_builtin`` on their allocation (TVM's own annotation for this), the
buffers of constant size up to :data:`STACK_BYTES` stay allocas: LLVM keeps a register
tile in registers, and a bigger one still costs no call. Sizes are fixed at compile
time and small, so the stack of a pool thread (megabytes) is never at risk.

>>> with target:  # doctest: +SKIP
...     mod = stack_tiles_pass()(mod)  # before LowerTVMBuiltin (the host stage)
"""

from __future__ import annotations

from typing import Any

#: The largest buffer (bytes) kept on the stack; TVM's own limit is 1 KiB, exclusive.
STACK_BYTES = 4096
KEEP = "disable_lower_builtin"  # TVM's kDisableLowerTVMBuiltin


def stack_tiles_pass() -> Any:
    """The TIR pass (after lowering, before ``LowerTVMBuiltin``) annotating each
    allocation of a constant size up to :data:`STACK_BYTES`."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    def keep(stmt: Any) -> Any:
        size = constant_bytes(stmt.buffer)
        if size is None or size > STACK_BYTES or KEEP in (stmt.annotations or {}):
            return stmt
        return tirx.AllocBuffer(stmt.buffer, {**dict(stmt.annotations or {}), KEEP: tvm.tirx.IntImm("int32", 1)})

    def rewrite(func: tirx.PrimFunc, _mod: Any, _ctx: Any) -> tirx.PrimFunc:
        body = tvm_ffi.structural_map(func.body, [(tirx.AllocBuffer, keep)], order="post")
        return func if body.same_as(func.body) else func.with_body(body)

    return tirx.transform.prim_func_pass(rewrite, opt_level=0, name="RewriterStackTiles")


def constant_bytes(buffer: Any) -> int | None:
    """``buffer``'s size in bytes where every extent is a constant, else None."""
    from tvm import tirx

    size = dtype_bytes(buffer.dtype)
    for extent in buffer.shape:
        if not isinstance(extent, tirx.IntImm):
            return None
        size *= int(extent)
    return size


def dtype_bytes(dtype: Any) -> int:
    """Bytes of one element of ``dtype`` (lanes included)."""
    import tvm

    kind = tvm.DataType(str(dtype))
    return max(1, kind.bits * kind.lanes // 8)
