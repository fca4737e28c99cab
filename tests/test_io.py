"""Loading and atomic saving, external data included."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter import io
from rewriter.errors import InputError


def _model(size: int = 64) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.arange(size * size, dtype=np.float32).reshape(size, size), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size])],
        initializer=[weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_large_tensors_go_to_external_data(tmp_path, monkeypatch):
    # The real threshold is 1 GiB (protobuf's 2 GiB limit with margin); a small one
    # exercises the same path without writing gigabytes.
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD_BYTES", 1000)
    source = tmp_path / "m.onnx"
    onnx.save_model(_model(), str(source))
    out = tmp_path / "out" / "m2.onnx"
    out.parent.mkdir()
    io.save(io.load(source), out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m2.onnx", "m2.onnx.data"]
    loaded = onnx.load(str(out))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), numpy_helper.to_array(_model().graph.initializer[0]))


def test_external_data_is_memory_mapped_not_copied_into_the_input(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save_model(_model(), str(source), save_as_external_data=True, location="weights.bin", size_threshold=0)
    before = (tmp_path / "weights.bin").read_bytes()
    model = io.load(source)
    assert io.uses_external_data(model)
    io.save(model, tmp_path / "copy.onnx")
    assert (tmp_path / "weights.bin").read_bytes() == before
    assert (tmp_path / "copy.onnx.data").is_file()


def test_truncated_external_data_is_refused(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save_model(_model(), str(source), save_as_external_data=True, location="weights.bin", size_threshold=0)
    data = tmp_path / "weights.bin"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(InputError, match="truncated"):
        io.load(source)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model = ir.serde.deserialize_model(_model())
    out = tmp_path / "out.onnx"

    def broken_save(model, path, **kwargs):
        path.write_bytes(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save(model, out)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_survives_a_failed_write(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous result")
    monkeypatch.setattr(ir, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        io.save(ir.serde.deserialize_model(_model()), out)
    assert out.read_bytes() == b"previous result"


def test_output_folder_must_exist(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        io.save(ir.serde.deserialize_model(_model()), tmp_path / "missing" / "m.onnx")
