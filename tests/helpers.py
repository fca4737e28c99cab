"""Small helpers shared by the tests: building ONNX models from text, running them, and
what the CPU can do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir

from rewriter import verify

# The repository's root (examples/ and its data are there).
REPO = Path(__file__).resolve().parents[1]


def model_from_text(text: str) -> ir.Model:
    """Parse ONNX text syntax into an onnx-ir model (checked)."""
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def run(model: ir.Model | onnx.ModelProto | Path | str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a model in ONNX Runtime."""
    if isinstance(model, ir.Model):
        model = to_proto(model)
    if isinstance(model, onnx.ModelProto):
        return verify.run(model.SerializeToString(), feeds)
    return verify.run(model, feeds)


def op_types(model: ir.Model) -> list[str]:
    """Op types of the main graph and its subgraphs, in order."""
    return [node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph)]


def softmax_model(op: str = "Softmax", *, opset: int = 17, dtype: str = "float", shape: str = "[2, 3, 5]", axis: int | None = None) -> ir.Model:
    """A one-node Softmax/LogSoftmax model."""
    attribute = "" if axis is None else f"<axis = {axis}>"
    return model_from_text(
        f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g ({dtype}{shape} x) => ({dtype}{shape} y) {{
            y = {op}{attribute}(x)
        }}
        """
    )


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``avx512f``, ``avx512_vnni``, ``amx_int8``, ...), from
    /proc/cpuinfo; empty where there is none (:func:`cpu_features.host_flags`, the one
    reader). Read from the flags, not from the model name: on the KVM guests here LLVM
    may name the host ``rocketlake`` although the flags show AVX512-FP16 and AMX."""
    from rewriter.backends.tvm import cpu_features

    return cpu_features.host_flags() or frozenset()


def cpu_has(*flags: str) -> bool:
    """Whether the CPU has every one of ``flags``.

    >>> cpu_has("avx512f", "avx512_vnni")  # doctest: +SKIP
    True
    """
    return set(flags) <= cpu_flags()
