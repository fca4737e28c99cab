"""A reshape over symbolic dimensions stays a view (``vm.builtin.reshape``), not a copy.

TVM legalizes ``R.reshape`` into a copying PrimFunc and turns it back into a view
(``RewriteDataflowReshape``) only where its analyzer proves the copy's index is the
identity of the flattened data. Over symbolic sizes it cannot (the index is a chain of
divisions and remainders by run-time extents, ``samples // 5 - 1`` ...), and the copy
stays, with those divisions per element: two reshapes of wav2vec2's feature encoder
took 30% of its symbolic library's time, one of them an identity. A reshape of a
contiguous tensor is a view whatever its sizes, so the ones with a symbolic dimension
are not legalized: the VM lowers them to its reshape builtin. Static reshapes keep TVM's
path, where fusion folds them into their neighbours' index. A reshape whose symbolic
dimensions are a prefix both shapes share (``[batch, 256, 3136] -> [batch, 256, 56,
56]``) is legalized by :func:`prefix_reshape`: the prefix indexes as it is, the static
rest through divisions by constants, so fusion folds it too (TVM's own takes the whole
flat index modulo the batch, which its fusion treats as opaque; a view there kept the
transposes around SegFormer's decode-head reshapes apart, and its resize read
channels-first maps with gathers: 4.4 ms against 1.2 ms at fixed sizes). Where nothing
fuses with it, TVM's ``RewriteDataflowReshape`` still makes it a view.

>>> LegalizeOps(customize_legalize_map=legalizations())  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from rewriter.backends.tvm.relax_passes import dims_of, product


def legalizations() -> dict[str, Any]:
    """The ``LegalizeOps`` entry for ``relax.reshape`` (see the module)."""
    import tvm.relax.transform  # noqa: F401  (registers TVM's own legalizations)
    from tvm import ir

    stock = ir.Op.get("relax.reshape").get_attr("FLegalize")

    def legalize(bb: Any, call: Any) -> Any:
        source, target = dims_of(call.args[0]), dims_of(call)
        shared = shared_prefix(source, target)
        if shared is None:
            return call  # kept: VMBuiltinLower makes it vm.builtin.reshape (a view)
        if shared == 0:
            return stock(bb, call)  # static
        return bb.call_te(
            # The prefix in the placeholder's own variables (the caller's would be a second
            # variable of the same name, which TVM orders differently every build).
            lambda x: prefix_reshape(x, [int(d) for d in target[shared:]], x.shape[:shared]),  # type: ignore[index]
            call.args[0],
            primfunc_name_hint="reshape",
        )

    return {"relax.reshape": legalize}


def shared_prefix(source: Any, target: Any) -> int | None:
    """How many leading symbolic dimensions ``source`` and ``target`` share (0: both
    static) where every dimension after them is static; None otherwise."""
    import tvm_ffi
    from tvm import tirx

    if source is None or target is None:
        return None
    shared = 0
    while (
        shared < min(len(source), len(target))
        and not isinstance(source[shared], tirx.IntImm)
        and tvm_ffi.structural_equal(source[shared], target[shared])
    ):
        shared += 1
    rest = [*source[shared:], *target[shared:]]
    return shared if all(isinstance(dim, tirx.IntImm) for dim in rest) else None


def prefix_reshape(x: Any, tail: list[int], prefix: Any) -> Any:
    """``x`` reshaped to ``prefix + tail``: the prefix indexes ``x`` as it is, the static
    tail through its flat index (divisions by constants only; TVM's reshape flattens the
    whole index and takes it modulo the symbolic extents, which its fusion treats as
    opaque)."""
    from tvm import te, tirx

    source_tail = [int(d) for d in x.shape[len(prefix) :]]

    def element(*index: Any) -> Any:
        flat: Any = tirx.const(0, "int64")
        for i, size in zip(index[len(prefix) :], tail, strict=True):
            flat = flat * size + i
        inner = []
        for size in reversed(source_tail[1:]):
            inner.append(flat % size)
            flat = flat // size
        return x(*index[: len(prefix)], *([flat] if source_tail else []), *reversed(inner))

    return te.compute([*prefix, *tail], element, name="T_reshape")


def dataflow_reshapes() -> Any:
    """TVM's ``RewriteDataflowReshape`` (a ``call_tir`` of a copying reshape PrimFunc back
    to ``R.reshape``, a view), with its test of each callee guarded: TVM's
    ``HasReshapePattern`` aborts on some functions over composite symbolic sizes instead
    of answering no (a conformer's ``[1, 2n - 1, 4, 64]`` relative positions transposed,
    ``n = (samples - 400) // 320 + 1``: "padding factor ... is not divisible"), which
    stopped the whole compile. Such a function is not taken for a reshape; the rest is
    TVM's rule: only bindings inside dataflow blocks that stay in them, one input tensor
    read, the same dtype and, provably, the same number of elements."""
    import tvm
    from tvm import relax, sym

    @tvm.transform.module_pass(opt_level=0, name="RewriterDataflowReshape")
    def pass_(mod: Any, _ctx: Any) -> Any:
        analyzer = sym.Analyzer()
        call_tir = tvm.ir.Op.get("relax.call_tir")

        def as_view(call: Any) -> Any | None:
            if not (
                isinstance(call, relax.Call) and call.op.same_as(call_tir)
            ):
                return None
            func = mod[call.args[0]]
            args = list(call.args[1].fields) if isinstance(call.args[1], relax.Tuple) else []
            read = _read_inputs(func, len(args))
            if len(read) != 1:
                return None
            source = args[read[0]]
            try:
                if not relax.analysis.has_reshape_pattern(func):
                    return None
            except tvm.error.InternalError:
                return None  # TVM's analysis gave up: not provably a reshape
            source_dims, dims = dims_of(source), dims_of(call)
            if source_dims is None or dims is None or source.ty.dtype != call.ty.dtype:
                return None
            if not analyzer.can_prove_equal(product(source_dims), product(dims)):
                return None
            return relax.op.reshape(source, call.ty.shape)

        @relax.expr_functor.mutator
        class Views(relax.PyExprMutator):  # type: ignore[misc]
            def visit_var_binding_(self, binding: Any) -> None:
                view = (
                    as_view(binding.value) if isinstance(binding.var, relax.DataflowVar) else None
                )
                if view is None:
                    super().visit_var_binding_(binding)
                    return
                view = self.builder_.normalize(view)
                self.builder_.emit_normalized(relax.VarBinding(binding.var, view))

        from rewriter.backends.tvm.relax_passes import visit_functions

        mutator = Views(mod)
        visit_functions(mutator, mod)
        return mutator.builder_.get()

    return pass_


def _read_inputs(func: Any, count: int) -> list[int]:
    """The positions among ``func``'s first ``count`` parameters (its inputs) of the
    tensors its body loads."""
    import tvm
    import tvm_ffi

    read: set[int] = set()

    def note(load: Any) -> None:
        for index, param in enumerate(func.params[:count]):
            if load.source.same_as(param):
                read.add(index)

    tvm_ffi.structural_walk(func.body, (tvm.ir.TensorLoad, note), order="post")
    return sorted(read)
