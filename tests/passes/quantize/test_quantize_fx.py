"""The quantize pass on the fx front: structure, negatives, idempotence, numbers, export."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn

from rewriter import fx as rfx
from rewriter.errors import InputError
from rewriter.passes.quantize import QuantizeOptions, QuantizePass
from rewriter.passes.quantize import math as qm
from rewriter.passes.quantize.fx import QuantizedWeight, QuantizeFxPass, export_onnx


class Block(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.up, self.down, self.norm = nn.Linear(32, 64), nn.Linear(64, 32), nn.LayerNorm(32)
        with torch.no_grad():
            self.up.weight.mul_(scale)
            self.down.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.down(torch.relu(self.up(x))))


class Net(nn.Module):
    """Conv1d -> two residual blocks (``layers.0``, ``layers.1``) -> Linear head."""

    def __init__(self, second_scale: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 32, 1)
        self.layers = nn.ModuleList([Block(), Block(second_scale)])
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).transpose(1, 2)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


PARAMS = {"conv": 128, "layers.0.up": 2048, "layers.0.down": 2048, "layers.1.up": 2048, "layers.1.down": 2048, "head": 256}


def net(second_scale: float = 1.0) -> Net:
    torch.manual_seed(0)
    return Net(second_scale).eval()


def example(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, 6, generator=torch.Generator().manual_seed(1))


def quantize(model: nn.Module, calibration=(), **options):
    return rfx.rewrite(model, [QuantizeFxPass(QuantizeOptions(**options), calibration=calibration)], (example(),))


def widths(gm) -> dict[str, int]:
    return {name: module.bits for name, module in gm.named_modules() if isinstance(module, QuantizedWeight)}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_structure_int8():
    model = net()
    gm, report = quantize(model, bits=8)
    (record,) = report.passes
    assert record.modified and record.stats["weights_quantized"] == 6 and record.stats["int8_weights"] == 6
    assert record.stats["params_quantized"] == sum(PARAMS.values()) and record.stats["weight_bits_x100"] == 800
    # Storage: a float32 scale per output channel of 4 (conv), 32 or 64 weights.
    stored = 128 * (8 + 32 / 4) + 2 * 2048 * (8 + 32 / 32) + 2 * 2048 * (8 + 32 / 64) + 256 * (8 + 32 / 32)
    assert record.stats["avg_bits_x100"] == round(100 * stored / sum(PARAMS.values()))
    assert record.stats["size_after_bytes"] < record.stats["size_before_bytes"]
    assert widths(gm) == dict.fromkeys(PARAMS, 8)
    assert gm.get_submodule("layers.0.up").weight_int8.dtype == torch.int8
    gm.graph.lint()
    # The caller's model keeps its float weights.
    assert isinstance(model.layers[0].up, nn.Linear) and model.layers[0].up.weight.dtype == torch.float32
    # int8 per channel: 0.55% relative RMS per matrix (see tests/test_quantize.py), five
    # matrices in series with LayerNorms: 1 - cos about 1e-4 at most.
    assert report.verification is not None and report.verification.outputs[0].cosine >= 0.9995


def test_int4_groups_and_half_step():
    model = net()
    gm, report = quantize(model, bits=4, group_size=16, clip="none")
    module = gm.get_submodule("layers.0.down")
    q, scale = module.weight_int4.numpy(), module.weight_scale.numpy()
    assert q.shape == (64, 32) and scale.shape == (4, 32) and q.min() >= -8 and q.max() <= 7
    restored = qm.dequantize_weight(q, scale, axis=1, group_size=16, group_axis=0)
    original = model.layers[0].down.weight.detach().numpy().T
    assert np.all(np.abs(restored - original) <= np.repeat(scale, 16, axis=0) / 2 * (1 + 1e-6) + 1e-7)
    # Conv weights keep per-channel scales (no groups).
    assert gm.get_submodule("conv").group_size == 0 and report.passes[0].stats["grouped_weights"] == 5


def test_allocation_by_lim_moves_the_layer_that_changes_least():
    gm, report = quantize(net(second_scale=0.01), calibration=[(example(8),)], avg_bits=7.0, importance="lim")
    # layers.1 barely changes its input; conv and head change the width, so they have no
    # LIM score. Storage bits per weight, scales included: 76032 / 8576 = 8.87 at 8 bits;
    # moving layers.1 saves 2 x 2048 x 4 bits: 6.95 <= 7 (widths alone: 6.09).
    assert widths(gm) == {"conv": 8, "layers.0.up": 8, "layers.0.down": 8, "layers.1.up": 4, "layers.1.down": 4, "head": 8}
    assert report.passes[0].stats["weight_bits_x100"] == 609
    assert report.passes[0].stats["avg_bits_x100"] == round(100 * (76032 - 16384) / 8576)


@pytest.mark.parametrize("importance", ["zd", "random"])
@pytest.mark.parametrize("target", [4.5, 6.0, 8.0])
def test_average_meets_target(importance, target):
    gm, report = quantize(net(), avg_bits=target, importance=importance)
    bits = widths(gm)
    assert qm.average_bits([PARAMS[name] for name in bits], list(bits.values())) <= target


def test_negatives():
    gm, report = quantize(net(), bits=8, exclude=["layers.*"])
    assert set(widths(gm)) == {"conv", "head"} and report.passes[0].stats["excluded"] == 4
    with pytest.raises(InputError, match="calibration"):
        quantize(net(), avg_bits=6.0, importance="lim")
    with pytest.raises(InputError, match="activations=int8 needs calibration"):
        QuantizeFxPass(QuantizeOptions(bits=8, activations="int8"))
    gm, report = rfx.rewrite(nn.Sequential(nn.ReLU()), [QuantizeFxPass(QuantizeOptions(bits=8))], (example(),))
    assert not report.passes[0].modified


def test_second_run_changes_nothing():
    gm, _ = quantize(net(), bits=4)
    again, report = rfx.rewrite(gm, [QuantizeFxPass(QuantizeOptions(bits=4))], (example(),))
    assert not report.passes[0].modified and report.passes[0].stats["weights_quantized"] == 0


@pytest.mark.parametrize("options", [{"bits": 8}, {"avg_bits": 6.0, "importance": "zd", "group_size": 16}])
def test_export_to_onnx_qdq(tmp_path, options):
    gm, _ = quantize(net(), **options)
    path = export_onnx(gm, (example(),), tmp_path / "q.onnx")
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    kinds = [node.op_type for node in proto.graph.node]
    assert kinds.count("DequantizeLinear") == 6
    types = {tensor.name: tensor.data_type for tensor in proto.graph.initializer}
    int4 = [name for name, kind in types.items() if kind == onnx.TensorProto.INT4]
    int8 = [name for name, kind in types.items() if kind == onnx.TensorProto.INT8]
    assert len(int4) == report_int4(gm) and len(int4) + len(int8) == 6
    if int4:
        assert proto.opset_import[0].version == 21
    # Same numbers as the module: ONNX Runtime with the dequantized weights used as they
    # are (accuracy level 0, no activation quantization); float reordering only.
    options_ = ort.SessionOptions()
    options_.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(path), options_, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: example().numpy()})
    np.testing.assert_allclose(output, gm(example()).detach().numpy(), rtol=1e-4, atol=1e-5)


def report_int4(gm) -> int:
    return sum(bits == 4 for bits in widths(gm).values())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter
def test_same_integers_as_the_onnx_pass(tmp_path):
    # One mechanism, two fronts: the ONNX pass on the float model's export stores the
    # same integers and scales as the fx pass does in its modules.
    model = net()
    path = tmp_path / "float.onnx"
    torch.onnx.export(model, (example(),), str(path), dynamo=False, input_names=["x"])
    result = QuantizePass(QuantizeOptions(bits=4, group_size=16))(ir.load(path))
    onnx_arrays = [
        value.const_value.numpy().astype(np.int8)
        for name, value in result.model.graph.initializers.items()
        if name.endswith("_quantized")
    ]
    gm, _ = quantize(model, bits=4, group_size=16)
    fx_arrays = [buffer.numpy() for name, buffer in gm.named_buffers() if name.endswith("weight_int4")]
    assert len(onnx_arrays) == len(fx_arrays) == 6
    for array in fx_arrays:
        assert any(other.shape == array.shape and np.array_equal(other, array) for other in onnx_arrays)


# Activations (int8 QDQ)

# The six modules read six distinct inputs: x (conv), the transposed conv output, each
# block's relu and each block's output (the next block's and the head's input).
ACTIVATIONS = 6


def calibration() -> list[tuple[torch.Tensor]]:
    return [(torch.randn(8, 4, 6, generator=torch.Generator().manual_seed(5)),)]


def ort_literal(path, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime with graph optimizations off: the QDQ graph as written."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("calibrate", ["minmax", "percentile"])
def test_int8_activations_run_and_export_as_qdq(tmp_path, calibrate):
    gm, report = quantize(net(), calibration=calibration(), bits=8, activations="int8", calibrate=calibrate)
    assert report.passes[0].stats["activations_quantized"] == ACTIVATIONS
    targets = [node.target for node in gm.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.rewriter.quantize_linear.default) == ACTIVATIONS
    assert targets.count(torch.ops.rewriter.dequantize_linear.default) == ACTIVATIONS
    path = export_onnx(gm, (example(),), tmp_path / "qdq.onnx")
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    initializers = {tensor.name for tensor in proto.graph.initializer}
    quantizers = [node for node in proto.graph.node if node.op_type == "QuantizeLinear"]
    # On activations (not initializers), int8 zero points, each feeding a DequantizeLinear.
    assert len(quantizers) == ACTIVATIONS and not any(node.input[0] in initializers for node in quantizers)
    zero_points = {t.name: t for t in proto.graph.initializer if t.name in {n.input[2] for n in quantizers}}
    assert {t.data_type for t in zero_points.values()} == {onnx.TensorProto.INT8}
    kinds = [node.op_type for node in proto.graph.node]
    assert kinds.count("DequantizeLinear") == ACTIVATIONS + 6
    # ONNX Runtime runs the export and gives the module's numbers: the same quantized
    # values (the ops are ONNX's, rounding half to even included), then float sums whose
    # order may differ (1e-5 of the output's scale).
    x = example().numpy()
    expected = gm(example()).detach().numpy()
    np.testing.assert_allclose(ort_literal(path, x), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # Fidelity against fp32: six int8 activations and six int8 weights (measured 0.99995,
    # both calibrations); the ONNX pass's test holds the same bound.
    with torch.no_grad():
        assert cosine(gm(example()), net()(example())) >= 0.999
    # The TVM backend recognizes the export as the ONNX pass's QDQ form: the four block
    # Linears and the head (its 8 outputs padded to a group of 16) become integer matmuls.
    from rewriter.backends.tvm import import_onnx as onnx_import
    from rewriter.backends.tvm.relax_passes import qdq_matmul

    prepared = ir.serde.deserialize_model(onnx_import.prepare(proto))
    assert qdq_matmul.fuse(prepared)["int8_matmuls"] == 5


def test_quantize_linear_matches_onnx():
    # Ties round to even and values past the range saturate, as QuantizeLinear does.
    x = torch.tensor([0.25, 0.75, -0.25, 100.0, -100.0, 0.3])
    scale, zero = torch.tensor(0.5), torch.tensor(3, dtype=torch.int8)
    q = torch.ops.rewriter.quantize_linear(x, scale, zero)
    assert q.dtype == torch.int8 and q.tolist() == [3, 5, 3, 127, -128, 4]
    assert torch.ops.rewriter.dequantize_linear(q, scale, zero).tolist() == [0.0, 1.0, 0.0, 62.0, -65.5, 0.5]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter
def test_activation_scales_match_the_onnx_pass(tmp_path):
    # One mechanism, two fronts: calibrated on the same batch, the ONNX pass (ranges from
    # ONNX Runtime on the float export) and the fx pass (ranges from torch) choose the same
    # scales (to float32 rounding of the measured extremes) and zero points.
    model = net()
    path = tmp_path / "float.onnx"
    torch.onnx.export(model, (example(),), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    onnx_pass = QuantizePass(QuantizeOptions(bits=8, activations="int8"))
    onnx_pass.context.calibration = [{"x": calibration()[0][0].numpy()}]
    result = onnx_pass(ir.load(path))
    onnx_params = sorted(
        (float(value.const_value.numpy()), int(result.model.graph.initializers[name.replace("_scale", "_zero_point")].const_value.numpy()))
        for name, value in result.model.graph.initializers.items()
        if name.endswith("_act_scale")
    )
    gm, _ = quantize(model, calibration=calibration(), bits=8, activations="int8")
    buffers = dict(gm.named_buffers())
    fx_params = sorted(
        (float(buffers[name]), int(buffers[name.replace("_scale", "_zero_point")]))
        for name in buffers
        if name.endswith("_act_scale")
    )
    assert len(onnx_params) == len(fx_params) == ACTIVATIONS
    for (onnx_scale, onnx_zero), (fx_scale, fx_zero) in zip(onnx_params, fx_params, strict=True):
        assert fx_scale == pytest.approx(onnx_scale, rel=1e-5) and fx_zero == onnx_zero


def test_second_run_with_activations_changes_nothing():
    gm, _ = quantize(net(), calibration=calibration(), bits=8, activations="int8")
    options = QuantizeOptions(bits=8, activations="int8")
    again, report = rfx.rewrite(gm, [QuantizeFxPass(options, calibration=calibration())], (example(),))
    assert not report.passes[0].modified
    targets = [node.target for node in again.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.rewriter.quantize_linear.default) == ACTIVATIONS
