"""Runs without copies (:mod:`rewriter.backends.tvm.session`, ``Compiled.run``/``session``).

Inputs that are C-contiguous, 64-byte aligned and writable go to the VM through DLPack
(``Session.copied`` names those that did not); outputs are the VM's own buffers, fresh
each call, or the caller's ``out=`` arrays written by the kernels. Every result is
compared with numpy's softmax (float32, max abs err <= 1e-6: the two-pass kernel's
polynomial ``exp`` is within a few ulp of libm, and softmax values are <= 1).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.backends.tvm.session import aligned_empty  # noqa: E402
from rewriter.errors import InputError  # noqa: E402

ABS_TOLERANCE = 1e-6
COLS = 48


def _model(
    nodes: list, outputs: list[tuple[str, list[int | str]]], *, rows: int | str = 2, initializers=()
):
    graph = helper.make_graph(
        nodes,
        "session",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, COLS])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs],
        list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def softmax_model(rows: int | str = 2):
    return _model(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [("y", [rows, COLS])], rows=rows
    )


def reference(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _input(rows: int = 2) -> np.ndarray:
    x = aligned_empty((rows, COLS))
    x[:] = np.random.default_rng(0).standard_normal((rows, COLS), dtype=np.float32) * 3
    return x


@pytest.fixture(scope="module")
def compiled():
    return backend.compile(softmax_model(), "avx512")


def test_aligned_empty_is_aligned_and_shaped():
    for shape, dtype in [((3, 5), np.float32), ((7,), np.int64), ((2, 3, 4), np.uint8)]:
        array = aligned_empty(shape, dtype)
        assert array.ctypes.data % 64 == 0
        assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous


def test_aligned_numpy_input_is_not_copied(compiled):
    session = compiled.session()
    x = _input()
    y = session.run({"x": x})["y"]
    assert session.copied == []
    np.testing.assert_allclose(y, reference(x), atol=ABS_TOLERANCE, rtol=0)


@pytest.mark.parametrize("kind", ["misaligned", "strided", "read-only"])
def test_other_numpy_inputs_are_copied_and_agree(compiled, kind):
    x = _input()
    if kind == "misaligned":
        raw = aligned_empty((x.size + 1,))
        given = raw[1:].reshape(x.shape)
        given[:] = x
    elif kind == "strided":
        wide = np.zeros((2, 2 * COLS), np.float32)
        wide[:, ::2] = x
        given = wide[:, ::2]
    else:
        given = x.copy()
        given.flags.writeable = False
    session = compiled.session()
    for _ in range(2):  # the second call reuses the staging buffer
        y = session.run({"x": given})["y"]
        assert session.copied == ["x"]
        np.testing.assert_allclose(y, reference(x), atol=ABS_TOLERANCE, rtol=0)


def test_torch_tensors_are_taken_through_dlpack(compiled):
    torch = pytest.importorskip("torch")
    session = compiled.session()
    x = _input()
    tensor = torch.tensor(x)  # a copy in torch's allocator, on a 64-byte boundary
    assert tensor.data_ptr() % 64 == 0
    np.testing.assert_allclose(
        session.run({"x": tensor})["y"], reference(x), atol=ABS_TOLERANCE, rtol=0
    )
    assert session.copied == []
    transposed = torch.from_numpy(np.ascontiguousarray(x.T)).T  # not contiguous
    np.testing.assert_allclose(
        session.run({"x": transposed})["y"], reference(x), atol=ABS_TOLERANCE, rtol=0
    )
    assert session.copied == ["x"]
    with pytest.raises(InputError, match="input 'x' has dtype float64"):
        session.run({"x": torch.zeros((2, COLS), dtype=torch.float64)})
    with pytest.raises(InputError, match="input 'x' has shape"):
        session.run({"x": torch.zeros((3, COLS))})


def test_run_outputs_belong_to_the_caller(compiled):
    first_input, second_input = _input(), _input() * 2
    first = compiled.run({"x": first_input})["y"]
    kept = first.copy()
    second = compiled.run({"x": second_input})["y"]
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, kept)  # the second call did not write over it
    np.testing.assert_allclose(second, reference(second_input), atol=ABS_TOLERANCE, rtol=0)


def test_outputs_dropped_by_the_caller_are_reused_and_held_ones_are_not(compiled):
    """The session writes into its own buffers once it knows the output shapes (after
    the first call); a buffer goes back to work only when no array on it is alive, a
    view the caller took of an output included."""
    session = compiled.session()
    x, doubled = _input(), _input() * 2
    session.run({"x": x})  # main: gives the output shapes
    address = session.run({"x": x})["y"].ctypes.data  # dropped at once
    assert session.run({"x": x})["y"].ctypes.data == address  # the same buffer, no allocation
    row = session.run({"x": x})["y"][1]  # a view of the output, which the caller keeps
    kept = row.copy()
    second = session.run({"x": doubled})["y"]
    assert second.ctypes.data != address
    np.testing.assert_array_equal(row, kept)
    np.testing.assert_allclose(second, reference(doubled), atol=ABS_TOLERANCE, rtol=0)


def test_input_checks_name_the_input(compiled):
    with pytest.raises(InputError, match=r"missing inputs \['x'\]"):
        compiled.run({})
    with pytest.raises(InputError, match=r"unknown inputs \['z'\]"):
        compiled.run({"x": _input(), "z": _input()})
    with pytest.raises(InputError, match="input 'x' has rank 1"):
        compiled.run({"x": np.zeros(COLS, np.float32)})
    with pytest.raises(InputError, match="input 'x' has shape"):
        compiled.run({"x": np.zeros((2, COLS + 1), np.float32)})
    with pytest.raises(InputError, match="input 'x' has dtype float64"):
        compiled.run({"x": np.zeros((2, COLS))})


def test_out_arrays_are_written_by_the_kernel(compiled):
    session = compiled.session()
    assert session.writes_in_place
    x, y = _input(), aligned_empty((2, COLS))
    y[:] = np.nan
    result = session.run({"x": x}, out={"y": y})
    assert result["y"] is y
    np.testing.assert_allclose(y, reference(x), atol=ABS_TOLERANCE, rtol=0)


def test_unaligned_out_array_is_filled_by_a_copy(compiled):
    session = compiled.session()
    x = _input()
    raw = aligned_empty((2 * COLS + 1,))
    y = raw[1:].reshape(2, COLS)
    assert session.run({"x": x}, out={"y": y})["y"] is y
    np.testing.assert_allclose(y, reference(x), atol=ABS_TOLERANCE, rtol=0)


def test_bad_out_arrays_are_input_errors(compiled):
    session = compiled.session()
    x = _input()
    with pytest.raises(InputError, match=r"missing outputs \['y'\]"):
        session.run({"x": x}, out={})
    with pytest.raises(InputError, match=r"unknown outputs \['z'\]"):
        session.run({"x": x}, out={"y": aligned_empty((2, COLS)), "z": aligned_empty((2, COLS))})
    with pytest.raises(InputError, match="out\\['y'\\] must be a C-contiguous"):
        session.run({"x": x}, out={"y": np.zeros((COLS, 2), np.float32).T})
    with pytest.raises(InputError, match="shares memory with input 'x'"):
        session.run({"x": x}, out={"y": x})
    for wrong in [aligned_empty((3, COLS)), aligned_empty((2, COLS), np.float64)]:
        with pytest.raises(InputError, match="out"):
            session.run({"x": x}, out={"y": wrong})


def test_outputs_that_are_no_kernel_output_get_buffers_of_their_own():
    """An input passed through, a constant and a reshaped kernel output: ``main`` copies the
    first two into buffers of its own, so a caller writing into them changes nothing."""
    constant = numpy_helper.from_array(np.arange(2 * COLS, dtype=np.float32).reshape(2, COLS), "c")
    shape = numpy_helper.from_array(np.array([COLS, 2], np.int64), "shape")
    model = _model(
        [
            helper.make_node("Identity", ["x"], ["passed"]),
            helper.make_node("Identity", ["c"], ["const"]),
            helper.make_node("Softmax", ["x"], ["s"], axis=-1),
            helper.make_node("Reshape", ["s", "shape"], ["reshaped"]),
        ],
        [("passed", [2, COLS]), ("const", [2, COLS]), ("reshaped", [COLS, 2])],
        initializers=[constant, shape],
    )
    compiled = backend.compile(model, "avx512")
    x = _input()
    first = compiled.run({"x": x})
    assert not np.shares_memory(first["passed"], x)
    first["const"][:] = -1
    first["passed"][:] = -1
    second = compiled.run({"x": x})
    np.testing.assert_array_equal(second["const"], numpy_helper.to_array(constant))
    np.testing.assert_array_equal(x, _input())
    np.testing.assert_allclose(
        second["reshaped"], reference(x).reshape(COLS, 2), atol=ABS_TOLERANCE, rtol=0
    )

    session = compiled.session()
    out = {
        "passed": aligned_empty((2, COLS)),
        "const": aligned_empty((2, COLS)),
        "reshaped": aligned_empty((COLS, 2)),
    }
    result = session.run({"x": x}, out=out)
    assert all(result[name] is out[name] for name in out)
    np.testing.assert_array_equal(out["passed"], x)
    np.testing.assert_array_equal(out["const"], numpy_helper.to_array(constant))
    np.testing.assert_allclose(
        out["reshaped"], reference(x).reshape(COLS, 2), atol=ABS_TOLERANCE, rtol=0
    )


def test_symbolic_rows_with_out_arrays():
    compiled = backend.compile(softmax_model("rows"), "avx512")
    session = compiled.session()
    for rows in (1, 5, 1, 5, 5):  # new shapes go through main first, then the own buffers
        x = _input(rows)
        np.testing.assert_allclose(
            session.run({"x": x})["y"], reference(x), atol=ABS_TOLERANCE, rtol=0
        )
    for rows in (1, 5):
        x, y = _input(rows), aligned_empty((rows, COLS))
        assert session.run({"x": x}, out={"y": y})["y"] is y
        np.testing.assert_allclose(y, reference(x), atol=ABS_TOLERANCE, rtol=0)
    with pytest.raises(InputError, match="out"):
        session.run({"x": _input(3)}, out={"y": aligned_empty((4, COLS))})


@pytest.mark.parametrize("static", [True, False], ids=["fixed", "symbolic"])
def test_an_empty_input_runs(static):
    # A zero-size axis: no memory to share through DLPack (the staged buffer has none
    # either); the run gets an empty TVM tensor and returns an empty output. Before, the
    # CLI's verification of such a model ended in an internal error.
    rows = 0 if static else "rows"
    weight = numpy_helper.from_array(np.eye(COLS, dtype=np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Softmax", ["h"], ["y"], axis=-1),
    ]
    model = _model(nodes, [("y", [rows, COLS])], rows=rows, initializers=[weight])
    session = backend.compile(model, "avx512").session()
    # np.zeros of an empty shape has zero strides, which the matmul kernel's argument
    # check refused ("Mismatched x.strides").
    for x in (np.zeros((0, COLS), np.float32), _input(2)[:0]):
        assert session.run({"x": x})["y"].shape == (0, COLS)
    if not static:
        x = _input(3)
        np.testing.assert_allclose(
            session.run({"x": x})["y"], reference(x), atol=ABS_TOLERANCE, rtol=0
        )


def test_exported_library_keeps_main_out(compiled, tmp_path):
    library = compiled.export(tmp_path / "softmax.so")
    session = backend.load(library).session()
    assert session.writes_in_place
    x, y = _input(), aligned_empty((2, COLS))
    session.run({"x": x}, out={"y": y})
    np.testing.assert_allclose(y, reference(x), atol=ABS_TOLERANCE, rtol=0)


def test_bfloat16_outputs_through_the_sessions_buffers():
    """bfloat16 has no numpy DLPack code: it travels as uint16 and comes back as
    ml_dtypes' bfloat16, through ``main`` (first call) and ``main_out`` (later ones)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    model = _model(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16)], [("y", [2, COLS])]
    )
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.BFLOAT16
    session = backend.compile(model, "avx512").session()
    x = _input()
    for _ in range(3):
        y = session.run({"x": x})["y"]
        assert y.dtype == ml_dtypes.bfloat16
        # Rounding to bfloat16 (8 mantissa bits): within 2**-8 of |x|, and exact on bf16 values.
        np.testing.assert_allclose(y.astype(np.float32), x, rtol=2.0**-8, atol=0)


def test_sessions_in_threads_each_have_a_vm_and_agree(compiled):
    """A Relax VM's registers are state: sessions of one model that share a VM corrupt
    each other's calls from several threads (a register index of 2**54, then a segfault,
    seen with four threads). Each session has a VM of its own."""
    import threading

    sessions = [compiled.session() for _ in range(4)]
    assert len({id(session._vm) for session in sessions}) == 4
    x = _input()
    expected = compiled.run({"x": x})["y"].copy()
    failures: list[str] = []

    def runs(session) -> None:
        for _ in range(50):
            if not np.array_equal(session.run({"x": x})["y"], expected):
                failures.append("differs")

    workers = [threading.Thread(target=runs, args=(session,)) for session in sessions]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not failures
