"""3 x 3 convolutions by Winograd's F(2 x 2, 3 x 3) (:mod:`rewriter.backends.tvm.relax_passes.winograd`).

Each compiled model agrees with ONNX Runtime within
:data:`rewriter.backends.tvm.verify.COMPILED_TOLERANCE` (float32: 1e-4 of the output's
scale; the transforms add inputs before the products, a rounding of the same order as
the direct sum's reordering: measured ~1e-6). Where the pass applies, the convolution is
three functions: the input transform (our scheduled kernel), the matrix products (the
matmul rule) and the output transform with the convolution's epilogue fused into it.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper

from rewriter.backends.tvm.relax_passes import winograd
from tests.backends.tvm.test_conv import TOLERANCE, _rules, _run, conv_model, resnet_block


def test_the_sparse_rows_spell_b_transposed():
    for a in range(4):
        row = np.zeros(4)
        row[winograd.FIRST[a]] += 1
        row[winograd.SECOND[a]] += winograd.SIGN[a]
        np.testing.assert_array_equal(row, winograd.B_T[a])


def test_the_transforms_compute_the_convolution_of_a_tile():
    # Y = A^T [(G g G^T) . (B^T d B)] A is the 2 x 2 valid correlation of the 4 x 4 patch.
    rng = np.random.default_rng(0)
    d, g = rng.standard_normal((4, 4)), rng.standard_normal((3, 3))
    u = winograd.transformed_filter(g.reshape(3, 3, 1, 1).astype(np.float32)).reshape(4, 4)
    y = winograd.A_T @ (u * (winograd.B_T @ d @ winograd.B_T.T)) @ winograd.A_T.T
    direct = np.array([[np.sum(d[i : i + 3, j : j + 3] * g) for j in range(2)] for i in range(2)])
    np.testing.assert_allclose(y, direct, rtol=1e-5, atol=1e-5)


def _patch_shapes(mod) -> list[list[object]]:
    """The shapes of the input transforms' outputs in Relax module ``mod`` (ints where static)."""
    from tvm import relax, tirx

    shapes = []
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for binding in (b for block in func.body.blocks for b in block.bindings):
            value = binding.value
            if isinstance(value, relax.Call) and "winograd_input" in str(
                getattr(value.args[0], "name_hint", "")
            ):
                dims = binding.var.ty.shape.values
                shapes.append([int(d) if isinstance(d, tirx.IntImm) else d for d in dims])
    return shapes


def _winograd_rules(rules: dict[str, str]) -> tuple[list[str], list[str]]:
    inputs = [name for name in rules if "winograd_input" in name]
    outputs = [name for name in rules if "winograd_output" in name]
    return inputs, outputs


def _recording_patches(compile_model):
    """``compile_model()``'s result, and the shapes of the input transforms' outputs after
    the Winograd pass (:func:`_patch_shapes`)."""
    patches = []

    @tvm.instrument.pass_instrument
    class Patches:
        def run_after_pass(self, mod, info):
            if info.name == "WinogradConv":
                patches.extend(_patch_shapes(mod))

    with tvm.transform.PassContext(opt_level=3, instruments=[Patches()]):
        result = compile_model()
    return result, patches


def _symbolic_batch_model():
    """A 3 x 3, 64 -> 64 convolution over ``[batch, 64, 16, 16]`` (64 tiles an image)."""
    model = conv_model([1, 64, 16, 16], 64, 3, 1, 1)
    model.graph.input[0].CopyFrom(
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64, 16, 16])
    )
    return model


def _assert_agrees_at_batches(model, compiled, seed, sample=(64, 16, 16)):
    """``compiled`` (of ``model``, symbolic batch of ``sample``-shaped inputs) agrees with
    ORT at batch 1 and 3."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    for batch in (1, 3):
        x = rng.standard_normal((batch, *sample)).astype(np.float32)
        reference = session.run(None, {"x": x})[0]
        got = compiled.run({"x": x})["y"]
        assert float(np.abs(got - reference).max() / np.abs(reference).max()) < TOLERANCE.rtol, (
            batch
        )


@pytest.mark.parametrize(
    ("shape", "out", "pad"),
    [
        pytest.param([1, 64, 16, 16], 64, 1, id="16x16-same"),
        # 15 x 15 outputs: the last row and column of tiles half outside the image.
        pytest.param([1, 64, 15, 15], 64, 1, id="15x15-ragged"),
        # No padding (10 x 10 outputs), a static batch of 2 (25 tiles each, 50 in all),
        # more outputs than inputs.
        pytest.param([2, 64, 12, 12], 96, 0, id="valid-batch2"),
        # DenseNet's bottleneck: 128 -> 32 channels (4096 channel pairs, as 64 -> 64).
        pytest.param([1, 128, 14, 14], 32, 1, id="128-to-32"),
    ],
)
def test_winograd_convs_agree(shape, out, pad):
    compiled, error = _run(conv_model(shape, out, 3, 1, pad), shape)
    assert error < TOLERANCE.rtol
    rules = _rules(compiled)
    inputs, outputs = _winograd_rules(rules)
    assert inputs and all(rules[name] == "kernel" for name in inputs), rules
    # The bias and ReLU after the convolution are in the output transform's function.
    assert outputs and all("add" in name and "relu" in name for name in outputs), rules
    assert "matmul" in rules.values(), rules
    assert not any("conv2d" in name for name in rules), rules


@pytest.mark.parametrize(
    ("shape", "out", "stride", "groups"),
    [
        # 4 x 4 tiles: too few for the transformed filter's reuse.
        pytest.param([1, 64, 8, 8], 64, 1, 1, id="16-tiles"),
        pytest.param([1, 64, 16, 16], 64, 2, 1, id="stride2"),
        pytest.param([1, 32, 16, 16], 32, 1, 1, id="32-channels"),
        # 16 channels in: under MIN_CHANNELS, whatever the channel pairs.
        pytest.param([1, 16, 16, 16], 256, 1, 1, id="16-channels-in"),
        pytest.param([1, 64, 16, 16], 64, 1, 2, id="grouped"),
    ],
)
def test_other_convs_stay_direct(shape, out, stride, groups):
    compiled, error = _run(conv_model(shape, out, 3, stride, 1, groups), shape)
    assert error < TOLERANCE.rtol
    rules = _rules(compiled)
    assert _winograd_rules(rules) == ([], []), rules
    assert any("conv2d" in name for name in rules), rules


@pytest.mark.parametrize(
    ("shape", "patch_bytes", "chunks"),
    [
        # Each image's patches fit (16 positions x 64 tiles x 64 channels x 4 bytes =
        # 256 KiB), two images' do: runs of 2, 2 and 1 image.
        pytest.param([5, 64, 16, 16], 2 * 64 * 1024 * 4, 3, id="runs-of-images"),
        # One image's patches overflow: bands of 3, 3 and 2 of its 8 rows of tiles, the
        # last row of tiles half outside the image (15 x 15 outputs).
        pytest.param([2, 64, 15, 15], 3 * 8 * 64 * 64, 6, id="bands-of-rows"),
    ],
)
def test_patches_over_the_cache_go_in_chunks_and_agree(monkeypatch, shape, patch_bytes, chunks):
    monkeypatch.setattr(winograd, "PATCH_BYTES", patch_bytes)
    (compiled, error), patches = _recording_patches(lambda: _run(conv_model(shape, 64, 3, 1, 1), shape))
    assert error < TOLERANCE.rtol
    assert len(patches) == chunks, patches
    assert all(16 * rows * channels * 4 <= patch_bytes for _, rows, channels in patches), patches
    tiles = shape[0] * (-(-shape[2] // 2)) ** 2
    assert sum(rows for _, rows, _ in patches) == tiles, patches
    rules = _rules(compiled)
    assert not any("conv2d" in name for name in rules), rules
    # The chunks' outputs are concatenated in the function of the bias and ReLU.
    assert any("concatenate" in name and "relu" in name for name in rules), rules


def test_a_symbolic_batch_goes_in_bands_of_every_image_and_agrees(monkeypatch):
    from rewriter.backends import tvm as backend

    # One image's patches: 16 x 64 tiles x 64 channels x 4 bytes = 256 KiB, in 8 rows of
    # tiles; a budget of 3 rows an image (for SYMBOLIC_IMAGES of them): bands of 3, 3, 2.
    monkeypatch.setattr(winograd, "PATCH_BYTES", winograd.SYMBOLIC_IMAGES * 3 * 8 * 16 * 64 * 4)
    model = _symbolic_batch_model()
    compiled, patches = _recording_patches(lambda: backend.compile(model, "avx512"))
    assert [shape[1:] for shape in patches] == [[16, 24, 64], [16, 24, 64], [16, 16, 64]], patches
    _assert_agrees_at_batches(model, compiled, seed=5)


def test_patch_chunks_cover_the_batch_in_order():
    for images, tiles_h, row_bytes in [(8, 28, 16 * 28 * 128 * 4), (3, 7, 100), (2, 9, 1 << 22)]:
        chunks = winograd.patch_chunks(images, tiles_h, row_bytes)
        covered = [
            (chunk.first_image + n, chunk.first_row + r)
            for chunk in chunks
            for n in range(chunk.images)
            for r in range(chunk.rows)
        ]
        assert covered == [(n, r) for n in range(images) for r in range(tiles_h)]
        assert all(
            chunk.images * chunk.rows * row_bytes <= winograd.PATCH_BYTES
            or (chunk.images, chunk.rows) == (1, 1)
            for chunk in chunks
        )


def test_a_residual_block_fuses_its_sum_into_the_output_transform():
    compiled, error = _run(resnet_block(channels=64, size=16), [1, 64, 16, 16])
    assert error < TOLERANCE.rtol
    rules = _rules(compiled)
    inputs, outputs = _winograd_rules(rules)
    # One input transform (both convolutions' shapes are the same function), two outputs.
    assert len(inputs) == 1 and len(outputs) == 2, rules
    # The second convolution's output transform adds the block's input, then ReLU.
    assert any(name.count("add") >= 1 and "relu" in name for name in outputs), rules
    assert compiled.schedules is not None and compiled.schedules.unscheduled == []


def test_a_symbolic_batch_chooses_per_image_and_agrees_at_every_batch():
    from rewriter.backends import tvm as backend

    model = _symbolic_batch_model()
    compiled, patches = _recording_patches(lambda: backend.compile(model, "avx512"))
    assert _winograd_rules(_rules(compiled))[0], _rules(compiled)
    # [batch, 16, tiles, C]: the products' rows are one image's 64 tiles, a static extent
    # (as [16, batch * 64, C] they would be symbolic rows, copied to whole tiles per call).
    assert [shape[1:] for shape in patches] == [[16, 64, 64]], patches
    assert not isinstance(patches[0][0], int), patches
    _assert_agrees_at_batches(model, compiled, seed=4)


@pytest.mark.slow(
    reason="builds and exports torchvision's ResNet-18 (random weights), compiles it (~30 s)"
)
def test_resnet18_export_compiles_with_winograd_and_agrees(tmp_path):
    import onnxruntime as ort

    pytest.importorskip("torchvision")
    torch = pytest.importorskip("torch")
    import torchvision

    from rewriter.backends import tvm as backend

    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.onnx"
    images = torch.randn(1, 3, 112, 112)
    torch.onnx.export(
        module,
        (images,),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}},
        dynamo=False,
        opset_version=17,
    )
    compiled = backend.compile(str(path), "avx512")
    # 28 x 28 (196 tiles) and 14 x 14 (49) stages by Winograd; 7 x 7 (16) and 4 x 4 direct.
    inputs, outputs = _winograd_rules(_rules(compiled))
    assert len(inputs) == 2 and len(outputs) >= 2, _rules(compiled)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 2):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 112, 112)).astype(np.float32)
        reference = session.run(None, {"x": x})[0]
        got = compiled.run({"x": x})["y"]
        assert float(np.abs(got - reference).max() / np.abs(reference).max()) < TOLERANCE.rtol, (
            batch
        )


def test_a_symbolic_batch_with_a_static_factor_sizes_its_bands_for_it(monkeypatch):
    from rewriter.backends import tvm as backend
    from tests.backends.tvm.test_conv_depth import conv3d_model

    batch = tvm.tirx.Var("batch", "int64")
    assert [winograd.static_factor(e) for e in (batch * 4, batch, 2 * (batch * 4))] == [4, 1, 8]
    # A 3-D convolution's 4 frames go into the batch of its 2-D one (``batch * 4``): 48
    # stacked channels, 16 x 16 (8 rows of 8 tiles, 24 KiB a row). A budget of 3 rows an
    # image for SYMBOLIC_IMAGES x 4 images: bands of 3, 3, 2 (one band of 8 rows, were
    # the batch counted as SYMBOLIC_IMAGES images).
    monkeypatch.setattr(winograd, "PATCH_BYTES", winograd.SYMBOLIC_IMAGES * 4 * 3 * 16 * 8 * 48 * 4)
    model = conv3d_model(16, 96, (3, 3, 3), pads=(1,) * 6, shape=["batch", 16, 4, 16, 16])
    compiled, patches = _recording_patches(lambda: backend.compile(model, "avx512"))
    assert [shape[1:] for shape in patches] == [[16, 24, 48], [16, 24, 48], [16, 16, 48]], patches
    _assert_agrees_at_batches(model, compiled, seed=6, sample=(16, 4, 16, 16))
