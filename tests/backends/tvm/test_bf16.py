"""bf16 models on the TVM backend: the vdpbf16ps kernel, the Relax rewrite, the fallback.

The reference is float64 numpy on the same bf16 values (ONNX Runtime's CPU provider
lacks most bf16 kernels). Tolerances, derived rather than picked (``u = 2**-24``, the
float32 unit roundoff; ``mag = |x| @ |W| + |b|``, which bounds every partial sum):

* float32 output: the kernel sums ``K`` exact products in float32 and adds the bias, so
  ``|y - ref| <= (K + 2) u mag`` (the classical bound for a float32 sum);
* bf16 output: that value rounded once to bf16 (8 significant bits, to nearest even: at
  most ``2**-8`` of it), so ``|y - ref| <= 2**-8 |ref| + 2 (K + 2) u mag``;
* TVM's own bf16 path (the fallback) rounds the matmul to bf16 before the bias add
  rounds again: two roundings of values at most ``mag``, ``|y - ref| <= 2**-7 mag``.
"""

from __future__ import annotations

import logging
import math
import re

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

tvm = pytest.importorskip("tvm")

from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.backends.tvm import import_onnx, targets  # noqa: E402
from rewriter.backends.tvm.kernels import bf16_matmul as kernel  # noqa: E402
from rewriter.backends.tvm.relax_passes import bf16_matmul, legalize_bf16_norms  # noqa: E402

BF16 = ml_dtypes.bfloat16
U = 2.0**-24  # float32 unit roundoff


needs_bf16 = pytest.mark.requires_cpu("avx512_bf16")


def bf16_tensor(array: np.ndarray, name: str) -> onnx.TensorProto:
    return helper.make_tensor(
        name, TensorProto.BFLOAT16, array.shape, array.view(np.uint16).tobytes(), raw=True
    )


def dense(
    rows: int = 32, k: int = 64, n: int = 48, *, bias: bool = True, gemm: bool = False
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``x[1, rows, k] @ W[k, n] (+ b)`` in bf16 (``gemm``: ``Gemm(x[rows, k], W^T, b, transB=1)``)."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(BF16)
    b = rng.standard_normal(n).astype(BF16)
    shape = [rows, k] if gemm else [1, rows, k]
    if gemm:
        nodes = [helper.make_node("Gemm", ["x", "wt", "b"], ["y"], transB=1)]
        inits = [bf16_tensor(np.ascontiguousarray(weight.T), "wt"), bf16_tensor(b, "b")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h" if bias else "y"])]
        inits = [bf16_tensor(weight, "w")]
        if bias:
            nodes.append(helper.make_node("Add", ["h", "b"], ["y"]))
            inits.append(bf16_tensor(b, "b"))
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, shape)],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [*shape[:-1], n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    x = rng.standard_normal(shape).astype(BF16)
    return model, {"x": x, "w": weight, "b": b if (bias or gemm) else np.zeros(n, BF16)}


def reference(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``x @ w + b`` in float64 from the bf16 values, and ``mag = |x| @ |w| + |b|``."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    b64 = np.zeros(w.shape[1]) if b is None else b.astype(np.float64)
    return x64 @ w64 + b64, np.abs(x64) @ np.abs(w64) + np.abs(b64)


def kernel_bound(ref: np.ndarray, mag: np.ndarray, k: int, out_dtype: str) -> np.ndarray:
    accumulation = (k + 2) * U * mag
    return accumulation if out_dtype == "float32" else 2.0**-8 * np.abs(ref) + 2 * accumulation


def kernel_names(module: tvm.IRModule) -> list[str]:
    return [gv.name_hint for gv in module.get_global_vars()]


def bindings(module: tvm.IRModule) -> list[tuple[str, list[object]]]:
    """``(op or call_tir callee, constant arguments as numpy)`` of each binding of main."""
    found = []
    for block in module["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            args = list(call.args[1].fields) if call.op.name == "relax.call_tir" else call.args
            name = call.args[0].name_hint if call.op.name == "relax.call_tir" else call.op.name
            constants = [
                arg.value.numpy() for arg in args if isinstance(arg, tvm.ir.expr.GenericConst)
            ]
            found.append((name, constants))
    return found


# The packing (no TVM build)


def test_packed_layout():
    weight = np.arange(6 * 32).reshape(6, 32)
    packed = bf16_matmul.pack_weight(weight)
    assert packed.shape == (2, 3, 16, 2)
    for k, n in [(0, 0), (5, 31), (3, 17), (4, 2)]:
        assert packed[n // 16, k // 2, n % 16, k % 2] == weight[k, n]


def test_packed_layout_pads_ragged_n_with_zeros():
    weight = np.arange(1, 6 * 40 + 1).reshape(6, 40).astype(BF16)  # no zero of its own
    packed = bf16_matmul.pack_weight(weight)
    assert packed.shape == (3, 3, 16, 2) and packed.dtype == BF16
    for k, n in [(0, 0), (5, 39), (3, 32), (4, 17)]:
        assert packed[n // 16, k // 2, n % 16, k % 2] == weight[k, n]
    assert not packed[2, :, 8:, :].astype(np.float32).any()  # columns 40..47


# The kernel


@pytest.mark.parametrize(
    "n, bias, out_dtype",
    [(48, True, "bfloat16"), (48, False, "float32"), (48, True, "float32"), (40, True, "bfloat16")],
)
def test_kernel_uses_vdpbf16ps_on_zmm(n, bias, out_dtype):
    target = targets.resolve("avx512")
    func = kernel.bf16_matmul(6, 64, n, bias=bias, out_dtype=out_dtype, target=target)
    asm = tvm.compile(func, target=target).mod.inspect_source("asm")
    assert "vdpbf16ps" in asm and "zmm" in asm


@tvm.instrument.pass_instrument
class KeepVectorized:
    """Keeps the module as TVM's ``VectorizeLoop`` leaves it."""

    def __init__(self) -> None:
        self.mod: tvm.IRModule | None = None

    def run_after_pass(self, mod: tvm.IRModule, info: tvm.transform.PassInfo) -> None:
        if info.name.endswith("VectorizeLoop"):
            self.mod = mod


@pytest.mark.parametrize("n, vector", [(48, [True]), (40, [True, False]), (1000, [True, False])])
def test_epilogue_stores_whole_groups_as_vectors(n, vector):
    """A ragged N adds one scalar store (the partial group); the whole groups stay vectors."""
    target = targets.resolve("avx512")
    keep = KeepVectorized()
    func = kernel.bf16_matmul(8, 64, n, bias=True, out_dtype="bfloat16", target=target)
    with tvm.transform.PassContext(instruments=[keep]):
        tvm.compile(func, target=target)
    assert keep.mod is not None
    # The stores to Y, in order: a vector store writes a slice, Y[i:i + 16].
    stores = re.findall(r"^\s*Y\w*\[(.*?)\] = ", keep.mod["main"].script(), re.M)
    assert [":" in index for index in stores] == vector


@needs_bf16
@pytest.mark.parametrize(
    "m, k, n, bias, out_dtype",
    [
        (6, 64, 48, True, "bfloat16"),  # row tile 6, channel tile 3 x 16: not the defaults
        (16, 96, 32, False, "float32"),
        (8, 384, 64, True, "float32"),
        (8, 64, 40, True, "bfloat16"),  # ragged N: the last group of 16 is half padding
        (20, 32, 1000, False, "float32"),  # 4 row tiles of 5 x 21 channel tiles, the last 8 wide
    ],
)
def test_kernel_agrees_with_float_reference(m, k, n, bias, out_dtype):
    target = targets.resolve("avx512")
    lib = tvm.compile(
        kernel.bf16_matmul(m, k, n, bias=bias, out_dtype=out_dtype, target=target), target=target
    )
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(BF16)
    weight = rng.standard_normal((k, n)).astype(BF16)
    b = rng.standard_normal(n).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((m, n), BF16 if out_dtype == "bfloat16" else np.float32))
    args = [a, bf16_matmul.pack_weight(weight), *([b] if bias else [])]
    lib(*[tvm.runtime.tensor(arg) for arg in args], y)
    ref, mag = reference(a, weight, b.astype(BF16) if bias else None)
    if bias:  # b is float32 here, not bf16: the reference takes it as it is
        ref, mag = ref - b.astype(BF16) + b, mag - np.abs(b.astype(BF16)) + np.abs(b)
    error = np.abs(y.numpy().astype(np.float64) - ref)
    assert np.all(error <= kernel_bound(ref, mag, k, out_dtype))


def test_kernel_refuses_targets_without_bf16_and_odd_k():
    assert not kernel.supported(targets.resolve("avx2"))
    assert kernel.supported(targets.resolve("avx512"))
    with pytest.raises(ValueError, match="avx512bf16"):
        kernel.bf16_matmul(
            4, 16, 16, bias=False, out_dtype="float32", target=targets.resolve("avx2")
        )
    with pytest.raises(ValueError, match="k % 2"):
        kernel.bf16_matmul(
            4, 15, 16, bias=False, out_dtype="float32", target=targets.resolve("avx512")
        )


# The Relax rewrite


def rewritten(model: onnx.ModelProto) -> tuple[tvm.IRModule, dict[str, object]]:
    target = targets.resolve("avx512")
    return bf16_matmul.rewrite(import_onnx.import_onnx(model, target=target), target)


@pytest.mark.parametrize(
    "build, bias_fused",
    [(lambda: dense(), 1), (lambda: dense(bias=False), 0), (lambda: dense(gemm=True), 1)],
)
def test_rewrite_calls_the_kernel(build, bias_fused):
    model, data = build()
    module, stats = rewritten(model)
    assert stats == {
        "bf16_matmuls": 1,
        "bias_fused": bias_fused,
        "kernel": "vdpbf16ps",
        "skipped": [],
    }
    assert kernel_names(module).count(bf16_matmul.KERNEL_NAME) == 1
    found = bindings(module)
    names = [name for name, _ in found]
    # The N-D activation is flattened to [M, K] around the kernel; nothing else is left.
    flatten = ["relax.reshape"] if data["x"].ndim > 2 else []
    assert names == [*flatten, bf16_matmul.KERNEL_NAME, *flatten]
    constants = found[len(flatten)][1]
    np.testing.assert_array_equal(constants[0], bf16_matmul.pack_weight(data["w"]))
    if bias_fused:
        np.testing.assert_array_equal(constants[1], data["b"].astype(np.float32))
    assert len(constants) == 1 + bias_fused
    again, stats = bf16_matmul.rewrite(module, targets.resolve("avx512"))
    assert stats["bf16_matmuls"] == 0 and again.same_as(module)


def test_odd_k_keeps_tvm_path_and_says_why():
    module, stats = rewritten(dense(k=63, n=48)[0])
    assert stats["bf16_matmuls"] == 0
    assert stats["skipped"] == ["K=63, N=48: the kernel needs K % 2 == 0"]
    assert bf16_matmul.KERNEL_NAME not in kernel_names(module)
    assert "R.matmul" in module["main"].script()


@pytest.mark.parametrize("n", [40, 1000])
def test_ragged_n_calls_the_kernel(n):
    """N not a multiple of 16: the weight is packed zero-padded, the kernel writes [M, N]."""
    model, data = dense(rows=4, k=32, n=n)
    module, stats = rewritten(model)
    assert stats == {"bf16_matmuls": 1, "bias_fused": 1, "kernel": "vdpbf16ps", "skipped": []}
    names = [name for name, _ in bindings(module)]
    assert names == ["relax.reshape", bf16_matmul.KERNEL_NAME, "relax.reshape"]
    packed = bindings(module)[1][1][0]
    assert packed.shape == (-(-n // 16), 16, 16, 2)
    np.testing.assert_array_equal(packed, bf16_matmul.pack_weight(data["w"]))


# Compiled models


@needs_bf16
@pytest.mark.parametrize("gemm", [False, True])
def test_compiled_model_agrees_with_float_reference(gemm, caplog):
    model, data = dense(gemm=gemm)
    with caplog.at_level(logging.INFO, logger=bf16_matmul.__name__):
        got = backend.compile(model, "avx512").run({"x": data["x"]})["y"]
    assert (
        "1 bf16 matmuls run the vdpbf16ps kernel (1 with their bias folded in)" in caplog.messages
    )
    ref, mag = reference(data["x"].reshape(-1, 64), data["w"], data["b"])
    error = np.abs(got.reshape(ref.shape).astype(np.float64) - ref)
    assert np.all(error <= kernel_bound(ref, mag, 64, "bfloat16"))


@needs_bf16
@pytest.mark.parametrize("n", [40, 1000])
def test_compiled_ragged_n_agrees_with_float_reference(n, caplog):
    model, data = dense(rows=4, k=32, n=n)
    with caplog.at_level(logging.INFO, logger=bf16_matmul.__name__):
        got = backend.compile(model, "avx512").run({"x": data["x"]})["y"]
    assert (
        "1 bf16 matmuls run the vdpbf16ps kernel (1 with their bias folded in)" in caplog.messages
    )
    assert got.shape == (1, 4, n)
    ref, mag = reference(data["x"].reshape(-1, 32), data["w"], data["b"])
    error = np.abs(got.reshape(ref.shape).astype(np.float64) - ref)
    assert np.all(error <= kernel_bound(ref, mag, 32, "bfloat16"))


@pytest.mark.parametrize("k, n", [(64, 48), (63, 48)])
def test_fallback_compiles_and_agrees(k, n, require_cpu):
    """Targets without AVX512-BF16 (and an odd K on avx512) keep TVM's bf16 path."""
    model, data = dense(k=k, n=n)
    target = "avx2" if k % 2 == 0 else "avx512"
    if target == "avx512":
        require_cpu("avx512_bf16")
    got = backend.compile(model, target).run({"x": data["x"]})["y"]
    ref, mag = reference(data["x"].reshape(-1, k), data["w"], data["b"])
    error = np.abs(got.reshape(ref.shape).astype(np.float64) - ref)
    assert np.all(error <= 2.0**-7 * mag)


def test_bf16_layer_norm_compiles():
    """TVM legalizes no bf16 layer_norm: it is computed in float32 and rounded once."""
    rng = np.random.default_rng(0)
    scale, shift = rng.standard_normal(64).astype(BF16), rng.standard_normal(64).astype(BF16)
    graph = helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)],
        "ln",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [4, 64])],
        [bf16_tensor(scale, "g"), bf16_tensor(shift, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    module, stats = legalize_bf16_norms.upcast(
        import_onnx.import_onnx(model, target=targets.resolve("avx2"))
    )
    assert stats["bf16_norms_upcast"] == 1
    x = (rng.standard_normal((4, 64)) * 3 + 1).astype(BF16)
    got = backend.compile(model, "avx2").run({"x": x})["y"].astype(np.float64)
    x64 = x.astype(np.float64)
    normal = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    ref = normal * scale.astype(np.float64) + shift.astype(np.float64)
    # One bf16 rounding (2**-8 relative) of a float32 result; float32's own error in the
    # mean, variance and products is ~1e-6 of the row's scale (|ref| <= |g| |normal| + |b|).
    magnitude = np.abs(normal * scale.astype(np.float64)) + np.abs(shift.astype(np.float64))
    assert np.all(np.abs(got - ref) <= 2.0**-8 * np.abs(ref) + 1e-5 * magnitude)


def test_bf16_erf_is_computed_in_float32():
    """GELU's erf in bf16: computed in float32 (TVM's fast polynomial) and rounded once."""
    graph = helper.make_graph(
        [helper.make_node("Erf", ["x"], ["y"])],
        "erf",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [4, 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    _, stats = legalize_bf16_norms.upcast(
        import_onnx.import_onnx(model, target=targets.resolve("avx2"))
    )
    assert stats["bf16_activations_upcast"] == 1
    x = (np.random.default_rng(0).standard_normal((4, 64)) * 2).astype(BF16)
    got = backend.compile(model, "avx2").run({"x": x})["y"].astype(np.float64)
    ref = np.vectorize(math.erf)(x.astype(np.float64))
    # One bf16 rounding (2**-8 relative) of the float32 polynomial (error ~1e-7 absolute).
    assert np.all(np.abs(got - ref) <= 2.0**-8 * np.abs(ref) + 1e-6)
