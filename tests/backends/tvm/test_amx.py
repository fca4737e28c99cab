"""AMX bf16 and int8 matmuls: the packing, the generated code, exactness, the choice of kernel.

The kernels (:mod:`rewriter.backends.tvm.kernels.amx_matmul`) build for any target with
AMX (here ``mcpu=sapphirerapids``) on any machine, so the code checks run everywhere;
the runs skip, saying why, where this CPU has no AMX or Linux refuses the tile state.

Tolerances, derived rather than picked (``u = 2**-24``, the float32 unit roundoff):

* int8: the int32 sums are exact; with ``scale = 1`` and no bias the epilogue converts
  ``acc - comp`` to float32 exactly (the test keeps ``|acc - comp| < 2**24``), so the
  kernel must match integer numpy bit for bit;
* bf16: the products of bf16 values are exact in float32, and the kernel sums ``K`` of
  them and adds the bias in float32, in some order: ``|y - ref| <= (K + 2) u mag`` with
  ``mag = |x| @ |W| + |b|`` (the classical bound of a float32 sum); a bf16 output rounds
  that once more, by at most ``2**-8`` of it.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.backends.tvm import amx_runtime, import_onnx, targets  # noqa: E402
from rewriter.backends.tvm.kernels import amx_matmul  # noqa: E402
from rewriter.backends.tvm.kernels import int8_matmul as vnni_kernel  # noqa: E402
from rewriter.backends.tvm.ops.int8_matmul import KERNEL_NAME as INT8_KERNEL  # noqa: E402
from rewriter.backends.tvm.relax_passes import bf16_matmul, qdq_matmul  # noqa: E402
from tests.backends.tvm import test_bf16, test_int8  # noqa: E402

BF16 = ml_dtypes.bfloat16
U = 2.0**-24
SAPPHIRE_RAPIDS = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids"}
AMX_PRESET = "sapphirerapids"

# (M, K, N): whole tiles, then ragged M, K and N (not multiples of 16, 32 or 64), one
# row, a K below one k-step, and more than one chunk of 256 channels.
SHAPES = [(32, 128, 64), (37, 100, 45), (1, 20, 16), (70, 200, 300), (64, 64, 520)]


@pytest.fixture
def amx() -> None:
    """Skip unless this process may run AMX instructions (asks Linux for them)."""
    reason = amx_runtime.available()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def amx_preset() -> str:
    """The name of the CPU preset with AMX (``--target sapphirerapids``)."""
    assert targets.CPU_PRESETS[AMX_PRESET] == SAPPHIRE_RAPIDS
    return AMX_PRESET


def spr() -> tvm.target.Target:
    return tvm.target.Target(SAPPHIRE_RAPIDS)


def library_asm(compiled: backend.Compiled) -> str:
    """The assembly of a compiled model's kernels (the VM's imported LLVM module)."""
    return "".join(module.inspect_source("asm") for module in compiled.executable.mod.imports)


# Packing and features (no TVM build)


@pytest.mark.parametrize("kind, group, step", [("bf16", 2, 32), ("int8", 4, 64)])
def test_packed_layout_pads_k_and_channel_pairs_with_zeros(kind, group, step):
    k, n = 70, 40
    weight = np.arange(1, k * n + 1).reshape(k, n).astype(np.int8 if kind == "int8" else BF16)
    packed = amx_matmul.pack_weight(kind, weight)
    k_pad = -(-k // step) * step
    assert packed.shape == amx_matmul.packed_shape(kind, k, n) == (4, k_pad // group, 16, group)
    for kk, nn in [(0, 0), (69, 39), (33, 17), (64, 32)]:
        assert packed[nn // 16, kk // group, nn % 16, kk % group] == weight[kk, nn]
    unpacked = packed.transpose(1, 3, 0, 2).reshape(k_pad, 64).astype(np.float32)
    assert not unpacked[k:].any() and not unpacked[:, n:].any()


def test_the_amx_layout_is_the_vnni_layout_where_no_padding_is_needed():
    weight = np.random.default_rng(0).integers(-128, 128, (128, 64)).astype(np.int8)
    np.testing.assert_array_equal(
        amx_matmul.pack_weight("int8", weight), qdq_matmul.pack_weight(weight)
    )


def test_amx_is_chosen_by_target_features():
    assert amx_matmul.supported(spr(), "bf16") and amx_matmul.supported(spr(), "int8")
    for name in ("avx512", "avx2", "llvm"):  # Zen 4 and every preset without AMX
        assert not amx_matmul.supported(targets.resolve(name), "bf16")
        assert not amx_matmul.supported(targets.resolve(name), "int8")
    with pytest.raises(ValueError, match="amx-tile"):
        amx_matmul.amx_matmul("int8", 4, 64, 16, bias=False, target=targets.resolve("avx512"))
    assert amx_runtime.uses_amx(SAPPHIRE_RAPIDS)
    assert not amx_runtime.uses_amx(targets.target_dict("avx512"))


def test_permission_is_refused_cleanly_without_amx(monkeypatch):
    monkeypatch.setattr(amx_runtime, "cpu_flags", lambda: frozenset({"avx512f"}))
    reason = amx_runtime._request.__wrapped__()
    assert reason == "this CPU has no AMX (no amx_tile in /proc/cpuinfo)"


def test_a_library_with_amx_refuses_to_run_where_amx_is_denied(monkeypatch, amx_preset):
    model, values = test_bf16.dense(rows=4, k=64, n=32)
    compiled = backend.compile(model, amx_preset)
    # On a CPU without the preset's other features (Zen 4: no AVX512-FP16, no MOVDIR64B)
    # the feature check refuses first; this test is about the AMX permission after it.
    monkeypatch.setattr(type(compiled.signature), "missing_features", lambda self: [])
    monkeypatch.setattr(amx_runtime, "_request", lambda: "this CPU has no AMX (test)")
    with pytest.raises(amx_runtime.AmxUnavailableError, match="this CPU has no AMX"):
        compiled.run({"x": values["x"]})


# Generated code (builds on any machine)


@pytest.mark.parametrize(
    "kind, instruction, out_dtype",
    [("bf16", "tdpbf16ps", "bfloat16"), ("int8", "tdpbusd", "float32")],
)
def test_kernel_has_the_tile_instructions(kind, instruction, out_dtype):
    func = amx_matmul.amx_matmul(kind, 37, 100, 45, bias=True, out_dtype=out_dtype, target=spr())
    asm = tvm.compile(func, target=spr()).mod.inspect_source("asm")
    for mnemonic in ("ldtilecfg", "tileloadd", instruction, "tilestored", "tilerelease"):
        assert mnemonic in asm, mnemonic
    assert "zmm" in asm  # the epilogue, 16 lanes


# Exactness (needs an AMX CPU)


@pytest.mark.parametrize("m, k, n", SHAPES)
def test_int8_kernel_is_exact(amx, m, k, n):
    lib = tvm.compile(
        amx_matmul.amx_matmul("int8", m, k, n, bias=False, target=spr()), target=spr()
    )
    test_int8.assert_int8_kernel_exact(
        lib, m, k, n, lambda weight: amx_matmul.pack_weight("int8", weight)
    )


def test_int8_epilogue_scales_and_adds_the_bias(amx):
    m, k, n = 37, 100, 45
    lib = tvm.compile(amx_matmul.amx_matmul("int8", m, k, n, bias=True, target=spr()), target=spr())
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    weight = rng.integers(-128, 128, (k, n)).astype(np.int8)
    scale = rng.uniform(1e-4, 1e-2, n).astype(np.float32)
    comp = rng.integers(-1000, 1000, n).astype(np.int32)
    bias = rng.standard_normal(n).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    args = [a, amx_matmul.pack_weight("int8", weight), scale, comp, bias]
    lib(*[tvm.runtime.tensor(arg) for arg in args], y)
    exact = (a.astype(np.int64) @ weight.astype(np.int64) - comp).astype(np.float64)
    product = scale.astype(np.float64) * exact  # exact below 2**24: float32 values
    # float32(acc - comp) is exact; then scale * it + bias, one FMA or two roundings.
    bound = 2 * U * (np.abs(product) + np.abs(bias))
    assert np.all(np.abs(y.numpy() - (product + bias)) <= bound)


@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("bias, out_dtype", [(True, "float32"), (False, "bfloat16")])
def test_bf16_kernel_agrees_with_float64(amx, m, k, n, bias, out_dtype):
    func = amx_matmul.amx_matmul("bf16", m, k, n, bias=bias, out_dtype=out_dtype, target=spr())
    lib = tvm.compile(func, target=spr())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k)).astype(BF16)
    weight = rng.standard_normal((k, n)).astype(BF16)
    b = rng.standard_normal(n).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((m, n), BF16 if out_dtype == "bfloat16" else np.float32))
    args = [x, amx_matmul.pack_weight("bf16", weight), *([b] if bias else [])]
    lib(*[tvm.runtime.tensor(arg) for arg in args], y)
    ref, mag = test_bf16.reference(x, weight, None)
    if bias:  # b is float32: added as it is
        ref, mag = ref + b, mag + np.abs(b)
    bound = test_bf16.kernel_bound(ref, mag, k, out_dtype)
    error = np.abs(y.numpy().astype(np.float64) - ref)
    assert np.all(error <= bound), np.max(error / bound)


# The choice of kernel in compiled models


def test_bf16_model_runs_the_amx_kernel_on_amx_targets(amx_preset, caplog):
    model, values = test_bf16.dense(rows=37, k=90, n=45)  # M, K, N all ragged
    with caplog.at_level(logging.INFO, logger="rewriter.backends.tvm.relax_passes.bf16_matmul"):
        compiled = backend.compile(model, amx_preset)
    assert "1 bf16 matmuls run the amx kernel (1 with their bias folded in)" in caplog.messages
    assert "tdpbf16ps" in library_asm(compiled)
    if amx_runtime.available():
        pytest.skip(amx_runtime.available())
    got = compiled.run({"x": values["x"]})["y"].astype(np.float64)
    ref, mag = test_bf16.reference(values["x"], values["w"], values["b"])
    # One float32 sum rounded to bf16 once (the kernel bound), as the vdpbf16ps path.
    assert np.all(np.abs(got - ref) <= test_bf16.kernel_bound(ref, mag, 90, "bfloat16"))


def test_bf16_model_keeps_vdpbf16ps_without_amx(caplog):
    model, _ = test_bf16.dense(rows=37, k=90, n=45)
    with caplog.at_level(logging.INFO, logger="rewriter.backends.tvm.relax_passes.bf16_matmul"):
        compiled = backend.compile(model, "avx512")
    assert (
        "1 bf16 matmuls run the vdpbf16ps kernel (1 with their bias folded in)" in caplog.messages
    )
    asm = library_asm(compiled)
    assert "vdpbf16ps" in asm and "tdpbf16ps" not in asm
    assert bf16_matmul.supported(targets.resolve("avx512"))


@pytest.mark.parametrize("k, n", [(64, 32), (100, 40)])  # then K and N ragged
def test_int8_model_packs_for_amx_and_agrees_with_ort(amx_preset, k, n):
    model, feeds = test_int8.single(zero_dtype=np.uint8, bias=True, k=k, n=n)
    target = targets.resolve(amx_preset)
    proto = import_onnx.prepare(model, int8_matmul=True, int8_amx=True)
    packed = [init for init in proto.graph.initializer if init.name.endswith("_weight_packed")]
    assert [list(init.dims) for init in packed] == [list(amx_matmul.packed_shape("int8", k, n))]
    module = import_onnx.import_onnx(model, target=target)
    assert any(gv.name_hint.startswith(INT8_KERNEL) for gv in module.get_global_vars())
    compiled = backend.compile(model, amx_preset)
    assert "tdpbusd" in library_asm(compiled)
    if amx_runtime.available():
        pytest.skip(amx_runtime.available())
    got = compiled.run(feeds)["y"]
    vnni = backend.compile(model, "avx512").run(feeds)["y"]
    # The same exact int32 sums and the same float32 epilogue as the VNNI kernel.
    np.testing.assert_array_equal(got, vnni)
    (expected,) = test_int8.ort_literal(model, feeds)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_int8_model_keeps_vnni_without_amx():
    model, _ = test_int8.single(zero_dtype=np.uint8, bias=True, n=40)
    proto = import_onnx.prepare(model, int8_matmul=True)  # int8_amx=False: the VNNI layout
    packed = [init for init in proto.graph.initializer if init.name.endswith("_weight_packed")]
    assert [list(init.dims) for init in packed] == [[3, 16, 16, 4]]  # ceil(40/16), 64/4
    asm = library_asm(backend.compile(model, "avx512"))
    assert "vpdpbusd" in asm and "tdpbusd" not in asm
    assert vnni_kernel.supported(targets.resolve("avx512"))


def test_an_exported_amx_library_runs_in_a_fresh_process(amx, amx_preset, tmp_path):
    """A new process has no AMX permission: ``load(...).run`` must ask before the first
    tile instruction (else SIGILL kills it)."""
    model, values = test_bf16.dense(rows=37, k=90, n=45)
    compiled = backend.compile(model, amx_preset)
    library = compiled.export(tmp_path / "amx.so")
    np.save(tmp_path / "x.npy", values["x"].view(np.uint16))  # bf16 bits
    script = textwrap.dedent(
        f"""
        import ml_dtypes, numpy as np
        from rewriter.backends.tvm import load
        x = np.load({str(tmp_path / "x.npy")!r}).view(ml_dtypes.bfloat16)
        y = load({str(library)!r}).run({{"x": x}})["y"]
        np.save({str(tmp_path / "y.npy")!r}, y.view(np.uint16))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    expected = compiled.run({"x": values["x"]})["y"]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected.view(np.uint16))
