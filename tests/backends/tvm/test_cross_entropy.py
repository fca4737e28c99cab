"""The cross-entropy TIR kernels: one pass over the logits, and fused linear + cross-entropy.

Both are checked against numpy in float64 across reductions, ignore_index and class
weights, on shapes that use every part of the schedule (blocks, vectors left, scalar tail;
several token blocks, a padded last vocabulary panel); edge rows (inf, NaN, all -inf, huge
logits) against ONNX Runtime's SoftmaxCrossEntropyLoss; and the assembly for the vector
width of each target. Kernels are compiled once per configuration and cached here.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from rewriter.backends.tvm.kernels import linear_cross_entropy as lce  # noqa: E402
from rewriter.backends.tvm.kernels.cross_entropy import (  # noqa: E402
    LossOptions,
    cross_entropy,
    drop_params,
)
from rewriter.backends.tvm.targets import resolve  # noqa: E402

AVX512 = resolve("avx512")
AVX2 = resolve("avx2")
IGNORE = -100
# float32 kernel vs float64 numpy. A row's loss is (N ln2 - x[y]) + (N ln2_lo + log M):
# a difference of float32 values of magnitude up to max(|x|) + log(cols), with the
# polynomial (2e-7) and a sum of ~cols/16 terms per lane in log M; 8 ulps of that
# magnitude bounds it with a margin of ~3x. Sums and means add per-row errors in float64.
ULPS = 8
EPS32 = float(np.finfo(np.float32).eps)

_COMPILED: dict[tuple, Callable[..., None]] = {}


def _compiled(
    key: tuple, build: Callable[[], object], target: tvm.target.Target
) -> Callable[..., None]:
    if key not in _COMPILED:
        _COMPILED[key] = tvm.compile(build(), target=target)
    return _COMPILED[key]


def reference(
    z: np.ndarray, y: np.ndarray, w: np.ndarray | None, reduction: str, ignore: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ONNX SoftmaxCrossEntropyLoss in float64: ``(loss, log_prob, error bound)``.

    The bound (see ULPS) is per row for ``none``, else of the sum or the mean."""
    zd = z.astype(np.float64)
    shifted = zd - zd.max(axis=1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    kept = np.ones(len(y), bool) if ignore is None else y != ignore
    safe = np.where(kept, y, 0)
    weight = (np.ones(len(y)) if w is None else w[safe].astype(np.float64)) * kept
    per_row = np.where(kept, -log_prob[np.arange(len(y)), safe] * weight, 0.0)
    finite = np.where(np.isfinite(zd), np.abs(zd), 0.0)
    bound = ULPS * EPS32 * (finite.max(axis=1) + np.log(z.shape[1])) * weight
    if reduction == "none":
        return per_row, log_prob, bound
    total = per_row.sum()
    loss = total if reduction == "sum" else total / weight.sum()
    bound_total = bound.sum() if reduction == "sum" else bound.sum() / weight.sum()
    return np.array(loss), log_prob, bound_total + EPS32 * abs(loss)  # + the final rounding


def assert_loss_close(got: np.ndarray, expected: np.ndarray, bound: np.ndarray) -> None:
    error = np.abs(got - expected)
    assert np.all(error <= bound), f"error {error.max():.3g} above the bound {np.min(bound):.3g}"


def _inputs(rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((rows, cols)) * 4).astype(np.float32)
    y = rng.integers(0, cols, rows)
    y[::5] = IGNORE
    return z, y, rng.uniform(0.5, 2.0, cols).astype(np.float32)


def run_cross_entropy(
    z: np.ndarray,
    y: np.ndarray,
    w: np.ndarray | None,
    options: LossOptions,
    *,
    log_prob: bool = False,
    target: tvm.target.Target = AVX512,
) -> tuple[np.ndarray, np.ndarray | None]:
    rows, cols = z.shape
    kernel = _compiled(
        ("ce", rows, cols, options, log_prob, str(target)),
        lambda: cross_entropy(rows, cols, options=options, log_prob_output=log_prob, target=target),
        target,
    )
    args = [tvm.runtime.tensor(z), tvm.runtime.tensor(y.astype(np.int64))]
    if w is not None:
        args.append(tvm.runtime.tensor(w))
    loss = tvm.runtime.tensor(np.full(options.loss_rows(rows), np.nan, np.float32))
    lp = tvm.runtime.tensor(np.full(z.shape, np.nan, np.float32))
    kernel(*args, loss, *([lp] if log_prob else []))
    return loss.numpy().reshape(np.shape(y) if options.reduction == "none" else ()), (
        lp.numpy() if log_prob else None
    )


# 1000 columns on AVX512: 7 blocks of 8 vectors, 6 vectors and a scalar tail of 8.
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_numpy(reduction: str, weighted: bool) -> None:
    z, y, w = _inputs(37, 1000)
    w = w if weighted else None
    got, _ = run_cross_entropy(z, y, w, LossOptions(reduction, IGNORE, weighted))
    expected, _, bound = reference(z, y, w, reduction, IGNORE)
    assert_loss_close(got, expected, bound)


@pytest.mark.parametrize("ignore", [None, 0], ids=["unset", "class_0"])
def test_ignore_index_unset_or_a_class(ignore: int | None) -> None:
    z, y, w = _inputs(19, 300, seed=1)
    y = np.abs(y) % 300  # valid labels only
    y[::3] = 0
    got, lp = run_cross_entropy(z, y, w, LossOptions("mean", ignore, True), log_prob=True)
    expected, log_prob, bound = reference(z, y, w, "mean", ignore)
    assert_loss_close(got, expected, bound)
    scale = np.abs(z).max(axis=1, keepdims=True) + np.log(z.shape[1])
    assert np.all(np.abs(lp - log_prob) <= ULPS * EPS32 * scale)


def test_all_rows_ignored_mean_is_nan_and_sum_is_zero() -> None:
    z, y, _ = _inputs(4, 50, seed=2)
    y[:] = IGNORE
    assert np.isnan(run_cross_entropy(z, y, None, LossOptions("mean", IGNORE))[0])
    assert run_cross_entropy(z, y, None, LossOptions("sum", IGNORE))[0] == 0.0


def _edge_rows(cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows with inf, NaN, -inf and huge logits, and labels (row 6 ignored)."""
    rng = np.random.default_rng(3)
    z = (rng.standard_normal((10, cols)) * 3).astype(np.float32)
    y = rng.integers(0, cols, 10)
    z[0, 3] = np.inf  # NaN loss
    z[1, cols - 2] = np.nan  # in the scalar tail: NaN loss
    z[2] = -np.inf  # all -inf: NaN
    z[3, ::3] = -np.inf
    y[3] = 0  # the target logit is -inf: +inf
    z[4, :4] = [3e38, 2.5e38, -3e38, 0.0]
    y[4] = 1  # huge logits: float64 path
    z[5] += 1e4  # outside the float32 fast path
    z[6, 7] = np.nan
    y[6] = IGNORE  # an ignored NaN row adds exactly 0
    z[7] = np.finfo(np.float32).max
    z[8, 5] = -np.inf
    z[9] = -1e4  # very negative: the pairs' exponents reach far down
    return z, y


def _onnxruntime_loss(z: np.ndarray, y: np.ndarray, reduction: str) -> list[np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    loss_shape = [len(y)] if reduction == "none" else []
    graph = helper.make_graph(
        [
            helper.make_node(
                "SoftmaxCrossEntropyLoss",
                ["z", "y"],
                ["loss", "lp"],
                reduction=reduction,
                ignore_index=IGNORE,
            )
        ],
        "loss",
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, list(z.shape)),
            helper.make_tensor_value_info("y", TensorProto.INT64, [len(y)]),
        ],
        [
            helper.make_tensor_value_info("loss", TensorProto.FLOAT, loss_shape),
            helper.make_tensor_value_info("lp", TensorProto.FLOAT, list(z.shape)),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"z": z, "y": y})


def test_edge_rows_follow_onnxruntime() -> None:
    z, y = _edge_rows(200)
    got, lp = run_cross_entropy(z, y, None, LossOptions("none", IGNORE), log_prob=True)
    expected, expected_lp = _onnxruntime_loss(z, y, "none")
    with np.errstate(invalid="ignore"):
        assert got[6] == 0.0
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)
        # ONNX Runtime's log-probabilities of the ignored NaN row are NaN too.
        np.testing.assert_allclose(lp, expected_lp, rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------
# Fused linear + cross-entropy
# --------------------------------------------------------------------------------------


def run_linear(
    h: np.ndarray,
    w: np.ndarray,
    y: np.ndarray,
    b: np.ndarray | None,
    cw: np.ndarray | None,
    options: LossOptions,
    *,
    target: tvm.target.Target = AVX512,
) -> np.ndarray:
    tokens, hidden = h.shape
    vocab = w.shape[1]
    width = lce.panel_width(target)
    biased = b is not None or vocab % width != 0
    kernel = _compiled(
        ("linear", tokens, hidden, vocab, options, biased, str(target)),
        lambda: lce.linear_cross_entropy(
            tokens, hidden, vocab, options=options, biased=biased, target=target
        ),
        target,
    )
    args = [h, lce.pack_weight(w, transposed=False, width=width), y.astype(np.int64)]
    if biased:
        args.append(lce.padded_bias(b, vocab, width))
    if cw is not None:
        args.append(cw)
    loss = tvm.runtime.tensor(np.full(options.loss_rows(tokens), np.nan, np.float32))
    kernel(*[tvm.runtime.tensor(a) for a in args], loss)
    return loss.numpy().reshape((tokens,) if options.reduction == "none" else ())


def _linear_inputs(tokens: int, hidden: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((tokens, hidden)).astype(np.float32)
    w = (rng.standard_normal((hidden, vocab)) * 2 / np.sqrt(hidden)).astype(np.float32)
    b = rng.standard_normal(vocab).astype(np.float32)
    y = rng.integers(0, vocab, tokens)
    y[::7] = IGNORE
    return h, w, b, y, rng.uniform(0.5, 2.0, vocab).astype(np.float32)


# hidden 1024: 590 tokens make four token blocks of 150 rows, the last one short (140);
# vocab 1000 pads the last 64-column panel (bias -inf there), 1024 does not.
@pytest.mark.parametrize(
    ("reduction", "weighted", "bias", "vocab"),
    [
        ("none", False, True, 1000),
        ("mean", True, False, 1000),
        ("sum", False, False, 1024),
        ("mean", False, True, 1024),
    ],
)
def test_linear_cross_entropy_matches_numpy(
    reduction: str, weighted: bool, bias: bool, vocab: int
) -> None:
    h, w, b, y, cw = _linear_inputs(590, 1024, vocab)
    assert lce.token_block(590, 1024) == 150
    got = run_linear(
        h,
        w,
        y,
        b if bias else None,
        cw if weighted else None,
        LossOptions(reduction, IGNORE, weighted),
    )
    logits = h.astype(np.float64) @ w + (b if bias else 0.0)
    expected, _, _ = reference(logits, y, cw if weighted else None, reduction, IGNORE)
    # The kernel's logits are float32 sums of 1024 products (rounding ~sqrt(1024) ulps of
    # their magnitude, ~1e-6 relative): the 1e-5 relative holds with room.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_linear_edge_rows_follow_onnxruntime() -> None:
    h, w, b, y, _ = _linear_inputs(13, 8, 300, seed=4)
    h[0, 2] = np.inf  # logits inf and -inf: NaN
    h[1, 3] = np.nan
    h[2] *= 1e4  # logits ~1e4: the float64 path
    y[2] = int(np.argmin(h[2] @ w + b))  # a huge loss
    h[3] = 0.0  # logits = bias
    y[4] = IGNORE
    got = run_linear(h, w, y, b, None, LossOptions("none", IGNORE))
    with np.errstate(invalid="ignore"):  # inf * 0 in the logits of row 0
        logits = h @ w + b
    expected, _ = _onnxruntime_loss(logits, y, "none")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)


def test_linear_few_tokens_and_avx2() -> None:
    h, w, b, y, _ = _linear_inputs(5, 24, 70, seed=5)  # fewer tokens than a tile
    for target in (AVX512, AVX2):
        got = run_linear(h, w, y, b, None, LossOptions("sum", IGNORE), target=target)
        expected, _, _ = reference(h.astype(np.float64) @ w + b, y, None, "sum", IGNORE)
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_optional_parameters_are_dropped_only_when_unused() -> None:
    func = cross_entropy(
        4, 100, options=LossOptions("sum", IGNORE, weighted=True), log_prob_output=True, target=AVX2
    )
    assert [p.name for p in func.params] == ["X", "Y", "Wc", "Loss", "LogProb"]
    with pytest.raises(ValueError, match="dropped parameter"):
        drop_params(func, {"Wc"})


def test_pack_weight_layout() -> None:
    w = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)  # [hidden, vocab]
    packed = lce.pack_weight(w, transposed=False, width=2)
    assert packed.shape == (3, 3, 2)  # 5 columns padded to 3 panels of 2
    np.testing.assert_array_equal(packed[1, :, 0], w[:, 2])
    np.testing.assert_array_equal(packed[2, :, 1], 0.0)
    np.testing.assert_array_equal(lce.pack_weight(w.T, transposed=True, width=2), packed)
    assert list(lce.padded_bias(None, 5, 2)) == [0, 0, 0, 0, 0, -np.inf]


# --------------------------------------------------------------------------------------
# Assembly: vectorized for the target, no calls to libm
# --------------------------------------------------------------------------------------


def _asm(func: object, target: tvm.target.Target) -> str:
    return tvm.compile(func, target=target).mod.inspect_source("asm")


@pytest.mark.parametrize("kind", ["cross_entropy", "linear"])
def test_avx512_assembly_is_vectorized(kind: str) -> None:
    options = LossOptions("mean", IGNORE, True)
    if kind == "cross_entropy":
        asm = _asm(cross_entropy(8, 1000, options=options, target=AVX512), AVX512)
    else:
        asm = _asm(
            lce.linear_cross_entropy(64, 256, 1024, options=options, biased=False, target=AVX512),
            AVX512,
        )
        # The register tile: FMAs of a broadcast hidden state and a weight vector.
        assert re.search(r"vfmadd231ps\s+%zmm\d+, %zmm\d+, %zmm\d+", asm)
    assert "zmm" in asm and "vscalefps" in asm
    calls = re.findall(r"call\w*\s+(\S+)", asm)
    assert not [c for c in calls if re.search(r"exp|pow|ldexp|scalbn", c)], calls


def test_avx2_assembly_uses_ymm_only() -> None:
    options = LossOptions("sum", IGNORE)
    for func in (
        cross_entropy(8, 1000, options=options, target=AVX2),
        lce.linear_cross_entropy(64, 256, 1024, options=options, biased=False, target=AVX2),
    ):
        asm = _asm(func, AVX2)
        assert "ymm" in asm and "zmm" not in asm and "vscalefps" not in asm
