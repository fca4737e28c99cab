"""A reshape over symbolic dimensions stays a view (``vm.builtin.reshape``), not a copy.

TVM legalizes ``R.reshape`` into a copying PrimFunc and turns it back into a view
(``RewriteDataflowReshape``) only where its analyzer proves the copy's index is the
identity of the flattened data. Over symbolic sizes it cannot (the index is a chain of
divisions and remainders by run-time extents, ``samples // 5 - 1`` ...), and the copy
stays, with those divisions per element: two reshapes of wav2vec2's feature encoder
took 30% of its symbolic library's time, one of them an identity. A reshape of a
contiguous tensor is a view whatever its sizes, so the ones with a symbolic dimension
are not legalized: the VM lowers them to its reshape builtin. Static reshapes keep TVM's
path, where fusion folds them into their neighbours' index. A reshape whose axes fall
into runs of equal size in which only the first axis on either side is symbolic
(:func:`reshape_groups`: ``[batch, 256, 3136] -> [batch, 256, 56, 56]``, a head split
``[batch, 256, n] -> [batch, 4, 64, n]``, heads into the batch ``[batch, 4, n, 64] ->
[4 * batch, n, 64]``) is legalized by :func:`grouped_reshape`: each run's index splits
by constants only, so fusion folds it too (TVM's own takes the whole flat index modulo
the symbolic extents, which its fusion treats as opaque; a view there kept the
transposes around SegFormer's decode-head reshapes apart, and its resize read
channels-first maps with gathers: 4.4 ms against 1.2 ms at fixed sizes; SqueezeBERT's
head splits and merges around its channels-first convolutions were two transposes and
two views each, one fused copy at fixed sizes). Where nothing fuses with it, TVM's
``RewriteDataflowReshape`` still makes it a view.

>>> LegalizeOps(customize_legalize_map=legalizations())  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from rewriter.backends.tvm.relax_passes import (
    dims_of,
    in_placeholder_vars,
    product,
    product_factors,
)


def legalizations() -> dict[str, Any]:
    """The ``LegalizeOps`` entry for ``relax.reshape`` (see the module)."""
    import tvm.relax.transform  # noqa: F401  (registers TVM's own legalizations)
    from tvm import ir

    stock = ir.Op.get("relax.reshape").get_attr("FLegalize")

    def legalize(bb: Any, call: Any) -> Any:
        source, target = dims_of(call.args[0]), dims_of(call)
        if source is not None and target is not None and _static(source + target):
            return stock(bb, call)
        groups = reshape_groups(source, target) if source and target else None
        if groups is None:
            return call  # kept: VMBuiltinLower makes it vm.builtin.reshape (a view)
        return bb.call_te(
            # The target in the placeholder's own variables (the caller's would be a second
            # variable of the same name, which TVM orders differently every build).
            lambda x: grouped_reshape(
                x, [in_placeholder_vars(d, source, x.shape) for d in target], groups  # type: ignore[union-attr]
            ),
            call.args[0],
            primfunc_name_hint="reshape",
        )

    return {"relax.reshape": legalize}


def _static(dims: list[Any]) -> bool:
    from tvm import tirx

    return all(isinstance(dim, tirx.IntImm) for dim in dims)


Group = tuple[list[int], list[int]]


def reshape_groups(source: list[Any], target: list[Any]) -> list[Group] | None:
    """``source``'s and ``target``'s axes (sizes of 1 left out) in runs of equal product,
    ``[([source axes], [target axes]), ...]`` in order, where every axis of a run but its
    first is static on both sides, so that a run's index splits by constants only
    (``[b, 256, n] -> [b, 4, 64, n]``: ``[0] [0]``, ``[1] [1, 2]``, ``[2] [3]``;
    ``[b, 4, n, 64] -> [4b, n, 64]``: ``[0, 1] [0]`` ...). None where no such runs exist:
    a run that would divide by a symbolic extent (``[2, n, 8] -> [2n, 8]``), or sizes
    whose products cannot be matched as products of the same variables."""

    kept_source = [i for i, dim in enumerate(source) if not _is_one(dim)]
    kept_target = [i for i, dim in enumerate(target) if not _is_one(dim)]
    groups: list[Group] = []
    i = j = 0
    while i < len(kept_source) and j < len(kept_target):
        run_source, run_target = [kept_source[i]], [kept_target[j]]
        i, j = i + 1, j + 1
        while True:
            left = _terms([source[k] for k in run_source])
            right = _terms([target[k] for k in run_target])
            if left is None or right is None:
                return None
            if left == right:
                break
            if _smaller(left, right) and i < len(kept_source):
                run_source.append(kept_source[i])
                i += 1
            elif _smaller(right, left) and j < len(kept_target):
                run_target.append(kept_target[j])
                j += 1
            else:
                return None
        for run, dims in ((run_source, source), (run_target, target)):
            if not _static([dims[k] for k in run[1:]]):
                return None
        groups.append((run_source, run_target))
    if i < len(kept_source) or j < len(kept_target):
        return None
    return groups


def _is_one(dim: Any) -> bool:
    from tvm import tirx

    return isinstance(dim, tirx.IntImm) and int(dim.value) == 1


def _terms(dims: list[Any]) -> tuple[int, tuple[str, ...]] | None:
    """The product of ``dims`` as a constant and the sorted structural keys of its other
    factors (a variable, or any expression that is not a product: ``(n + 6) // 7``)."""
    coefficient, factors = product_factors(dims)
    if coefficient <= 0:
        return None
    return coefficient, tuple(sorted(str(factor) for factor in factors))


def _smaller(part: tuple[int, tuple[str, ...]], whole: tuple[int, tuple[str, ...]]) -> bool:
    """Whether the run of ``part`` (:func:`_terms`) must grow to match ``whole``'s: its
    symbolic factors are some of ``whole``'s, and fewer, or the same with a smaller
    constant (``128`` against ``255``: ``128 x 255`` may match ``255 x 128``)."""
    rest = list(whole[1])
    for factor in part[1]:
        if factor not in rest:
            return False
        rest.remove(factor)
    return bool(rest) or part[0] < whole[0]


def grouped_reshape(x: Any, target: list[Any], groups: list[Group]) -> Any:
    """``x`` reshaped to ``target`` run by run (:func:`reshape_groups`): within a run, the
    target's index flattened and split into the source's axes by the run's static extents
    (TVM's reshape flattens the whole index and takes it modulo the symbolic extents,
    which its fusion treats as opaque). Axes of size 1 index at 0."""
    from tvm import te, tirx

    source = list(x.shape)

    def element(*index: Any) -> Any:
        at: list[Any] = [tirx.const(0, "int64")] * len(source)
        for run_source, run_target in groups:
            flat = index[run_target[0]]
            for k in run_target[1:]:
                flat = flat * target[k] + index[k]
            for k in reversed(run_source[1:]):
                at[k] = flat % source[k]
                flat = flat // source[k]
            at[run_source[0]] = flat
        return x(*at)

    return te.compute(target, element, name="T_reshape")


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
