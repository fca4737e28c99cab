"""Our passes of the TVM pipeline, in the order they run.

On the ONNX model, in :func:`rewriter.backends.tvm.import_onnx.prepare` (what TVM's
importer lacks): ``loss_decompose`` (NLL and softmax cross-entropy losses spelled out),
``unroll`` (constant-trip ``Loop`` nodes), ``qdq_matmul`` (QDQ MatMuls to the int8
kernel's op, on VNNI targets).

On the Relax module, in :func:`rewriter.backends.tvm.pipeline.relax_pipeline`:
``legalize_bf16_norms`` (bf16 layer/RMS norms computed in float32), ``bf16_matmul``
(bf16 matmuls to the ``vdpbf16ps`` kernel, before legalization), ``reduce_identity``
(float ``max``/``min`` legalized from -inf/+inf, with TVM's ``LegalizeOps``), ``pack_weights``
(constant matmul weights in panels, after fusion) and ``schedules`` (our dlight rules
for the CPU).
"""


def visit_functions(mutator: object, mod: object) -> None:
    """Run a ``relax.PyExprMutator`` over every Relax function of ``mod``, each result
    back into the mutator's builder (``mutator.builder_.get()`` is the rewritten module)."""
    from tvm import relax

    for gv, func in mod.functions.items():  # type: ignore[attr-defined]
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))  # type: ignore[attr-defined]
