"""Symbolic reshapes stay views (:mod:`rewriter.backends.tvm.relax_passes.reshape_views`).

TVM's copying reshape over symbolic sizes divides by run-time extents per element (two
of wav2vec2's took 30% of its symbolic library's time). Over symbolic sizes the reshape
is kept for the VM's view builtin; static ones keep TVM's legalization, and those whose
symbolic dimensions lead runs of static ones (a batch, a head split before a symbolic
length) are legalized by ``grouped_reshape``.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from rewriter.backends.tvm import pipeline, targets  # noqa: E402
from rewriter.backends.tvm.relax_passes import reshape_views  # noqa: E402


@I.ir_module
class Reshapes:
    @R.function
    def main(x: R.Tensor((2, "n", 8), "float32"), y: R.Tensor((2, 4, 8), "float32"), z: R.Tensor(("b", 4, 8), "float32")):
        n = T.int64()
        b = T.int64()
        with R.dataflow():
            flat = R.reshape(x + R.const(1.0, "float32"), R.shape([2 * n, 8]))  # symbolic: a view
            fixed = R.reshape(y, R.shape([8, 8]))  # static: TVM's legalization
            batched = R.reshape(z, R.shape([b, 32]))  # a symbolic prefix, then static: grouped_reshape
            out = (flat, fixed, batched)
            R.output(out)
        return out


def test_symbolic_reshape_is_kept_and_static_ones_legalized():
    legalized = relax.transform.LegalizeOps(customize_legalize_map=reshape_views.legalizations())(Reshapes)
    script = legalized["main"].script()
    assert script.count("R.reshape(") == 1 and "R.shape([2 * n, 8])" in script, script
    assert sum(1 for gv in legalized.get_global_vars() if gv.name_hint.startswith("reshape")) == 2
    assert shared_names(legalized) == {}


def shared_names(mod: object) -> dict[str, list[str]]:
    """Per PrimFunc of ``mod``, the names that two distinct variables of its buffers'
    shapes and its scalar parameters share. ``BlockBuilder.call_te`` gives a placeholder
    fresh copies of the caller's variables; a TE function that also uses the caller's own
    gets two of one name, which TVM orders from a set: a different PrimFunc (and code)
    from build to build."""
    from tvm import tirx

    found: dict[str, list[str]] = {}
    for gvar, func in mod.functions_items():  # type: ignore[attr-defined]
        if not isinstance(func, tirx.PrimFunc):
            continue
        seen: list[object] = []
        for param in func.params:  # buffers, and the symbolic sizes passed as scalars
            dims = list(getattr(param, "shape", None) or [])
            if not dims and str(getattr(param.ty, "dtype", "")) == "int64":
                seen.append(param)
            for dim in dims:
                seen.extend(tirx.analysis.undefined_vars(dim, []))
        distinct: list[object] = []
        for var in seen:
            if not any(var.same_as(other) for other in distinct):  # type: ignore[attr-defined]
                distinct.append(var)
        names = [var.name for var in distinct]  # type: ignore[attr-defined]
        shared = sorted({name for name in names if names.count(name) > 1})
        if shared:
            found[gvar.name_hint] = shared
    return found


def test_symbolic_reshape_agrees_at_several_sizes():
    target = targets.resolve("avx512")
    # Alone, every one of them ends a view (the legalized ones through TVM's
    # RewriteDataflowReshape): no copy.
    lowered = pipeline.relax_pipeline(target)(Reshapes)["main"].script()
    assert lowered.count('R.call_packed("vm.builtin.reshape"') == 3, lowered
    vm = machine(Reshapes)
    y = np.arange(64, dtype=np.float32).reshape(2, 4, 8)
    for n in (1, 5):
        x = np.random.default_rng(n).standard_normal((2, n, 8)).astype(np.float32)
        z = np.random.default_rng(n + 1).standard_normal((n, 4, 8)).astype(np.float32)
        flat, fixed, batched = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y), tvm.runtime.tensor(z))
        np.testing.assert_array_equal(flat.numpy(), (x + 1).reshape(2 * n, 8))
        np.testing.assert_array_equal(fixed.numpy(), y.reshape(8, 8))
        np.testing.assert_array_equal(batched.numpy(), z.reshape(n, 32))


@I.ir_module
class Tokens:
    @R.function
    def main(x: R.Tensor(("batch", 16, 64), "float32")):
        batch = T.int64()
        with R.dataflow():
            # SegFormer's tokens back to a map: [b, hw, c] -> [b, c, hw] -> [b, c, h, w] -> NHWC
            channels_first = R.permute_dims(x, [0, 2, 1])
            grid = R.reshape(channels_first, R.shape([batch, 64, 4, 4]))
            y = R.permute_dims(grid, [0, 2, 3, 1])
            R.output(y)
        return y



def fused(module: object) -> object:
    """``module`` legalized with our reshapes, its op patterns annotated and fused, as
    the pipeline does before scheduling."""
    with targets.resolve("avx512"):
        mod = relax.transform.LegalizeOps(customize_legalize_map=reshape_views.legalizations())(module)
        mod = relax.transform.AnnotateTIROpPattern()(mod)
        mod = relax.transform.FuseOps()(mod)
        return relax.transform.FuseTIR()(mod)


def machine(module: object) -> relax.VirtualMachine:
    """``module`` built through our pipeline for avx512, on the CPU."""
    target = targets.resolve("avx512")
    executable = relax.build(module, target=target, relax_pipeline=pipeline.relax_pipeline(target))
    return relax.VirtualMachine(executable, tvm.cpu())

def test_reshape_under_a_symbolic_batch_fuses_with_its_neighbours():
    # The batch is a prefix both shapes share: the reshape's index divides by constants,
    # TVM's fusion takes it, and the three ops are one function (TVM's own reshape
    # indexes modulo the batch, which its fusion treats as opaque: three copies).
    mod = fused(Tokens)
    script = mod["main"].script()
    assert script.count("R.call_tir(") == 1 and "R.reshape(" not in script, script
    vm = machine(Tokens)
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 16, 64)).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(got, x.transpose(0, 2, 1).reshape(batch, 64, 4, 4).transpose(0, 2, 3, 1))


@I.ir_module
class RelativePositions:
    # A conformer's relative positions, [1, 2n + 1, 4, 64] with n = (samples - 400) // 320,
    # transposed: TVM's reshape test of this function aborts ("padding factor ... is not
    # divisible") instead of answering no, and took the whole compile with it.
    @T.prim_func(private=True, s_tir=True)
    def transpose(a: T.handle, b: T.handle):
        samples = T.int64()
        A = T.match_buffer(
            a,
            (
                T.int64(1),
                (samples - T.int64(400)) // T.int64(320) * T.int64(2) + T.int64(1),
                T.int64(4),
                T.int64(64),
            ),
        )
        B = T.match_buffer(
            b,
            (
                T.int64(1),
                T.int64(4),
                T.int64(64),
                (samples - T.int64(400)) // T.int64(320) * T.int64(2) + T.int64(1),
            ),
        )
        for i0, i1, i2, i3 in T.grid(
            T.int64(1),
            T.int64(4),
            T.int64(64),
            (samples - T.int64(400)) // T.int64(320) * T.int64(2) + T.int64(1),
        ):
            with T.sblock("T_transpose"):
                v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
                B[v0, v1, v2, v3] = A[v0, v3, v1, v2]

    @T.prim_func(private=True, s_tir=True)
    def flatten(a: T.handle, b: T.handle):
        n = T.int64()
        A = T.match_buffer(a, (n, T.int64(8)))
        B = T.match_buffer(b, (n * T.int64(8),))
        for i in T.grid(n * T.int64(8)):
            with T.sblock("T_reshape"):
                v = T.axis.remap("S", [i])
                B[v] = A[v // T.int64(8), v % T.int64(8)]

    @R.function
    def main(
        w: R.Tensor(("samples",), "float32"),
        x: R.Tensor((1, "(samples - 400) // 320 * 2 + 1", 4, 64), "float32"),
        y: R.Tensor(("n", 8), "float32"),
    ):
        samples = T.int64()
        n = T.int64()
        cls = RelativePositions
        with R.dataflow():
            t = R.call_tir(
                cls.transpose,
                (x,),
                out_ty=R.Tensor((1, 4, 64, (samples - 400) // 320 * 2 + 1), "float32"),
            )
            f = R.call_tir(cls.flatten, (y,), out_ty=R.Tensor((n * 8,), "float32"))
            out = (R.add(t, t), R.add(f, f))
            R.output(out)
        return out


def test_a_function_tvms_reshape_test_aborts_on_is_not_taken_for_a_reshape():
    with pytest.raises(tvm.error.InternalError, match="padding factor"):
        relax.transform.RewriteDataflowReshape()(RelativePositions)
    main = reshape_views.dataflow_reshapes()(RelativePositions)["main"].script()
    assert "R.call_tir(transpose" in main  # kept: not provably a reshape
    assert "R.call_tir(flatten" not in main and "R.reshape(y" in main  # a reshape: a view


def test_reshape_groups_split_by_constants_only():
    b, n = (tvm.tirx.Var(name, "int64") for name in ("b", "n"))

    def groups(source: list[object], target: list[object]) -> object:
        def dims(values: list[object]) -> list[object]:
            return [tvm.tirx.IntImm("int64", v) if isinstance(v, int) else v for v in values]

        return reshape_views.reshape_groups(dims(source), dims(target))

    assert groups([b, 256, n], [b, 4, 64, n]) == [([0], [0]), ([1], [1, 2]), ([2], [3])]
    assert groups([b, 4, n, 64], [b * 4, n, 64]) == [([0, 1], [0]), ([2], [1]), ([3], [2])]
    assert groups([1, b, 12, n], [b, 3, 4, n, 1]) == [([1], [0]), ([2], [1, 2]), ([3], [3])]
    assert groups([2, n, 8], [2 * n, 8]) is None  # would divide by n
    assert groups([b, n], [n, b]) is None  # no runs of equal size
    assert groups([b, 4, 128, 255], [b, 4, 255, 128]) == [([0], [0]), ([1], [1]), ([2, 3], [2, 3])]
    assert groups([b, 6], [b, 4]) is None


@I.ir_module
class Heads:
    @R.function
    def main(x: R.Tensor(("batch", "n", 256), "float32")):
        batch = T.int64()
        n = T.int64()
        with R.dataflow():
            # SqueezeBERT's heads around its channels-first (NCW) 1-D convolutions:
            # [b, n, 256] -> [b, 256, n] -> [b, 4, 64, n] -> [b, 4, n, 64] -> [4b, n, 64]
            channels_first = R.permute_dims(x, [0, 2, 1])
            heads = R.reshape(channels_first, R.shape([batch, 4, 64, n]))
            rows = R.permute_dims(heads, [0, 1, 3, 2])
            y = R.reshape(rows, R.shape([batch * 4, n, 64]))
            R.output(y)
        return y


def test_head_split_under_a_symbolic_length_fuses_with_its_transposes():
    # Both reshapes split or merge runs by constants: one function, as at fixed sizes
    # (two transposes and two views before).
    mod = fused(Heads)
    script = mod["main"].script()
    assert script.count("R.call_tir(") == 1 and "R.reshape(" not in script, script
    assert shared_names(mod) == {}
    vm = machine(Heads)
    for batch, n in ((1, 5), (3, 17)):
        x = np.random.default_rng(n).standard_normal((batch, n, 256)).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        want = x.transpose(0, 2, 1).reshape(batch, 4, 64, n).transpose(0, 1, 3, 2).reshape(batch * 4, n, 64)
        np.testing.assert_array_equal(got, want)
