"""Concatenations written in place by the calls that make their parts
(relax_passes.concat_in_place)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from rewriter.backends import tvm as backend
from tests.backends.tvm.test_conv import TOLERANCE, _model, _run

SQUEEZE, EXPAND = 8, 16


def fire(tail: str = "conv", *, size: int = 14, axis: int = 1) -> onnx.ModelProto:
    """SqueezeNet's fire module on ``[batch, 16, size, size]``: a 1x1 squeeze, then a 1x1
    and a 3x3 expansion (each with ReLU) concatenated along ``axis``, then ``tail``:

    * ``conv``: a 1x1 convolution (the next fire module's squeeze);
    * ``pool``: a max pool, then a global average pool, flattened (the model's output is
      a view of what the pool read);
    * ``output``: the concatenation is the model's output;
    * ``reread``: the 1x1 expansion is read again, added to the 1x1 convolution's output;
    * ``input``: the model's input is a third part;
    * ``nested``: the concatenation and the squeeze's output are concatenated again
      (Inception-v3's blocks).
    """
    rng = np.random.default_rng(3)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        value = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
        return numpy_helper.from_array(value, name)

    joined = 2 * EXPAND if axis == 1 else EXPAND
    inits = [
        weight("squeeze", SQUEEZE, 16, 1, 1),
        weight("e1", EXPAND, SQUEEZE, 1, 1),
        weight("e3", EXPAND, SQUEEZE, 3, 3),
        weight("head", 24, joined + (16 if tail == "input" else 0), 1, 1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "squeeze"], ["s0"]),
        helper.make_node("Relu", ["s0"], ["s"]),
        helper.make_node("Conv", ["s", "e1"], ["a0"]),
        helper.make_node("Relu", ["a0"], ["a"]),
        helper.make_node("Conv", ["s", "e3"], ["b0"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["b0"], ["b"]),
    ]
    parts = ["a", "b", "x"] if tail == "input" else ["a", "b"]
    nodes.append(helper.make_node("Concat", parts, ["cat"], axis=axis))
    if tail in ("conv", "reread", "input"):
        nodes.append(helper.make_node("Conv", ["cat", "head"], ["y" if tail != "reread" else "h"]))
    if tail == "reread":
        inits.append(weight("back", 24, EXPAND, 1, 1))
        nodes += [
            helper.make_node("Conv", ["a", "back"], ["r"]),
            helper.make_node("Add", ["h", "r"], ["y"]),
        ]
    elif tail == "pool":
        nodes += [
            helper.make_node("MaxPool", ["cat"], ["p"], kernel_shape=[3, 3], strides=[2, 2]),
            helper.make_node("GlobalAveragePool", ["p"], ["g"]),
            helper.make_node("Flatten", ["g"], ["y"]),
        ]
    elif tail == "output":
        nodes.append(helper.make_node("Identity", ["cat"], ["y"]))
    elif tail == "nested":
        nodes += [
            helper.make_node("Concat", ["cat", "s"], ["outer"], axis=axis),
            helper.make_node("Relu", ["outer"], ["y"]),
        ]
    return _model(nodes, ["batch", 16, size, size], inits)


def _compiled(model: onnx.ModelProto, batch: int | None) -> tuple[backend.Compiled, float]:
    """``model`` compiled (at a fixed ``batch``, or symbolic where None), and its error
    relative to ONNX Runtime's output at that batch (3 for the symbolic one)."""
    dims = None if batch is None else {"batch": batch}
    return _run(model, [batch or 3, 16, 14, 14], dims)


def _functions(compiled: backend.Compiled) -> dict[str, str]:
    """Each PrimFunc of the library: the rule that scheduled it."""
    assert compiled.schedules is not None
    return compiled.schedules.scheduled


@pytest.mark.parametrize("batch", [1, None], ids=["fixed", "symbolic"])
@pytest.mark.parametrize("tail", ["conv", "pool"])
def test_the_expansions_write_their_channels_into_the_concatenation(tail, batch):
    # No concatenation is left: the 1x1 expansion writes channels 0-15 of its buffer,
    # the 3x3 one (Winograd's output transform, at 14 x 14) channels 16-31 of the same
    # buffer, in place; both are scheduled as before.
    compiled, error = _compiled(fire(tail), batch)
    assert error < TOLERANCE.rtol
    functions = _functions(compiled)
    assert not [name for name in functions if "concatenate" in name], functions
    into = {name: rule for name, rule in functions.items() if "_into_" in name}
    assert sorted(name.rsplit("_into_", 1)[1] for name in into) == ["32_at_0", "32_at_16"], into
    assert all(rule not in ("none", "Reduction") for rule in into.values()), into


@pytest.mark.parametrize("tail", ["output", "reread", "input"])
def test_a_concatenation_whose_parts_do_not_all_qualify_is_kept(tail):
    # The model's output (its buffer is the caller's; here fused with the transpose
    # back to channels-first), a part read again, a part that no call makes (the
    # model's input): the concatenation stays a copy.
    compiled, error = _compiled(fire(tail), None)
    assert error < TOLERANCE.rtol
    functions = _functions(compiled)
    assert [name for name in functions if "concatenate" in name], functions
    assert not [name for name in functions if "_into_" in name], functions


def test_a_nested_concatenation_is_one_copy():
    # Inception-v3: concat(concat(a, b), s), then a ReLU: TVM fuses the two
    # concatenations and the ReLU into one function, which is not a concatenation alone:
    # it copies, as before.
    compiled, error = _compiled(fire("nested"), 2)
    assert error < TOLERANCE.rtol
    assert not [name for name in _functions(compiled) if "_into_" in name]


def test_parts_along_a_spatial_axis():
    # Along the image's height (axis 2 of NCHW: 1 of the channels-last layout): each
    # part writes rows 0-13 and 14-27 of a 28-row map.
    compiled, error = _compiled(fire("conv", axis=2), 2)
    assert error < TOLERANCE.rtol
    into = [name for name in _functions(compiled) if "_into_" in name]
    assert sorted(name.rsplit("_into_", 1)[1] for name in into) == [
        "28_at_0_axis1",
        "28_at_14_axis1",
    ]


def test_the_concatenation_is_marked_for_the_pass():
    import tvm
    from tvm import relax

    from rewriter.backends.tvm.relax_passes import concat_in_place

    x = relax.Var("x", relax.TensorType([2, 3], "float32"))
    y = relax.Var("y", relax.TensorType([2, 5], "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x, y]):
        with builder.dataflow():
            out = builder.emit_output(relax.op.concat([x, y], axis=-1))
        builder.emit_func_output(out)
    mod = relax.transform.LegalizeOps(concat_in_place.legalizations())(builder.get())
    marked = [
        func.attrs[concat_in_place.ATTRIBUTE]
        for func in mod.functions.values()
        if isinstance(func, tvm.tirx.PrimFunc)
    ]
    assert [int(axis) for axis in marked] == [1]
