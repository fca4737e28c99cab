"""``main`` gets ``main_out`` and outputs of its own (:mod:`rewriter.backends.tvm.relax_passes.outputs_as_params`).

Structure only; the numbers through both functions are in ``test_session.py``.
"""

from __future__ import annotations

import pytest

tvm = pytest.importorskip("tvm")

import numpy as np  # noqa: E402
import tvm_ffi  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline  # noqa: E402
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from rewriter.backends.tvm.relax_passes import outputs_as_params  # noqa: E402


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((2, 8), "float32")):
        with R.dataflow():
            y = R.nn.softmax(x, axis=-1)
            flat = R.reshape(y, (16,))
            out = (flat, x, y)
            R.output(out)
        return out


def _lowered() -> tvm.IRModule:
    """``Before`` as the pass finds it: legalized, after TVM's dataflow lowering."""
    target = tvm.target.Target({"kind": "llvm"})
    passes = [relax.transform.LegalizeOps(), *cpu_pipeline.dataflow_lower_passes(target)]
    return tvm.transform.Sequential(passes)(Before)


def _calls(func: relax.Function, name: str) -> int:
    return str(func).count(name)


def test_main_out_takes_one_parameter_per_output():
    mod = outputs_as_params.add_out_function(_lowered())
    main_out = mod[outputs_as_params.OUT_FUNCTION]
    assert [param.name for param in main_out.params] == ["x", "out0", "out1", "out2"]
    assert int(main_out.attrs["num_input"]) == 4
    assert main_out.attrs["global_symbol"] == outputs_as_params.OUT_FUNCTION


def test_only_outputs_without_a_buffer_of_their_own_are_copied():
    """``x`` (an input) and the second use of the softmax's buffer (``flat`` is a view
    of it) are copied; ``flat`` keeps the kernel's buffer."""
    before = _lowered()
    after = outputs_as_params.add_out_function(before)
    assert _calls(before["main"], outputs_as_params.COPY) == 0
    assert _calls(after["main"], outputs_as_params.COPY) == 2
    # main_out writes the kernel's output into out0 (viewed in the kernel's shape) and
    # allocates no buffer for it.
    main_out = after[outputs_as_params.OUT_FUNCTION]
    assert _calls(after["main"], "alloc_tensor") - _calls(main_out, "alloc_tensor") == 3


def test_a_second_run_changes_nothing_but_main_out():
    once = outputs_as_params.add_out_function(_lowered())
    twice = outputs_as_params.add_out_function(once)
    assert tvm_ffi.structural_equal(once["main"], twice["main"])


def test_the_module_builds_and_both_functions_run():
    import numpy as np

    mod = outputs_as_params.add_out_function(_lowered())
    mod = tvm.transform.Sequential(
        cpu_pipeline.finalize_passes(tvm.target.Target({"kind": "llvm"}))
    )(mod)
    executable = relax.build(mod, target=tvm.target.Target({"kind": "llvm"}), relax_pipeline=None)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    flat, same_x, y = vm["main"](tvm.runtime.tensor(x))
    outs = [tvm.runtime.empty(shape, "float32") for shape in [(16,), (2, 8), (2, 8)]]
    vm["main_out"](tvm.runtime.tensor(x), *outs)
    np.testing.assert_array_equal(same_x.numpy(), x)
    for got, out in zip([flat, same_x, y], outs, strict=True):
        np.testing.assert_array_equal(out.numpy(), got.numpy())


def _calls_and_constants(func: relax.Function) -> tuple[list, list]:
    calls: list = []
    constants: list = []

    def visit(expr) -> None:
        if isinstance(expr, relax.Call):
            calls.append(expr)
            for arg in expr.args:
                visit(arg)
        elif isinstance(expr, relax.Tuple):
            for field in expr.fields:
                visit(field)
        elif isinstance(expr, tvm.ir.expr.Constant) and isinstance(expr.value, tvm.runtime.Tensor):
            constants.append(expr)

    for block in func.body.blocks:
        for binding in block.bindings:
            visit(binding.value)
    return calls, constants


def test_main_out_shares_no_call_with_main_and_copies_no_weight():
    """Memory planning keys its tokens by call node: a call shared by both functions
    broke it. The weights are shared, not copied (a deep copy of the function copied
    every weight: 4 s for 64 MB)."""
    weight = np.arange(16, dtype=np.float32).reshape(2, 8)

    @I.ir_module
    class WithWeight:
        @R.function
        def main(x: R.Tensor((2, 8), "float32")):
            with R.dataflow():
                y = R.add(x, R.const(weight))
                z = R.multiply(y, y)  # y: an allocation of constant operands only
                R.output(z)
            return z

    target = tvm.target.Target({"kind": "llvm"})
    lowered = tvm.transform.Sequential(
        [relax.transform.LegalizeOps(), *cpu_pipeline.dataflow_lower_passes(target)]
    )(WithWeight)
    mod = outputs_as_params.add_out_function(lowered)
    main_calls, main_constants = _calls_and_constants(mod["main"])
    out_calls, out_constants = _calls_and_constants(mod[outputs_as_params.OUT_FUNCTION])
    assert main_calls and out_calls
    assert not any(ours.same_as(theirs) for ours in out_calls for theirs in main_calls)
    assert len(main_constants) == len(out_constants) == 1 and out_constants[0].same_as(
        main_constants[0]
    )


def test_an_output_sized_by_the_data_gets_no_main_out():
    """A size computed inside the call (a detector's kept boxes) cannot be allocated by
    the caller beforehand, and the VM checks main_out's parameters on entry."""

    @I.ir_module
    class DataSized:
        @R.function
        def main(x: R.Tensor((8,), "float32")):
            kept = T.int64()
            with R.dataflow():
                count = R.shape([3])
                sized = R.match_cast(count, R.Shape([kept]))
                y = R.strided_slice(x, axes=[0], begin=[0], end=[kept])
                R.output(y, sized)
            return y

    target = tvm.target.Target({"kind": "llvm"})
    lowered = tvm.transform.Sequential(
        [relax.transform.LegalizeOps(), *cpu_pipeline.dataflow_lower_passes(target)]
    )(DataSized)
    mod = outputs_as_params.add_out_function(lowered)
    assert outputs_as_params.OUT_FUNCTION not in [gv.name_hint for gv in mod.get_global_vars()]


def test_a_model_with_an_if_builds_without_main_out():
    """An output made in a branch: rebound by the pass, TVM's memory planning met one call
    twice and aborted the build. Such a model gets no main_out (Session copies main's
    outputs), builds, and takes either branch."""
    from onnx import TensorProto, helper, numpy_helper

    from rewriter.backends import tvm as backend

    def branch(op: str, name: str) -> object:
        node = helper.make_node(op, ["x"], [name])
        value = helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 4])
        return helper.make_graph([node], op, [], [value])

    zero = numpy_helper.from_array(np.array(0, np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Constant", [], ["zero"], value=zero),
            helper.make_node("Greater", ["s", "zero"], ["positive"]),
            helper.make_node(
                "If",
                ["positive"],
                ["y"],
                then_branch=branch("Relu", "then"),
                else_branch=branch("Neg", "else"),
            ),
        ],
        "branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    compiled = backend.compile(model, "llvm")
    session = compiled.session()
    assert not session.writes_in_place
    x = np.arange(-3, 5, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(session.run({"x": x})["y"], np.maximum(x, 0))
    np.testing.assert_array_equal(session.run({"x": -x})["y"], x)
