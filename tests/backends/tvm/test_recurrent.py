"""ONNX ``LSTM`` and ``GRU`` compiled (:mod:`rewriter.backends.tvm.recurrent`): an input
projection and our recurrence kernel, at symbolic sequence and batch, against ONNX
Runtime; what the kernel does not compute is refused in one line naming the op."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.faults import same_code_env

tvm = pytest.importorskip("tvm")
ort = pytest.importorskip("onnxruntime")

from tvm.script import tirx as T  # noqa: E402

from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.backends.tvm import targets  # noqa: E402
from rewriter.backends.tvm.kernels.common import activations  # noqa: E402
from rewriter.backends.tvm.kernels.common.simd_plan import span  # noqa: E402
from rewriter.errors import InputError  # noqa: E402

# ONNX Runtime and the kernel sum the gates' products in different orders and take
# different polynomial activations (each within ~2e-7); over a few steps of weights of
# scale 0.3 the states differ by ~5e-7 (measured: 6e-8 to 5e-7). 5e-6 is ten times that
# and far below a wrong gate or step (errors of order 0.1).
ATOL = 5e-6


def rnn_model(
    op: str,
    hidden: int,
    inputs: int,
    direction: str,
    *,
    layout: int = 0,
    with_h0: bool = False,
    with_c0: bool = False,
    peepholes: bool = False,
    **attrs: object,
) -> onnx.ModelProto:
    """One ``op`` node over ``X[seq, batch, inputs]`` (``[batch, seq, inputs]`` with
    ``layout=1``), seeded weights of scale 0.3, every output a graph output."""
    rng = np.random.default_rng(0)
    gates = 4 if op == "LSTM" else 3
    dirs = 2 if direction == "bidirectional" else 1
    arrays = {
        "W": rng.standard_normal((dirs, gates * hidden, inputs)),
        "R": rng.standard_normal((dirs, gates * hidden, hidden)),
        "B": rng.standard_normal((dirs, 2 * gates * hidden)),
    }
    if peepholes:
        arrays["P"] = rng.standard_normal((dirs, 3 * hidden))
    inits = [
        helper.make_tensor(k, TensorProto.FLOAT, v.shape, (0.3 * v).astype(np.float32).ravel())
        for k, v in arrays.items()
    ]
    seq, batch = ("seq", "batch") if layout == 0 else ("batch", "seq")
    state = [dirs, "batch", hidden] if layout == 0 else ["batch", dirs, hidden]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [seq, batch, inputs])]
    names = [
        "X",
        "W",
        "R",
        "B",
        "",
        "h0" if with_h0 else "",
        "c0" if with_c0 else "",
        "P" if peepholes else "",
    ]
    for name in ("h0", "c0"):
        if name in names:
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, state))
    while names[-1] == "":
        names.pop()
    outputs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    y = ["seq", dirs, "batch", hidden] if layout == 0 else ["batch", "seq", dirs, hidden]
    node = helper.make_node(
        op, names, outputs, hidden_size=hidden, direction=direction, layout=layout, **attrs
    )
    graph = helper.make_graph(
        [node],
        "rnn",
        graph_inputs,
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, y if name == "Y" else state)
            for name in outputs
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def feeds_for(model: onnx.ModelProto, seq: int, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    out = {}
    for value in model.graph.input:
        shape = [
            {"seq": seq, "batch": batch}.get(d.dim_param, d.dim_value)
            for d in value.type.tensor_type.shape.dim
        ]
        out[value.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ONNX Runtime's outputs; for ``layout=1`` (which ORT does not run) the layout-0
    model's, on transposed inputs, transposed back."""
    node = model.graph.node[0]
    layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
    if layout == 1:
        flipped = onnx.ModelProto()
        flipped.CopyFrom(model)
        next(a for a in flipped.graph.node[0].attribute if a.name == "layout").i = 0
        for value in [*flipped.graph.input, *flipped.graph.output]:
            dims = value.type.tensor_type.shape.dim
            order = [2, 0, 1, 3] if len(dims) == 4 else [1, 0, 2]
            kept = [onnx.TensorShapeProto.Dimension() for _ in dims]
            for k, d in zip(kept, dims, strict=True):
                k.CopyFrom(d)
            back = (
                [kept[order.index(i)] for i in range(len(dims))]
                if len(dims) == 4
                else [kept[1], kept[0], kept[2]]
            )
            del dims[:]
            dims.extend(back)
        swapped = {k: v.transpose(1, 0, 2) for k, v in feeds.items()}
        out = ort.InferenceSession(
            flipped.SerializeToString(), providers=["CPUExecutionProvider"]
        ).run(None, swapped)
        return [out[0].transpose(2, 0, 1, 3)] + [o.transpose(1, 0, 2) for o in out[1:]]
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )


CASES = {
    "lstm-bidirectional-states": (
        "LSTM",
        20,
        12,
        "bidirectional",
        {"with_h0": True, "with_c0": True},
    ),
    "lstm-forward": ("LSTM", 32, 8, "forward", {}),
    "lstm-reverse-clip-peepholes": (
        "LSTM",
        17,
        8,
        "reverse",
        {"with_h0": True, "with_c0": True, "peepholes": True, "clip": 0.7},
    ),
    "lstm-batch-first": (
        "LSTM",
        16,
        8,
        "bidirectional",
        {"layout": 1, "with_h0": True, "with_c0": True},
    ),
    "gru-bidirectional-linear-before-reset": (
        "GRU",
        20,
        12,
        "bidirectional",
        {"with_h0": True, "linear_before_reset": 1},
    ),
    "gru-forward-reset-first": ("GRU", 33, 8, "forward", {"with_h0": True}),
    "gru-bidirectional-reset-first": ("GRU", 24, 8, "bidirectional", {}),
    "gru-reverse-batch-first-clip": ("GRU", 16, 8, "reverse", {"layout": 1, "clip": 0.5}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recurrences_agree_with_onnx_runtime_at_any_sequence_and_batch(case: str) -> None:
    check_case(case)


@pytest.mark.parametrize(
    "case",
    [
        "lstm-bidirectional-states",
        "gru-bidirectional-linear-before-reset",
        "gru-bidirectional-reset-first",
    ],
)
def test_directions_taken_together_on_two_threads_agree(case: str) -> None:
    # From two threads (runtime.NumThreads, asked at each call) a bidirectional layer's
    # two directions take each step together (recurrent.TOGETHER). TVM's pool sizes
    # itself once, from TVM_NUM_THREADS: in a child process.
    code = "\n".join(
        [
            "import tvm",
            "assert tvm.get_global_func('runtime.NumThreads')() == 2",
            "from tests.backends.tvm.test_recurrent import check_case",
            f"check_case({case!r})",
        ]
    )
    env = {**same_code_env(), "TVM_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_only_a_bidirectional_layer_asks_for_the_threads(kind: str) -> None:
    from rewriter.backends.tvm.kernels import recurrent

    target = targets.resolve("avx512")
    unit = recurrent.unit_of(target)
    both = recurrent.recurrence(kind, 64, 2, reverse=False, target=target).script()
    one = recurrent.recurrence(kind, 64, 1, reverse=False, target=target).script()
    assert "runtime.NumThreads" in both and "runtime.NumThreads" not in one
    assert f"T.parallel({2 * 64 // unit}," in both  # both directions' tasks (and EVERY_STEP)


def check_case(case: str) -> None:
    """Case ``case`` of :data:`CASES` compiled once, against ONNX Runtime at several
    sequences and batches."""
    op, hidden, inputs, direction, attrs = CASES[case]
    model = rnn_model(op, hidden, inputs, direction, **attrs)
    compiled = backend.compile(model, "avx512")  # one library, symbolic seq and batch
    names = ["Y", "Y_h", "Y_c"][: len(model.graph.output)]
    # batch 13: a tile of eight rows (its gates two at a time), one of four and a single
    # row; batch 5: four rows and one; batch 3: single rows only
    for seq, batch in ((7, 5), (3, 3), (1, 4), (4, 13), (2, 8)):
        feeds = feeds_for(model, seq, batch)
        got = compiled.run(feeds)
        for name, want in zip(names, reference(model, feeds), strict=True):
            assert got[name].shape == want.shape, (name, seq, batch)
            np.testing.assert_allclose(
                got[name], want, rtol=0, atol=ATOL, err_msg=f"{name} seq={seq} batch={batch}"
            )
    assert compiled.schedules is not None and compiled.schedules.unscheduled == []


def test_the_recurrence_is_our_kernel_behind_one_projection_matmul() -> None:
    from rewriter.backends.tvm.import_onnx import import_onnx

    mod = import_onnx(rnn_model("LSTM", 20, 12, "bidirectional"), target=targets.resolve("avx512"))
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert "rewriter_lstm" in names
    main = mod["main"].script()
    assert main.count("R.matmul") == 1  # both directions' projections, every step at once


def test_weights_computed_from_initializers_are_folded() -> None:
    # The dynamo exporter slices torch's weight per gate and concatenates the slices in
    # ONNX's order; a weight read by several slices is past onnxscript's folding limits.
    model = rnn_model("GRU", 16, 8, "forward", linear_before_reset=1)
    graph = model.graph
    w = next(init for init in graph.initializer if init.name == "W")
    w.name = "W_torch"
    starts = {"s0": 0, "s1": 16, "e1": 48, "big": 1 << 30}
    graph.initializer.extend(
        helper.make_tensor(k, TensorProto.INT64, [1], [v]) for k, v in starts.items()
    )
    graph.initializer.append(helper.make_tensor("axis", TensorProto.INT64, [1], [1]))
    graph.node.insert(0, helper.make_node("Slice", ["W_torch", "s1", "e1", "axis"], ["upper"]))
    graph.node.insert(1, helper.make_node("Slice", ["W_torch", "s0", "s1", "axis"], ["lower"]))
    graph.node.insert(2, helper.make_node("Concat", ["upper", "lower"], ["W"], axis=1))
    # A second GRU reading the same computed weights (folded once), the other way round.
    first = graph.node[3]
    second = onnx.helper.make_node(
        "GRU", list(first.input), ["Y2"], hidden_size=16, linear_before_reset=1, direction="reverse"
    )
    graph.node.append(second)
    graph.output.append(
        helper.make_tensor_value_info("Y2", TensorProto.FLOAT, ["seq", 1, "batch", 16])
    )
    feeds = feeds_for(model, 6, 2)
    got = backend.compile(model, "avx512").run(feeds)
    want = reference(model, feeds)
    np.testing.assert_allclose(got["Y"], want[0], rtol=0, atol=ATOL)
    np.testing.assert_allclose(got["Y2"], want[2], rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"activations": ["Tanh", "Tanh"]}, "GRU: activations"),
        ({"sequence_lens": True}, "GRU: per-sequence lengths"),
    ],
)
def test_what_the_kernel_does_not_compute_is_refused_naming_the_op(
    attrs: dict, message: str
) -> None:
    model = rnn_model(
        "GRU", 16, 8, "forward", **{k: v for k, v in attrs.items() if k != "sequence_lens"}
    )
    if attrs.get("sequence_lens"):
        node = model.graph.node[0]
        node.input.extend(["lens"])
        model.graph.input.append(
            helper.make_tensor_value_info("lens", TensorProto.INT32, ["batch"])
        )
    with pytest.raises(InputError, match=message) as raised:
        backend.compile(model, "avx512")
    assert "\n" not in str(raised.value)


def test_lstm_input_forget_is_refused() -> None:
    with pytest.raises(InputError, match="LSTM: input_forget"):
        backend.compile(rnn_model("LSTM", 16, 8, "forward", input_forget=1), "avx512")


def test_sigmoid_and_tanh_polynomials_are_within_2e7_of_float64() -> None:
    lanes = 16
    x = np.concatenate(
        [
            np.linspace(-30, 30, 60001),
            [0.0, -0.0, 1e-30, -1e-8, 0.6249, 0.625, -0.625, 9.0, 80.0, -100.0],
        ]
    ).astype(np.float32)
    x = np.concatenate([x, np.zeros((-x.size) % lanes, np.float32)])
    n = x.size

    @T.prim_func
    def act(
        X: T.Buffer((n,), "float32"), S: T.Buffer((n,), "float32"), H: T.Buffer((n,), "float32")
    ):
        T.func_attr({"tirx.noalias": True})
        e = T.alloc_buffer((lanes,), "float32")
        for i in T.serial(n // lanes):
            e[span(0, lanes)] = activations.sigmoid_exp(X[span(i * lanes, lanes)], lanes)
            S[span(i * lanes, lanes)] = activations.sigmoid(
                X[span(i * lanes, lanes)], e[span(0, lanes)], lanes
            )
            e[span(0, lanes)] = activations.tanh_exp(X[span(i * lanes, lanes)], lanes)
            H[span(i * lanes, lanes)] = activations.tanh(
                X[span(i * lanes, lanes)], e[span(0, lanes)], lanes
            )

    lib = tvm.compile(act, target=targets.resolve("avx512"))
    s_out, h_out = tvm.runtime.tensor(np.empty_like(x)), tvm.runtime.tensor(np.empty_like(x))
    lib(tvm.runtime.tensor(x), s_out, h_out)
    exact = x.astype(np.float64)
    assert np.abs(s_out.numpy() - 1 / (1 + np.exp(-exact))).max() <= 2e-7
    assert np.abs(h_out.numpy() - np.tanh(exact)).max() <= 2e-7
    tiny = np.abs(exact) < 1e-3  # tanh's polynomial keeps small values relative
    assert np.all(np.abs(h_out.numpy()[tiny] - exact[tiny]) <= 1e-7 * np.abs(exact[tiny]) + 1e-37)
    asm = (
        lib.mod.imports[0].inspect_source("asm")
        if lib.mod.imports
        else lib.mod.inspect_source("asm")
    )
    assert "expf" not in asm and "tanhf" not in asm
