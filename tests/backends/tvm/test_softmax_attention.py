"""The fused exact softmax-attention kernel and the fusion of ``TwoPassSoftmax`` attention.

The kernel is checked against numpy (float64), built for static and for symbolic sizes,
on key counts that are not whole vectors (fewer than one too), broadcast masks, ragged
query tiles and the vector widths of each CPU target. ``prepare`` fuses every static
float32 ``MatMul(TwoPassSoftmax(...), V)`` of the attention forms the exporters emit and
of real exports into one ``SoftmaxAttention`` node; the compiled models call the kernel
and agree with ONNX Runtime on the original models, at fixed and at symbolic lengths. A symbolic head
dimension gets the three kernels of before; a float64 softmax and
``fuse_attention=False`` stay unfused.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from rewriter import io, verify  # noqa: E402
from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.backends.tvm import import_onnx, parallel_cost  # noqa: E402
from rewriter.backends.tvm.kernels.softmax_attention import (  # noqa: E402
    ROWS,
    softmax_attention,
)
from rewriter.backends.tvm.ops.softmax_attention import KERNEL_NAME  # noqa: E402
from rewriter.backends.tvm.targets import resolve  # noqa: E402
from rewriter.registry import create_pass  # noqa: E402
from tests import attention_models  # noqa: E402

AVX512 = resolve("avx512")
TOLERANCE = 1e-5  # of the output's scale, float32 kernel vs float64 numpy
FUSED = "ai.rewriter::SoftmaxAttention"


def reference(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, scale: float
) -> np.ndarray:
    """``softmax(scale QKᵀ + mask) V`` in float64; a row masked everywhere gives 0."""
    logits = q.astype(np.float64) @ np.swapaxes(k, -1, -2).astype(np.float64) * scale
    if mask is not None:
        logits = logits + mask
    top = logits.max(-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        e = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    probs = e / np.where(e.sum(-1, keepdims=True) > 0, e.sum(-1, keepdims=True), 1.0)
    return probs @ v.astype(np.float64)


def run_kernel(
    target: tvm.target.Target,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray | None,
    *,
    scale: float,
    symbolic: bool = False,
) -> np.ndarray:
    """Lay out the inputs as the lowering does (Kᵀ, no padding), build with our TIR
    pipeline (``symbolic``: for any batch·heads, query and key count), run."""
    bh, n, d = q.shape
    m, dv = v.shape[1:]
    args = [q, np.swapaxes(k, 1, 2), v]
    heads = rows = 1
    if mask is not None:
        heads, rows = mask.shape[:2]
        args.append(mask)
    sizes: dict[str, object] = {"batch_heads": bh, "q_len": n, "k_len": m}
    if symbolic:
        sizes = {name: tvm.tirx.Var(name, "int64") for name in sizes}
    func = softmax_attention(
        **sizes,  # type: ignore[arg-type]
        head_dim=d,
        target=target,
        has_mask=mask is not None,
        value_dim=dv,
        mask_heads=sizes["batch_heads"] if heads > 1 else 1,  # type: ignore[arg-type]
        mask_rows=sizes["q_len"] if rows > 1 else 1,  # type: ignore[arg-type]
        scale=scale,
    )
    kernel = tvm.compile(func, target=target, tir_pipeline=parallel_cost.pipeline_name())
    out = tvm.runtime.tensor(np.full((bh, n, dv), np.nan, np.float32))
    kernel(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    return out.numpy()


def inputs(bh: int, n: int, m: int, d: int, dv: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal(shape).astype(np.float32) * 1.5
        for shape in ((bh, n, d), (bh, m, d), (bh, m, dv))
    ]


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= TOLERANCE * np.abs(expected).max()


@pytest.mark.parametrize("symbolic", [False, True], ids=["static", "symbolic"])
@pytest.mark.parametrize(
    ("bh", "n", "m", "d", "dv"),
    # whole vectors of keys, a tail after whole blocks, fewer keys than a vector (one),
    # query rows that are not a multiple of ROWS, fewer rows than a tile, a long row of
    # keys in L2
    [(2, 8, 16, 4, 4), (3, 13, 53, 16, 24), (1, ROWS - 1, 1, 8, 8), (2, 9, 300, 64, 32)],
)
def test_kernel_matches_numpy_without_mask(
    bh: int, n: int, m: int, d: int, dv: int, symbolic: bool
) -> None:
    q, k, v = inputs(bh, n, m, d, dv)
    scale = 1.0 / math.sqrt(d)
    got = run_kernel(AVX512, q, k, v, None, scale=scale, symbolic=symbolic)
    assert_close(got, reference(q, k, v, None, scale))


@pytest.mark.parametrize("layout", ["per_head_rows", "per_row", "shared_keys"])
def test_masks_broadcast_and_masked_keys_weigh_nothing(layout: str) -> None:
    bh, n, m, d, dv = 2, 9, 37, 8, 8
    q, k, v = inputs(bh, n, m, d, dv, seed=1)
    rng = np.random.default_rng(2)
    shape = {"per_head_rows": (bh, n, m), "per_row": (1, n, m), "shared_keys": (1, 1, m)}[layout]
    hidden = rng.random(shape) < 0.3
    hidden[..., np.arange(m) % 6 == 0] = True  # hidden everywhere, with huge values in V
    v[:, np.arange(m) % 6 == 0] = 1e6
    mask = np.where(hidden, -np.inf, rng.standard_normal(shape)).astype(np.float32)
    mask[..., 1] = np.where(hidden[..., 1], np.finfo(np.float32).min, mask[..., 1])
    got = run_kernel(AVX512, q, k, v, mask, scale=0.5)
    assert_close(got, reference(q, k, v, mask, 0.5))
    symbolic = run_kernel(AVX512, q, k, v, mask, scale=0.5, symbolic=True)
    assert_close(symbolic, reference(q, k, v, mask, 0.5))


def test_a_row_masked_everywhere_gives_zeros() -> None:
    # As the sdpa exports' Where(IsNaN(p), 0, p) says; the other rows are unaffected.
    q, k, v = inputs(2, 6, 20, 8, 8, seed=5)
    mask = np.zeros((2, 6, 20), np.float32)
    mask[1, 4] = -np.inf
    got = run_kernel(AVX512, q, k, v, mask, scale=0.5)
    assert not got[1, 4].any()
    assert_close(got, reference(q, k, v, mask, 0.5))


def test_large_logits_do_not_overflow() -> None:
    # Scores of thousands: the row maximum is subtracted before the exponential.
    # float32 scores of thousands are off by ~1e-4 whoever computes them, hence 1e-3.
    q, k, v = inputs(1, 5, 40, 4, 4, seed=4)
    got = run_kernel(AVX512, q * 300, k, v, None, scale=1.0)
    expected = reference(q * 300, k, v, None, 1.0)
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()


@pytest.mark.parametrize("target_name", ["llvm", "avx2"])
def test_kernel_other_vector_widths(target_name: str, require_cpu: Callable[..., None]) -> None:
    if target_name == "avx2":
        require_cpu("avx2")
    q, k, v = inputs(2, 7, 21, 8, 12, seed=3)
    mask = np.where(np.arange(21) % 5 == 0, -np.inf, 0.25).astype(np.float32)[None, None]
    mask = np.broadcast_to(mask, (1, 7, 21)).copy()
    got = run_kernel(resolve(target_name), q, k, v, mask, scale=0.5)
    assert_close(got, reference(q, k, v, mask, 0.5))


def two_pass(model: ir.Model) -> ir.Model:
    assert create_pass("two-pass-softmax")(model).stats["softmax_replaced"] >= 1
    return model


def fused_nodes(proto: object) -> list[str]:
    return [n.op_type for n in proto.graph.node if n.op_type == FUSED]  # type: ignore[attr-defined]


FUSED_FORMS = sorted(set(attention_models.FORMS) - {"scale_in_q_boolean_mask_cast"})


@pytest.mark.parametrize("form", FUSED_FORMS)
def test_each_attention_form_compiles_to_the_kernel_and_agrees(form: str) -> None:
    model = attention_models.attention_model(form)
    feeds = attention_models.feeds(form)
    expected = verify.run(ir.serde.serialize_model(model).SerializeToString(), feeds)["y"]
    proto = ir.serde.serialize_model(two_pass(model))
    assert fused_nodes(import_onnx.prepare(proto)) == [FUSED]
    names = kernels(proto)
    assert KERNEL_NAME in names
    assert not any(name.startswith("rewriter_two_pass") for name in names)
    got = backend.compile(proto, target="avx512").run(feeds)["y"]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def kernels(proto: object) -> list[str]:
    mod = import_onnx.import_onnx(proto, target=AVX512)
    return sorted({gv.name_hint.rstrip("0123456789") for gv in mod.get_global_vars()})


def test_what_stays_unfused() -> None:
    # A softmax in float64 (Cast around it): the kernel is float32, so not fused.
    double = ir.serde.serialize_model(
        two_pass(attention_models.attention_model("scale_in_q_boolean_mask_cast"))
    )
    assert fused_nodes(import_onnx.prepare(double)) == []
    # fuse_attention=False: the three kernels, as before.
    proto = ir.serde.serialize_model(
        two_pass(attention_models.attention_model("div_transpose_additive"))
    )
    assert fused_nodes(import_onnx.prepare(proto, fuse_attention=False)) == []


def resized(feeds: dict[str, np.ndarray], name: str, axis: int, size: int) -> dict[str, np.ndarray]:
    shape = list(feeds[name].shape)
    shape[axis] = size
    return {**feeds, name: np.ascontiguousarray(np.resize(feeds[name], shape))}


def test_symbolic_lengths_get_the_kernel_and_agree_at_any_length() -> None:
    model = two_pass(attention_models.attention_model("div_transpose_additive"))
    model.graph.inputs[0].shape = ir.Shape([2, 2, "n", 4])
    proto = ir.serde.serialize_model(model)
    assert KERNEL_NAME in kernels(proto)
    compiled = backend.compile(proto, target="avx512")
    for n in (1, 3, 8, 13):
        feeds = resized(attention_models.feeds("div_transpose_additive"), "q", 2, n)
        expected = verify.run(proto.SerializeToString(), feeds)["y"]
        got = compiled.run(feeds)["y"]
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_a_symbolic_head_dimension_gets_three_kernels() -> None:
    # The kernel is built for static head dimensions; the two matmuls and our softmax
    # kernel (the graph's own computation) take any.
    model = two_pass(attention_models.attention_model("div_transpose_additive"))
    for value in model.graph.inputs[:3]:
        value.shape = ir.Shape([2, 2, 8, "d"])
    proto = ir.serde.serialize_model(model)
    assert fused_nodes(import_onnx.prepare(proto)) == [FUSED]
    names = kernels(proto)
    assert KERNEL_NAME not in names
    assert any(name.startswith("rewriter_two_pass") for name in names)
    feeds = attention_models.feeds("div_transpose_additive")
    expected = verify.run(proto.SerializeToString(), feeds)["y"]
    got = backend.compile(proto, target="avx512").run(feeds)["y"]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def _mask_of_a_computed_length() -> onnx.ModelProto:
    """Attention over a convolution's frames, ``(samples - 10) // 5 + 1``, with an additive
    mask over positions counted to ``(samples - 10) / 5 + 1`` (ONNX's truncating Div, as
    wav2vec2's code computes its frame count). The convolution's input is a Reshape that
    the window search does not follow, so nothing bounds the samples from below."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Reshape", ["x", "signal_shape"], ["signal"]),
        helper.make_node("Conv", ["signal", "w"], ["frames"], strides=[5]),
        helper.make_node("Transpose", ["frames"], ["by_frame"], perm=[0, 2, 1]),
        helper.make_node("Unsqueeze", ["by_frame", "one_1d"], ["q"]),
        helper.make_node("Transpose", ["q"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["samples"], axis=0),
        helper.make_node("Sub", ["samples", "ten"], ["reach"]),
        helper.make_node("Div", ["reach", "five"], ["steps"]),
        helper.make_node("Add", ["steps", "one"], ["count"]),
        helper.make_node("Range", ["zero", "count", "one"], ["positions"]),
        helper.make_node("Cast", ["positions"], ["position_values"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["position_values", "slope"], ["bias"]),
        helper.make_node("Add", ["scaled", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "q"], ["y"]),
    ]
    constants = {
        "signal_shape": np.array([1, 1, -1], np.int64),
        "w": rng.standard_normal((8, 1, 10)).astype(np.float32),
        "one_1d": np.array([1], np.int64),
        "scale": np.array(0.25, np.float32),
        "one": np.array(1, np.int64),
        "ten": np.array(10, np.int64),
        "five": np.array(5, np.int64),
        "zero": np.array(0, np.int64),
        "slope": np.array(-0.1, np.float32),
    }
    graph = helper.make_graph(
        nodes,
        "computed_mask",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "samples"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_mask_sized_by_a_computed_length_gets_three_kernels_and_agrees() -> None:
    # The kernel cannot prove the mask fits the keys, nor TVM size their sum: the three
    # kernels run, the mask cast (checked at run time) to the scores' shape.
    proto = ir.serde.serialize_model(two_pass(ir.serde.deserialize_model(_mask_of_a_computed_length())))
    assert fused_nodes(import_onnx.prepare(proto)) == [FUSED]
    names = kernels(proto)
    assert KERNEL_NAME not in names
    assert any(name.startswith("rewriter_two_pass") for name in names)
    compiled = backend.compile(proto, target="avx512")
    for samples in (10, 37, 64):
        feeds = {"x": np.random.default_rng(samples).standard_normal((1, samples)).astype(np.float32)}
        expected = verify.run(proto.SerializeToString(), feeds)["y"]
        got = compiled.run(feeds)["y"]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize(
    "name",
    # additive padding mask (TorchScript), sdpa with its NaN guard (dynamo), grouped
    # heads with a causal mask (dynamo), merged heads (nn.MultiheadAttention)
    ["bert_eager_torchscript", "bert_sdpa_dynamo", "llama_sdpa_dynamo", "mha_torchscript"],
)
def test_real_exports_fuse_every_attention_and_agree(real_model, tmp_path, name: str) -> None:
    model = real_model(name)
    result = create_pass("two-pass-softmax")(io.load(model.path))
    path = tmp_path / f"{name}_tp.onnx"
    io.save(result.model, path)
    dims = backend.shape_dims(path, model.inputs)
    prepared = import_onnx.prepare(path, dims=dims)
    assert len(fused_nodes(prepared)) >= 1
    assert not [n for n in prepared.graph.node if n.op_type.endswith("TwoPassSoftmax")]
    expected = verify.run(model.path, model.inputs)
    for fixed in (dims, None):  # the kernel at fixed and at symbolic dims
        compiled = backend.compile(path, "avx512", dims=fixed)
        got = compiled.run(model.inputs)
        for key, value in expected.items():
            assert np.abs(got[key] - value).max() <= 1e-4 * np.abs(value).max(), key
    assert KERNEL_NAME in kernels(import_onnx.prepare(path))


def _mask_expanded_to_the_batch() -> onnx.ModelProto:
    """Attention at a symbolic batch whose additive mask is a constant causal pattern
    expanded to the batch before the ``Where`` that makes it additive (as dynamo exports a
    mask the model builds from sizes: AST's)."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Shape", ["q"], ["shape"], start=0, end=1),
        helper.make_node("Concat", ["shape", "rest"], ["mask_shape"], axis=0),
        helper.make_node("Expand", ["causal", "mask_shape"], ["keep"]),
        helper.make_node("Where", ["keep", "zero", "lowest"], ["mask"]),
        helper.make_node("Add", ["scaled", "mask"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["y"]),
    ]
    constants = {
        "scale": np.array(0.5, np.float32),
        "rest": np.array([1, 8, 8], np.int64),
        "causal": np.tril(np.ones((8, 8), dtype=bool))[None, None],
        "zero": np.array(0.0, np.float32),
        "lowest": np.array(np.finfo(np.float32).min, np.float32),
    }
    graph = helper.make_graph(
        nodes,
        "expanded_mask",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 2, 8, 4]) for n in "qkv"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_mask_expanded_to_a_symbolic_batch_is_read_once_for_all() -> None:
    # The kernel reads the mask before the batch's expansion (one [1, 8, 8] constant),
    # where it read a [2 x batch, 8, 8] copy made on every call.
    proto = ir.serde.serialize_model(two_pass(ir.serde.deserialize_model(_mask_expanded_to_the_batch())))
    mod = import_onnx.import_onnx(proto, target=AVX512)
    masks = [
        binding.value.args[1].fields[3].ty.shape
        for block in mod["main"].body.blocks
        for binding in block.bindings
        if KERNEL_NAME in str(getattr(binding.value, "args", [""])[0])
    ]
    assert [[int(size) for size in mask] for mask in masks] == [[1, 8, 8]], masks
    compiled = backend.compile(proto, target="avx512")
    for batch in (1, 3):
        rng = np.random.default_rng(batch)
        feeds = {n: rng.standard_normal((batch, 2, 8, 4)).astype(np.float32) for n in "qkv"}
        expected = verify.run(proto.SerializeToString(), feeds)["y"]
        assert_close(compiled.run(feeds)["y"], expected)
