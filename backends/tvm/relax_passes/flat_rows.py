"""A matmul by a 2-D weight over two or more symbolic leading axes runs on them flattened.

``x[d0, d1, ..., K] @ W[K, N]`` is one matrix product of ``d0 * d1 * ...`` rows; our
matmul rule (:class:`rewriter.backends.tvm.relax_passes.schedules`) tiles one leading
axis as rows and loops over the others. Where two are symbolic it cannot tell which is
long: it takes the last, ``d1``, padded to whole register tiles. A sequence-first layout
(``[frames, batch, K]``, as ``nn.MultiheadAttention``'s projections are written: WavLM's
attention) then computes 8 rows for each row of a batch of 1, each frame a loop
iteration: WavLM's symbolic library ran its projections at 7x the time of the
fixed-size one (2.7 ms against 0.38), the model at 1.04x ONNX Runtime's time against
0.84x. Flattened (``reshape`` of a contiguous tensor: a view), the rows are all the
leading axes, padded once (WavLM: 0.94x). Only where the rows the rule would take are
the model's batch axis: ``[batch, tokens, K]`` keeps its tokens as rows and its bias and
activation fused into the matmul's function (the reshape back would keep them apart).
The product is reshaped back, a view too.

>>> mod = flatten_symbolic_rows()(mod)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.relax_passes import dims_of, rewrite_calls
from rewriter.backends.tvm.relax_passes.conv import _is_op

if TYPE_CHECKING:
    import tvm


def flatten_symbolic_rows() -> tvm.transform.Pass:
    """The Relax pass (see the module docstring)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="FlattenSymbolicRows")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        batches = batch_vars(mod)
        return rewrite_calls(
            mod, {"relax.matmul"}, lambda builder, call: flattened(builder, call, batches)
        )

    return pass_


def batch_vars(mod: tvm.IRModule) -> list[Any]:
    """The symbolic leading axes of the Relax functions' tensor parameters (the batch)."""
    from tvm import relax, tirx

    found: list[Any] = []
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for param in func.params:
            shape = getattr(getattr(param, "ty", None), "shape", None)
            values = getattr(shape, "values", None)
            if values and isinstance(values[0], tirx.Var):
                found.append(values[0])
    return found


def flattened(builder: Any, call: Any, batches: list[Any]) -> Any:
    """``call`` (a matmul) on its flattened rows, reshaped back; None where the module's
    form does not apply: its rows (the last leading axis) must be a batch axis of the
    model's inputs (``batches``), so ``[batch, tokens, K]`` keeps its form (tokens as
    rows, the bias and activation after it fused into its function; a reshape between
    would keep them apart)."""
    import tvm_ffi
    from tvm import relax, tirx

    if not _is_op(call, "relax.matmul"):
        return None
    x, weight = call.args
    shape, weight_shape, out_shape = dims_of(x), dims_of(weight), dims_of(call)
    if shape is None or weight_shape is None or out_shape is None:
        return None
    if len(weight_shape) != 2 or len(shape) < 3:
        return None
    leading = shape[:-1]
    if sum(not isinstance(d, tirx.IntImm) for d in leading) < 2:
        return None
    if not any(tvm_ffi.structural_equal(leading[-1], batch) for batch in batches):
        return None
    rows = leading[0]
    for extent in leading[1:]:
        rows = rows * extent
    flat = builder.emit(relax.op.reshape(x, [rows, shape[-1]]))
    product = builder.emit(relax.op.matmul(flat, weight, out_dtype=call.attrs.out_dtype))
    return relax.op.reshape(product, out_shape)
