"""Tests of the TIR softmax kernels (two-pass, Dukhan & Ablavatski 2020, and three-pass).

Numbers are compared with numpy in float64 and with ``rewriter.passes.two_pass_softmax.math.reference_softmax``;
edge rows with the ONNX Softmax semantics (checked against ONNX Runtime as well).
Kernels are compiled once per configuration (a few seconds each) and cached here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import tirx  # noqa: E402

from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.backends.tvm import targets  # noqa: E402
from rewriter.backends.tvm.kernels import softmax  # noqa: E402
from rewriter.backends.tvm.kernels.common import simd_plan  # noqa: E402
from rewriter.backends.tvm.kernels.softmax import three_pass_softmax, two_pass_softmax  # noqa: E402
from rewriter.passes.two_pass_softmax.math import reference_softmax  # noqa: E402

AVX512 = targets.resolve("avx512")
SAPPHIRE_RAPIDS = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
GENERIC = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})
CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
KERNELS = {"two": two_pass_softmax, "three": three_pass_softmax}
# float32 kernels: polynomial (2e-7), t and Horner rounding, and a sum of up to a few
# thousand terms per lane; 2e-6 of the row's largest output leaves a margin of about 5x.
SOFTMAX_TOL = 2e-6
# log-softmax is x - (N ln2 + log M): a difference of two float32 values, so its error is
# a few ulp of the row's largest |x| or |y|.
LOG_TOL_ULPS = 4

_COMPILED: dict[tuple, object] = {}
# One kernel with symbolic rows and cols serves most shapes, to keep the compiles few.
ROWS, COLS = tirx.Var("rows", "int64"), tirx.Var("cols", "int64")


def _build(
    kind: str,
    rows: int | tirx.Var,
    cols: int | tirx.Var,
    target: tvm.target.Target,
    log: bool = False,
    dtype: str = "float32",
) -> Callable[..., None]:
    key = (kind, str(rows), str(cols), str(target), log, dtype)
    if key not in _COMPILED:
        func = KERNELS[kind](rows, cols, dtype=dtype, log=log, target=target)
        _COMPILED[key] = tvm.compile(func, target=target)
    return _COMPILED[key]


def _run(
    kind: str,
    x: np.ndarray,
    target: tvm.target.Target = AVX512,
    log: bool = False,
    rows: int | tirx.Var | None = None,
    cols: int | tirx.Var | None = None,
) -> np.ndarray:
    ex = _build(
        kind,
        x.shape[0] if rows is None else rows,
        x.shape[1] if cols is None else cols,
        target,
        log,
    )
    y = tvm.runtime.tensor(np.zeros_like(x))
    ex(tvm.runtime.tensor(x), y)
    return y.numpy()


def _numpy_softmax(x: np.ndarray, log: bool = False) -> np.ndarray:
    """Three-pass softmax in float64 (max, sum of exp, scale)."""
    xd = x.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        shifted = xd - xd.max(axis=-1, keepdims=True)
        total = np.exp(shifted).sum(axis=-1, keepdims=True)
        return shifted - np.log(total) if log else np.exp(shifted) / total


def _assert_softmax_close(y: np.ndarray, x: np.ndarray) -> None:
    ref = _numpy_softmax(x)
    err = np.abs(y - ref).max(axis=-1) / ref.max(axis=-1)
    assert err.max() <= SOFTMAX_TOL, f"max relative error {err.max():.3g}"
    np.testing.assert_allclose(y, reference_softmax(x), rtol=0, atol=SOFTMAX_TOL)


def _random(rows: int, cols: int, seed: int = 0, scale: float = 4.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * scale).astype(np.float32)


# 1000 = 7 blocks of 128 + 6 vectors + 8 tail elements on AVX512; 37 has no full block.
@pytest.mark.parametrize("kind", ["two", "three"])
def test_softmax_matches_numpy(kind: str) -> None:
    x = _random(5, 1000)
    _assert_softmax_close(_run(kind, x), x)
    x = _random(3, 37)  # no full block of 8 vectors
    _assert_softmax_close(_run(kind, x, rows=ROWS, cols=COLS), x)


@pytest.mark.parametrize("kind", ["two", "three"])
def test_log_softmax_matches_numpy(kind: str) -> None:
    x = _random(5, 1000, seed=1)
    y = _run(kind, x, log=True, rows=ROWS, cols=COLS)
    ref = _numpy_softmax(x, log=True)
    scale = np.maximum(
        np.abs(x).max(axis=-1, keepdims=True), np.abs(ref).max(axis=-1, keepdims=True)
    )
    assert np.all(np.abs(y - ref) <= LOG_TOL_ULPS * np.finfo(np.float32).eps * scale)


def _edge_rows(cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows with inf, NaN, -inf and huge values, and what ONNX Softmax gives for them."""
    nan = np.nan
    base = _random(9, cols, seed=2)
    x = base.copy()
    expected = _numpy_softmax(base)
    x[0, 3] = np.inf
    expected[0] = nan  # +inf anywhere: inf - inf
    x[1, cols - 2] = nan  # in the scalar tail
    expected[1] = nan
    x[2] = -np.inf
    expected[2] = nan  # all -inf: -inf - (-inf)
    x[3, ::3] = -np.inf
    expected[3] = _numpy_softmax(x[3:4])[0]
    x[4] = 0.0
    x[4, :4] = [3e38, 2.5e38, -3e38, 0.0]
    expected[4] = 0.0
    expected[4, 0] = 1.0
    x[5] = -np.inf
    x[5, :4] = [-3e38, -2.5e38, -np.inf, -3.4e38]
    expected[5] = 0.0
    expected[5, 1] = 1.0
    x[6] = base[6] + 1e4  # outside the float32 fast path: recomputed in float64
    expected[6] = _numpy_softmax(x[6:7])[0]
    x[7] = np.float32(np.finfo(np.float32).max)
    expected[7] = 1.0 / cols
    x[8, 5] = -np.inf
    expected[8] = _numpy_softmax(x[8:9])[0]
    return x, expected


# Static shapes this small keep e**x in Y during pass 1; symbolic ones recompute it.
@pytest.mark.parametrize(("kind", "symbolic"), [("two", True), ("two", False), ("three", True)])
def test_edge_cases_follow_onnx(kind: str, symbolic: bool) -> None:
    x, expected = _edge_rows(200)
    y = _run(kind, x, rows=ROWS, cols=COLS) if symbolic else _run(kind, x)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    np.testing.assert_allclose(y, expected, rtol=0, atol=SOFTMAX_TOL)
    if kind == "two":
        with np.errstate(invalid="ignore", over="ignore"):
            np.testing.assert_allclose(y, reference_softmax(x), rtol=0, atol=SOFTMAX_TOL)


def _assert_matches_edges(y: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    ok = ~np.isnan(expected)
    np.testing.assert_allclose(y[ok], expected[ok], rtol=1e-5, atol=1e-12)


def test_split_segments_for_few_long_rows() -> None:
    assert softmax.split_segments(1, 1 << 26) == softmax.PARALLEL_ITEMS
    assert softmax.split_segments(9, 1 << 17) == 4  # segments of MIN_SEGMENT
    assert softmax.split_segments(1, 1000 * 1000) == 1  # no block-aligned divisor
    assert softmax.split_segments(64, 1 << 20) == 1  # enough rows to share out
    assert softmax.split_segments(ROWS, 1 << 20) == 1  # symbolic


# A row of 2**20 is cut into 32 segments of 32768, short enough to keep e**x in Y;
# with no kept rows (threshold 0), pass 2 recomputes each segment.
@pytest.mark.parametrize(("log", "keep_bytes"), [(False, None), (False, 0), (True, None)])
def test_long_row_split_over_threads(
    log: bool, keep_bytes: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if keep_bytes is not None:
        monkeypatch.setattr(simd_plan, "KEEP_EXP_MAX_ROW_BYTES", keep_bytes)
    x = _random(1, 1 << 20, seed=7)
    func = two_pass_softmax(1, 1 << 20, log=log, target=AVX512)
    assert str(func).count("T.parallel") == 3  # pass 1, merge, pass 2
    y = tvm.runtime.tensor(np.zeros_like(x))
    tvm.compile(func, target=AVX512)(tvm.runtime.tensor(x), y)
    if log:
        ref = _numpy_softmax(x, log=True)
        bound = LOG_TOL_ULPS * np.finfo(np.float32).eps * np.abs(ref).max()
        assert np.abs(y.numpy() - ref).max() <= bound
    else:
        _assert_softmax_close(y.numpy(), x)
        np.testing.assert_allclose(y.numpy(), _numpy_softmax(x), rtol=1e-5)


def test_split_rows_follow_onnx_on_edge_cases() -> None:
    x, expected = _edge_rows(1 << 17)  # 9 rows of 4 segments
    _assert_matches_edges(_run("two", x), expected)


def test_edge_expectations_match_onnxruntime() -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x, expected = _edge_rows(200)
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
        "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    assert onnx is not None
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    np.testing.assert_allclose(y, expected, rtol=0, atol=SOFTMAX_TOL)


@pytest.mark.parametrize("kind", ["two", "three"])
def test_log_edge_cases(kind: str) -> None:
    x, _ = _edge_rows(200)
    y = _run(kind, x, log=True, rows=ROWS, cols=COLS)
    with np.errstate(over="ignore"):  # -3e38 - 3e38 is -inf in float32
        expected = _numpy_softmax(x, log=True).astype(np.float32)
    # -inf inputs give -inf, NaN rows stay NaN, huge rows stay exact (0 and -5e37).
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-5)


def test_symbolic_rows_and_cols() -> None:
    for shape in [(3, 300), (1, 17), (2, 4096)]:
        x = _random(*shape, seed=3)
        _assert_softmax_close(_run("two", x, rows=ROWS, cols=COLS), x)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs_compute_in_float32(dtype: str) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    x = _random(3, 300, seed=5).astype(np_dtype)
    ex = _build("two", 3, 300, AVX512, dtype=dtype)
    y = tvm.runtime.tensor(np.zeros_like(x))
    ex(tvm.runtime.tensor(x), y)
    ref = _numpy_softmax(x.astype(np.float32))
    # One rounding to the output type: half an ulp of 2**-10 (fp16) or 2**-7 (bf16).
    rel = 2.0**-11 if dtype == "float16" else 2.0**-8
    assert np.all(np.abs(y.numpy().astype(np.float64) - ref) <= rel * ref + 1e-7)


def test_relax_call_tir_with_symbolic_rows() -> None:
    relax = pytest.importorskip("tvm.relax")
    n = tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([n, 300], "float32"))
    with bb.function("main", [x]):
        kernel = two_pass_softmax(tirx.Var("rows", "int64"), 300, target=AVX512)
        gvar = bb.add_func(kernel, "two_pass_softmax")
        with bb.dataflow():
            y = bb.emit(relax.call_tir(gvar, [x], relax.TensorType([n, 300], "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=AVX512), tvm.cpu())
    x_np = _random(6, 300, seed=9)
    _assert_softmax_close(vm["main"](tvm.runtime.tensor(x_np)).numpy(), x_np)


def _asm(ex: object) -> str:
    return ex.mod.inspect_source("asm")


def test_avx512_assembly_uses_zmm_and_vscalefps() -> None:
    asm = _asm(_build("two", 5, 1000, AVX512))
    assert "zmm" in asm and "vscalefps" in asm
    calls = re.findall(r"call\w*\s+(\S+)", asm)
    math_calls = [c for c in calls if re.search(r"exp|pow|ldexp|scalbn", c)]
    assert not math_calls, f"calls to libm in the kernel: {math_calls}"


def test_streaming_stores_on_large_outputs(require_cpu: Callable[..., None]) -> None:
    # 64 rows (not split) of 1 MiB (too long to keep e**x in Y): pass 2 uses movdir64b.
    shape = (64, 1 << 18)
    ex = _build("two", *shape, SAPPHIRE_RAPIDS)
    assert "movdir64b" in _asm(ex) and "sfence" in _asm(ex)
    # The portable avx512 preset has no MOVDIR64B (AMD Zen 4 lacks it): plain stores.
    assert "movdir64b" not in _asm(_build("two", *shape, AVX512))
    require_cpu("movdir64b")  # to run the streaming store on
    x = _random(*shape, seed=6)
    _assert_softmax_close(_run("two", x, SAPPHIRE_RAPIDS), x)


@pytest.mark.parametrize(
    ("target", "register", "wider", "feature"),
    [(AVX2, "ymm", "zmm", "avx2"), (GENERIC, "xmm", "ymm", "sse2")],
    ids=["avx2", "generic"],
)
def test_narrower_targets(
    target: tvm.target.Target,
    register: str,
    wider: str,
    feature: str,
    require_cpu: Callable[..., None],
) -> None:
    ex = _build("two", 9, 200, target)
    asm = _asm(ex)
    assert register in asm and wider not in asm and "vscalefps" not in asm
    require_cpu(feature)  # to run the kernel on
    x, expected = _edge_rows(200)
    y = _run("two", x, target=target)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    np.testing.assert_allclose(y, expected, rtol=0, atol=SOFTMAX_TOL)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build CUDA code")
@pytest.mark.parametrize("kind", ["two", "three"])
def test_cuda_source_and_ptx(kind: str, tmp_path: Path) -> None:
    rows = tirx.Var("rows", "int64")
    ex = _build(kind, rows, 1000, CUDA)
    source = ex.mod.imports[0].inspect_source("cuda")
    assert "__shfl_down_sync" in source and "__global__" in source
    cu = tmp_path / f"{kind}.cu"
    cu.write_text(source)
    ptx = tmp_path / f"{kind}.ptx"
    subprocess.run(
        ["nvcc", "-ptx", "-arch=sm_90", str(cu), "-o", str(ptx)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    text = ptx.read_text()
    assert "shfl.sync" in text and "ex2" not in text


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["two", "three"])
def test_cuda_run(kind: str) -> None:
    x, expected = _edge_rows(1000)
    ex = _build(kind, x.shape[0], x.shape[1], CUDA)
    dev = tvm.cuda(0)
    y = tvm.runtime.tensor(np.zeros_like(x), device=dev)
    ex(tvm.runtime.tensor(x, device=dev), y)
    np.testing.assert_array_equal(np.isnan(y.numpy()), np.isnan(expected))
    np.testing.assert_allclose(y.numpy(), expected, rtol=0, atol=SOFTMAX_TOL)
    x = _random(64, 5000, seed=8)
    y = tvm.runtime.tensor(np.zeros_like(x), device=dev)
    _build(kind, 64, 5000, CUDA)(tvm.runtime.tensor(x, device=dev), y)
    _assert_softmax_close(y.numpy(), x)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_float64_ops_are_exact(op: str, caplog: pytest.LogCaptureFixture) -> None:
    """float64 Softmax -> TwoPass(Log)SoftmaxDouble -> Relax ops in double: the float64
    definition to a few ulp (2.2e-16 each), +-inf, NaN and fully masked rows included."""
    import logging

    import onnx_ir as ir

    from rewriter.registry import create_pass
    from tests.helpers import softmax_model, to_proto

    rows = np.array(
        [
            [1.0, 2.0, 3.0, 4.0],
            [-np.inf, 0.0, 1.0, -np.inf],
            [-np.inf, -np.inf, -np.inf, -np.inf],
            [np.inf, 0.0, 1.0, 2.0],
            [1e7, 1e7 + 1.5, 1e7 - 0.25, 1e7 + 3.0],
            [1.7e308, 1.79e308, -1.79e308, 0.0],
            [709.0, 710.0, -745.0, 0.0],
        ]
    )
    model = softmax_model(op, dtype="double", shape="[7, 4]", axis=-1)
    result = create_pass("two-pass-softmax")(model)
    assert [node.op_type for node in ir.traversal.RecursiveGraphIterator(result.model.graph)] == [
        f"TwoPass{op}Double"
    ]
    with caplog.at_level(logging.WARNING, logger="rewriter.backends.tvm.import_onnx"):
        compiled = backend.compile(to_proto(result.model), target="llvm")
    assert "no TVM kernel" not in caplog.text
    got = compiled.run({"x": rows})["y"]
    with np.errstate(all="ignore"):
        shifted = rows - rows.max(-1, keepdims=True)
        total = np.exp(shifted).sum(-1, keepdims=True)
        expected = shifted - np.log(total) if op == "LogSoftmax" else np.exp(shifted) / total
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=1e-15, equal_nan=True)
