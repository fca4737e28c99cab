"""Golden test of the bf16 norm legalization (:mod:`rewriter.backends.tvm.relax_passes.legalize_bf16_norms`).

TVM legalizes ``layer_norm`` and ``rms_norm`` for float32 and float16 only, and ``erf``,
``tanh`` and ``softmax`` slowly in bf16. Before: a bf16 layer norm, a bf16 RMS norm, a
bf16 erf, a bf16 softmax and a float32 layer norm. Expected: the bf16 ones computed in float32 (inputs widened, exact) and rounded to bf16 once; the float32 one
left as it is. Compiling bf16 models end to end is in ``test_bf16.py``.
"""

from __future__ import annotations

import pytest

tvm = pytest.importorskip("tvm")

from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from rewriter.backends.tvm.relax_passes import legalize_bf16_norms  # noqa: E402


@I.ir_module
class Before:
    @R.function
    def main(
        x: R.Tensor((2, 8), "bfloat16"),
        g: R.Tensor((8,), "bfloat16"),
        b: R.Tensor((8,), "bfloat16"),
        f: R.Tensor((2, 8), "float32"),
        gf: R.Tensor((8,), "float32"),
    ) -> R.Tuple(
        R.Tensor((2, 8), "bfloat16"),
        R.Tensor((2, 8), "bfloat16"),
        R.Tensor((2, 8), "float32"),
        R.Tensor((2, 8), "bfloat16"),
        R.Tensor((2, 8), "bfloat16"),
    ):
        with R.dataflow():
            ln = R.nn.layer_norm(x, g, b, axes=[-1], epsilon=1e-5)
            rms = R.nn.rms_norm(x, g, axes=[-1], epsilon=1e-6)
            ln_f32 = R.nn.layer_norm(f, gf, gf, axes=[-1], epsilon=1e-5)
            e = R.erf(x)
            sm = R.nn.softmax(x, axis=-1)
            out = (ln, rms, ln_f32, e, sm)
            R.output(out)
        return out


@I.ir_module
class Expected:
    @R.function
    def main(
        x: R.Tensor((2, 8), "bfloat16"),
        g: R.Tensor((8,), "bfloat16"),
        b: R.Tensor((8,), "bfloat16"),
        f: R.Tensor((2, 8), "float32"),
        gf: R.Tensor((8,), "float32"),
    ) -> R.Tuple(
        R.Tensor((2, 8), "bfloat16"),
        R.Tensor((2, 8), "bfloat16"),
        R.Tensor((2, 8), "float32"),
        R.Tensor((2, 8), "bfloat16"),
        R.Tensor((2, 8), "bfloat16"),
    ):
        with R.dataflow():
            x1 = R.astype(x, "float32")
            g1 = R.astype(g, "float32")
            b1 = R.astype(b, "float32")
            ln1 = R.nn.layer_norm(x1, g1, b1, axes=[-1], epsilon=1e-5)
            ln = R.astype(ln1, "bfloat16")
            x2 = R.astype(x, "float32")
            g2 = R.astype(g, "float32")
            rms1 = R.nn.rms_norm(x2, g2, axes=[-1], epsilon=1e-6)
            rms = R.astype(rms1, "bfloat16")
            ln_f32 = R.nn.layer_norm(f, gf, gf, axes=[-1], epsilon=1e-5)
            x3 = R.astype(x, "float32")
            e1 = R.erf(x3)
            e = R.astype(e1, "bfloat16")
            x4 = R.astype(x, "float32")
            sm1 = R.nn.softmax(x4, axis=-1)
            sm = R.astype(sm1, "bfloat16")
            out = (ln, rms, ln_f32, e, sm)
            R.output(out)
        return out


def test_bf16_norms_are_computed_in_float32():
    after, stats = legalize_bf16_norms.upcast(Before)
    assert stats == {"bf16_norms_upcast": 2, "bf16_activations_upcast": 2}
    tvm.ir.assert_structural_equal(after, Expected)


def test_nothing_left_to_legalize_is_unchanged():
    again, stats = legalize_bf16_norms.upcast(Expected)
    assert stats == {"bf16_norms_upcast": 0, "bf16_activations_upcast": 0}
    assert again.same_as(Expected)
