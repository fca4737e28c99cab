"""The fused sigmoid-attention TIR kernel and its lowering of ``ai.rewriter::SigmoidAttention``.

The kernel is checked against numpy (float64) on padded keys, broadcast masks and
the vector widths of each CPU target; masked positions must contribute exactly 0. The
rewritten attention graphs compile to ``call_tir`` of the kernel and agree with ONNX
Runtime (max abs err <= 1e-4 of the output's scale); shapes that are not static fall
back to the op's ONNX function body.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import pytest

tvm = pytest.importorskip("tvm")

from rewriter import io, verify  # noqa: E402
from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.backends.tvm import import_onnx  # noqa: E402
from rewriter.backends.tvm.kernels.sigmoid_attention import (  # noqa: E402
    CHUNK_KEYS,
    key_lanes,
    sigmoid_attention,
)
from rewriter.backends.tvm.ops.sigmoid_attention import KERNEL_NAME  # noqa: E402
from rewriter.backends.tvm.targets import resolve  # noqa: E402
from rewriter.registry import create_pass  # noqa: E402
from tests import attention_models  # noqa: E402

AVX512 = resolve("avx512")
GENERIC = resolve("llvm")
FORM_SCALE = 0.5  # every form of attention_models scales the logits by 1/2
TOLERANCE = 1e-5  # of the output's scale, float32 kernel vs float64 numpy


def reference(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, scale: float, bias: float
) -> np.ndarray:
    """``where(mask > -1e4, sigmoid(scale QKᵀ + bias + mask), 0) V`` in float64."""
    logits = q.astype(np.float64) @ np.swapaxes(k, -1, -2).astype(np.float64) * scale + bias
    if mask is None:
        return (1.0 / (1.0 + np.exp(-logits))) @ v.astype(np.float64)
    with np.errstate(over="ignore"):
        probs = 1.0 / (1.0 + np.exp(-(logits + mask)))
    return np.where(mask > -1e4, probs, 0.0) @ v.astype(np.float64)


def run_kernel(
    target: tvm.target.Target,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray | None,
    *,
    scale: float,
    bias: float,
) -> np.ndarray:
    """Pad and lay out the inputs as the lowering does, build and run the kernel."""
    bh, n, d = q.shape
    m, dv = v.shape[1:]
    lanes = key_lanes(target)
    mp = -(-m // lanes) * lanes
    kt = np.zeros((bh, d, mp), np.float32)
    kt[:, :, :m] = np.swapaxes(k, 1, 2)
    vp = np.zeros((bh, mp, dv), np.float32)
    vp[:, :m] = v
    args = [q, kt, vp]
    heads = rows = 1
    if mask is not None:
        heads, rows = mask.shape[:2]
        padded = np.zeros((heads, rows, mp), np.float32)
        padded[:, :, :m] = mask
        args.append(padded)
    func = sigmoid_attention(
        bh,
        n,
        mp,
        d,
        target=target,
        has_mask=mask is not None,
        value_dim=dv,
        mask_heads=heads,
        mask_rows=rows,
        scale=scale,
        bias=bias,
    )
    kernel = tvm.compile(func, target=target)
    out = tvm.runtime.tensor(np.full((bh, n, dv), np.nan, np.float32))
    kernel(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    return out.numpy()


def inputs(bh: int, n: int, m: int, d: int, dv: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal(shape).astype(np.float32) * 1.5
        for shape in ((bh, n, d), (bh, m, d), (bh, m, dv))
    ]


@pytest.mark.parametrize(
    ("bh", "n", "m", "d", "dv"),
    [(2, 8, 8, 4, 4), (3, 13, 53, 16, 24), (1, 6, 70, 64, 64)],
)
def test_kernel_matches_numpy_without_mask(bh: int, n: int, m: int, d: int, dv: int) -> None:
    q, k, v = inputs(bh, n, m, d, dv)
    scale, bias = 1.0 / math.sqrt(d), -math.log(m)
    got = run_kernel(AVX512, q, k, v, None, scale=scale, bias=bias)
    expected = reference(q, k, v, None, scale, bias)
    assert np.abs(got - expected).max() <= TOLERANCE * np.abs(expected).max()


@pytest.mark.parametrize("layout", ["per_head_rows", "shared_keys"])
def test_masked_positions_contribute_exactly_zero(layout: str) -> None:
    bh, n, m, d, dv = 2, 9, 37, 8, 8
    q, k, v = inputs(bh, n, m, d, dv, seed=1)
    rng = np.random.default_rng(2)
    shape = (bh, n, m) if layout == "per_head_rows" else (1, 1, m)
    hidden = rng.random(shape) < 0.3
    always = np.arange(m) % 6 == 0  # hidden in every row, with huge values in V
    hidden[..., always] = True
    if layout == "per_head_rows":
        hidden[0, 3, :] = True  # a row with every key hidden
    mask = np.where(hidden, -np.inf, rng.standard_normal(shape)).astype(np.float32)
    mask[..., 1] = np.where(hidden[..., 1], np.finfo(np.float32).min, mask[..., 1])
    mask[..., 2] = np.where(hidden[..., 2], -1e4, mask[..., 2])  # the threshold is masked
    v_huge = v.copy()
    v_huge[:, always] = 1e30  # any nonzero weight on these keys would show
    scale, bias = 0.35, -math.log(m)
    got = run_kernel(AVX512, q, k, v_huge, mask, scale=scale, bias=bias)
    expected = reference(q, k, v, mask, scale, bias)
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= TOLERANCE * np.abs(expected).max()
    if layout == "per_head_rows":
        assert (got[0, 3] == 0.0).all()


def test_keys_in_several_chunks() -> None:
    # More keys than one chunk (CHUNK_KEYS): the output accumulates across chunks.
    bh, n, m, d, dv = 2, 5, CHUNK_KEYS * 2 + 77, 8, 16
    q, k, v = inputs(bh, n, m, d, dv, seed=5)
    rng = np.random.default_rng(6)
    mask = np.where(rng.random((bh, n, m)) < 0.5, -np.inf, 0.0).astype(np.float32)
    scale, bias = 0.3, -math.log(m)
    got = run_kernel(AVX512, q, k, v, mask, scale=scale, bias=bias)
    expected = reference(q, k, v, mask, scale, bias)
    assert np.abs(got - expected).max() <= TOLERANCE * np.abs(expected).max()


@pytest.mark.parametrize("target_name", ["llvm", "avx2"])
def test_kernel_other_vector_widths(target_name: str, require_cpu: Callable[..., None]) -> None:
    if target_name == "avx2":
        require_cpu("avx2")
    q, k, v = inputs(2, 7, 21, 8, 12, seed=3)
    mask = np.where(np.arange(21) % 5 == 0, -np.inf, 0.25).astype(np.float32)[None, None]
    mask = np.broadcast_to(mask, (1, 7, 21)).copy()
    scale, bias = 0.5, -3.0
    got = run_kernel(resolve(target_name), q, k, v, mask, scale=scale, bias=bias)
    expected = reference(q, k, v, mask, scale, bias)
    assert np.abs(got - expected).max() <= TOLERANCE * np.abs(expected).max()


@pytest.mark.parametrize("target", [AVX512, GENERIC], ids=["avx512", "llvm"])
def test_saturated_logits(target: tvm.target.Target) -> None:
    # Logits far beyond the exponential's range: sigmoid is exactly 1 or 0, no inf/NaN.
    q, k, v = inputs(1, 5, 16, 4, 4, seed=4)
    got = run_kernel(target, q * 300, k, v, None, scale=1.0, bias=0.0)
    with np.errstate(over="ignore"):
        expected = reference(q * 300, k, v, None, 1.0, 0.0)
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= TOLERANCE * np.abs(expected).max()


@pytest.mark.parametrize("form", sorted(attention_models.FORMS))
def test_compiled_rewritten_attention_agrees_with_onnxruntime(form: str) -> None:
    model = attention_models.attention_model(form)
    feeds = attention_models.feeds(form)
    assert create_pass("sigmoid-attention")(model).stats["attention_replaced"] == 1
    proto = ir.serde.serialize_model(model)
    expected = verify.run(proto.SerializeToString(), feeds)["y"]
    mod = import_onnx.import_onnx(proto, target=AVX512)
    kernels = [gv for gv in mod.get_global_vars() if gv.name_hint.startswith(KERNEL_NAME)]
    assert len(kernels) == 1
    assert f"R.call_tir(cls.{kernels[0].name_hint}" in mod.script()
    # The rewrite's "no mask" is a constant 0: the kernel then takes no mask buffer.
    params = [p.name for p in mod[kernels[0]].params]
    assert params == (
        ["Q", "Kt", "V", "Out"]
        if form == "no_mask_reshaped_key"
        else ["Q", "Kt", "V", "Mask", "Out"]
    )
    got = backend.compile(proto, target="avx512").run(feeds)["y"]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    oracle = attention_models.sigmoid_reference(feeds, scale=FORM_SCALE, n=attention_models.N)
    assert np.abs(got - oracle).max() <= 1e-4 * np.abs(oracle).max()


def test_dynamic_shapes_and_gpu_fall_back_to_the_function_body(caplog) -> None:
    model = attention_models.attention_model("div_transpose_additive")
    create_pass("sigmoid-attention")(model)
    proto = ir.serde.serialize_model(model)
    # fuse_attention=False (GPU targets): inlined into standard ops.
    inlined = import_onnx.prepare(proto, fuse_attention=False)
    assert {node.op_type for node in inlined.graph.node} >= {"MatMul", "Sigmoid", "Where"}
    assert not any("SigmoidAttention" in node.op_type for node in inlined.graph.node)
    # A symbolic query length: no static kernel, the body is inlined and the log says so.
    dynamic = ir.serde.deserialize_model(proto)
    dynamic.graph.inputs[0].shape = ir.Shape([2, 2, "n", 4])
    with caplog.at_level(logging.WARNING):
        prepared = import_onnx.prepare(dynamic)
    assert "no fused kernel" in caplog.text
    assert not any("SigmoidAttention" in node.op_type for node in prepared.graph.node)
    # Static: one fused node survives.
    fused = import_onnx.prepare(proto)
    assert [n.op_type for n in fused.graph.node if "Sigmoid" in n.op_type] == [
        "ai.rewriter::SigmoidAttention"
    ]


def test_real_llama_export_uses_the_kernel(real_model, tmp_path) -> None:
    # Grouped heads (repeated before the op) and a causal mask, from a dynamo export.
    model = real_model("llama_sdpa_dynamo")
    result = create_pass("sigmoid-attention", {"max_seq_len": 128})(io.load(model.path))
    assert result.stats["attention_replaced"] >= 1
    path = tmp_path / "llama_sigmoid.onnx"
    io.save(result.model, path)
    expected = verify.run(path, model.inputs)
    dims = backend.shape_dims(path, model.inputs)
    prepared = import_onnx.prepare(path, dims=dims)
    fused = [n for n in prepared.graph.node if n.op_type == "ai.rewriter::SigmoidAttention"]
    assert len(fused) == result.stats["attention_replaced"]
    got = backend.compile(path, "avx512", dims=dims).run(model.inputs)
    for name, value in expected.items():
        assert np.abs(got[name] - value).max() <= 1e-4 * np.abs(value).max()
