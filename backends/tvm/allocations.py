"""What a compiled model allocates: the Relax VM's memory plan and each kernel's buffers.

:func:`lowered` runs the import and the Relax pipeline of :func:`rewriter.backends.tvm.compile`
(the module ``relax.build`` turns into code), and :func:`allocations` lists, in bytes:

* ``storage``: each ``alloc_storage`` of the Relax functions, the VM's static memory plan
  (``StaticPlanBlockMemory``): the tensors handed between kernels, storage reused where
  lifetimes allow;
* ``tensor``: each ``alloc_tensor`` left outside the plan (symbolic shapes);
* ``buffer``: each buffer a PrimFunc allocates for itself (a kernel's scratch; per thread
  when the allocation sits in a parallel loop).

Weights (constants) and the model's inputs are not allocations. Symbolic sizes are None.
The loss tests use it to show that the fused linear + cross-entropy kernel never holds a
``tokens x vocab`` buffer, and the benchmark to print each peer's largest intermediate.

>>> largest(allocations(lowered(proto, "avx512"))).nbytes  # doctest: +SKIP
65536
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from rewriter.backends.tvm import import_onnx, targets

_STORAGE_OPS = ("relax.vm.alloc_storage", "relax.memory.alloc_storage")
_TENSOR_OPS = ("relax.builtin.alloc_tensor",)


@dataclasses.dataclass(frozen=True)
class Allocation:
    """One allocation: the function it is in, its kind, a name and its size in bytes."""

    function: str
    kind: str  # "storage", "tensor" or "buffer"
    name: str
    nbytes: int | None


def lowered(
    model: import_onnx.ModelLike, target: str = "avx512", *, dims: Mapping[str, int] | None = None
) -> Any:
    """``model`` imported and run through the Relax pipeline of ``compile`` for ``target``."""
    from rewriter.backends.tvm.pipeline import relax_pipeline

    tvm_target = targets.resolve(target)
    proto = import_onnx.prepare(model, dims=dims, gpu=targets.is_gpu(target))
    mod = import_onnx.import_onnx(proto, target=tvm_target)
    return relax_pipeline(tvm_target)(mod)


def allocations(mod: Any) -> list[Allocation]:
    """Every allocation of the lowered module ``mod`` (see the module docstring)."""
    from tvm import relax, tirx

    found: list[Allocation] = []
    for gvar, func in mod.functions.items():
        name = gvar.name_hint
        if isinstance(func, relax.Function):
            found.extend(_relax_allocations(name, func))
        elif isinstance(func, tirx.PrimFunc):
            found.extend(
                Allocation(name, "buffer", buffer.name, _nbytes(buffer.shape, buffer.dtype))
                for buffer in _tir_buffers(func.body)
            )
    return found


def largest(
    found: list[Allocation], kinds: tuple[str, ...] = ("storage", "tensor", "buffer")
) -> Allocation | None:
    """The largest allocation of ``kinds`` with a static size, or None."""
    sized = [a for a in found if a.kind in kinds and a.nbytes is not None]
    return max(sized, key=lambda a: a.nbytes or 0, default=None)


def _relax_allocations(name: str, func: Any) -> list[Allocation]:
    from tvm import relax

    found: list[Allocation] = []

    def visit(expr: Any) -> None:
        if not isinstance(expr, relax.Call) or not hasattr(expr.op, "name"):
            return
        if expr.op.name in _STORAGE_OPS:
            found.append(Allocation(name, "storage", expr.op.name, _static(expr.args[0], "uint8")))
        elif expr.op.name in _TENSOR_OPS:
            dtype = str(expr.args[1].value) if hasattr(expr.args[1], "value") else "float32"
            found.append(Allocation(name, "tensor", expr.op.name, _static(expr.args[0], dtype)))

    relax.analysis.post_order_visit(func.body, visit)
    return found


def _static(shape: Any, dtype: str) -> int | None:
    values = getattr(shape, "values", None)
    return None if values is None else _nbytes(values, dtype)


def _nbytes(shape: Any, dtype: Any) -> int | None:
    from tvm import tirx

    dims = list(shape)
    if not all(isinstance(d, (int, tirx.IntImm)) for d in dims):
        return None
    count = int(np.prod([int(d) for d in dims])) if dims else 1
    return count * np.dtype(str(dtype)).itemsize if str(dtype) != "bool" else count


def _tir_buffers(stmt: Any) -> Iterator[Any]:
    """The buffers allocated in a TIR statement (``AllocBuffer``, block ``alloc_buffers``)."""
    from tvm import s_tir, tirx

    pending = [stmt]
    while pending:
        node = pending.pop()
        if node is None:
            continue
        if isinstance(node, tirx.stmt.AllocBuffer):
            yield node.buffer
        elif isinstance(node, tirx.stmt.SeqStmt):
            pending.extend(node.seq)
        elif isinstance(node, tirx.stmt.IfThenElse):
            pending.extend([node.then_case, node.else_case])
        elif isinstance(node, s_tir.SBlockRealize):
            pending.append(node.block)
        elif isinstance(node, s_tir.SBlock):
            yield from node.alloc_buffers
            pending.extend([node.body, node.init])
        elif isinstance(node, (tirx.stmt.For, tirx.stmt.AttrStmt, tirx.stmt.While)):
            pending.append(node.body)
