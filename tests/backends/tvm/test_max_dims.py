"""Bounds of symbolic dimensions: upper ones (``compile(max_dims=...)``, ``--max-dim``),
and lower ones, the smallest sizes the model's windows take (``signature.min_dims``).

The upper bound reaches memory planning (``tir_var_upper_bound``), so every intermediate buffer
sized by the dimension gets a constant size (:class:`memory_plan.StorageRecord`); the
library agrees with ONNX Runtime at sizes up to the bound, refuses a larger one (the
planned buffers would overflow) in memory and after ``load``, and records the bound in
its ``.so.json``. A size under a lower bound (a window with no output, where ONNX
Runtime fails) is refused in one line, not run. Tolerance: :data:`COMPILED_TOLERANCE`
(float32), see there why.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter import cli, verify
from rewriter.backends import tvm as backend
from rewriter.backends.tvm.relax_passes import memory_plan
from rewriter.backends.tvm.verify import COMPILED_TOLERANCE
from rewriter.errors import InputError
from tests.helpers import run as ort_run

TOLERANCE = COMPILED_TOLERANCE["float32"]
SEED = 0
BOUND = 4


def conv_net(batch: str = "batch") -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> GlobalAveragePool over ``[batch, 3, 12, 12]``: intermediate
    buffers whose sizes all follow the batch."""
    rng = np.random.default_rng(SEED)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["c2"], ["y"]),
        ],
        "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8, 1, 1])],
        initializer=[w1, w2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def images(batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED + batch)
    return {"x": rng.standard_normal((batch, 3, 12, 12)).astype(np.float32)}


def assert_agrees(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> None:
    for name, ref in reference.items():
        comparison = verify.compare(name, ref, candidate[name])
        assert TOLERANCE.allows(comparison.max_abs_err, float(np.abs(ref).max())), (name, comparison)


def assert_refused(model: backend.Compiled, feeds: dict[str, np.ndarray], *fragments: str) -> None:
    """``run`` and a session's ``run`` refuse ``feeds`` in one line holding ``fragments``."""
    for run in (model.run, model.session().run):
        with pytest.raises(InputError) as raised:
            run(feeds)
        message = str(raised.value)
        assert all(fragment in message for fragment in fragments) and "\n" not in message, message


@pytest.fixture(scope="module")
def unbounded() -> backend.Compiled:
    return backend.compile(conv_net(), "avx512")


@pytest.fixture(scope="module")
def bounded() -> backend.Compiled:
    return backend.compile(conv_net(), "avx512", max_dims={"batch": BOUND})


def test_the_bound_plans_the_batch_sized_buffers_statically(unbounded, bounded):
    # Without a bound every buffer is sized on each call; with one, every buffer but the
    # outputs main returns (allocated per call, handed to the caller) is planned once.
    # main_out writes its output into the caller's array: nothing left to allocate.
    assert unbounded.memory is not None and bounded.memory is not None
    free, planned = unbounded.memory.functions, bounded.memory.functions
    assert free["main_out"]["static"] == 0 and free["main_out"]["dynamic"] > 0
    assert planned["main_out"] == {"static": planned["main_out"]["static"], "dynamic": 0}
    assert planned["main_out"]["static"] > 0
    assert planned["main"]["dynamic"] == 1  # the output
    assert bounded.signature.max_dims == {"batch": BOUND}
    assert unbounded.signature.max_dims == {}


@pytest.mark.parametrize("batch", [1, 3, BOUND])
def test_outputs_agree_with_onnx_runtime_up_to_the_bound(bounded, batch):
    feeds = images(batch)
    assert_agrees(ort_run(conv_net(), feeds), bounded.run(feeds))


def test_a_size_over_the_bound_is_refused_naming_input_axis_and_bound(bounded):
    too_big = images(BOUND + 1)
    assert_refused(bounded, too_big, "'x'", "axis 0 (batch) is 5", "batch <= 4")
    import torch

    with pytest.raises(InputError, match="batch <= 4"):  # the full check, not numpy's fast one
        bounded.run({"x": torch.from_numpy(too_big["x"])})


def test_a_loaded_library_keeps_the_bound(bounded, tmp_path):
    path = bounded.export(tmp_path / "bounded.so")
    metadata = json.loads((tmp_path / "bounded.so.json").read_text())
    assert metadata["version"] == backend.METADATA_VERSION == 5
    assert metadata["max_dims"] == {"batch": BOUND}
    loaded = backend.load(path)
    assert loaded.signature.max_dims == {"batch": BOUND}
    assert loaded.signature.accepts() == "x[batch, 3, 12, 12] with batch <= 4"
    feeds = images(2)
    assert_agrees(ort_run(conv_net(), feeds), loaded.run(feeds))
    with pytest.raises(InputError, match=r"'x'.*axis 0 \(batch\).*batch <= 4"):
        loaded.run(images(BOUND + 3))


def written_as(library: Path, version: int, *dropped: str) -> backend.Compiled:
    """``library`` (an exported path) loaded after its ``.so.json`` is rewritten as an
    older ``version`` would have written it: without the ``dropped`` fields."""
    meta = Path(f"{library}.json")
    metadata = json.loads(meta.read_text())
    metadata["version"] = version
    for field in dropped:
        del metadata[field]
    meta.write_text(json.dumps(metadata))
    return backend.load(library)


def test_metadata_version_3_loads_without_bounds(unbounded, tmp_path):
    loaded = written_as(unbounded.export(tmp_path / "old.so"), 3, "max_dims", "min_dims")
    assert loaded.signature.max_dims == {}


def test_an_axis_position_names_the_dimension(bounded):
    by_position = backend.compile(conv_net(), "avx512", max_dims={"x.0": BOUND})
    assert by_position.signature.max_dims == {"batch": BOUND}
    assert by_position.memory is not None and bounded.memory is not None
    assert by_position.memory.functions == bounded.memory.functions


@pytest.mark.parametrize(
    ("max_dims", "dims", "message"),
    [
        ({"batch_size": 4}, None, r"--max-dim batch_size: the model has no symbolic input axis.*batch \(x\[0\]\)"),
        ({"batch": 0}, None, "--max-dim batch=0: expected a positive integer"),
        ({"batch": 2.5}, None, "--max-dim batch=2.5: expected a positive integer"),
        ({"batch": 4}, {"batch": 2}, "--max-dim batch: batch is also fixed by --dim batch"),
        ({"x.0": 4}, {"batch": 2}, "--max-dim x.0: batch is also fixed by --dim batch"),
        ({"batch": 4, "x.0": 8}, None, "batch is bounded twice, by 4 and 8"),
    ],
)
def test_bad_bounds_are_input_errors(max_dims, dims, message):
    with pytest.raises(InputError, match=message):
        backend.compile(conv_net(), "avx512", dims=dims, max_dims=max_dims)


@pytest.mark.parametrize("dims", [{"batch_size": 2}, {"x.1": 2}])
def test_dims_naming_no_symbolic_axis_are_input_errors(dims):
    # Ignored, they left the library symbolic (a `batch_size` for an axis named `batch`):
    # the Python API refuses them as the CLI's --dim does.
    key = next(iter(dims))
    with pytest.raises(InputError, match=rf"dims {key}: the model has no symbolic input axis.*batch \(x\[0\]\)"):
        backend.compile(conv_net(), "avx512", dims=dims)


def test_an_unnamed_axis_cannot_be_bounded():
    model = conv_net(batch="")
    with pytest.raises(InputError, match="axis 0 of input 'x' has no name"):
        backend.compile(model, "avx512", max_dims={"x.0": 4})


def test_bound_dims_sets_the_upper_bound_on_functions_with_the_variable():
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(("n", 4), "float32")) -> R.Tensor(("n", 4), "float32"):
            return x

    after = memory_plan.bound_dims(Before, {"n": 8})
    assert dict(after["main"].attrs["tir_var_upper_bound"]) == {"n": 8}
    assert "tir_var_upper_bound" not in (Before["main"].attrs or {})  # the input is untouched
    assert memory_plan.bound_dims(Before, {}) is Before
    with pytest.raises(InputError, match="--max-dim m: no dimension.*variables: n"):
        memory_plan.bound_dims(Before, {"m": 8})


def test_generated_inputs_stay_within_the_bound():
    # batch defaults to 2: a bound of 1 lowers it, a bound of 4 leaves it.
    assert verify.make_inputs(conv_net(), max_dims={"batch": 1})["x"].shape[0] == 1
    assert verify.make_inputs(conv_net(), max_dims={"batch": 4})["x"].shape[0] == 2
    assert verify.make_inputs(conv_net(), dims={"batch": 3}, max_dims={"batch": 4})["x"].shape[0] == 3


def test_cli_max_dim_bounds_the_library_and_reports_it(tmp_path, capsys):
    model = tmp_path / "model.onnx"
    onnx.save(conv_net(), str(model))
    out, lib, report = tmp_path / "out.onnx", tmp_path / "out.so", tmp_path / "report.json"
    argv = [str(model), "--passes", "two-pass-softmax", "-o", str(out), "--target", "avx512"]
    argv += ["--lib", str(lib), "--max-dim", "batch=1", "--report-json", str(report)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "accepts x[batch, 3, 12, 12] with batch <= 1" in printed
    assert "storage allocations planned statically" in printed
    compiled = json.loads(report.read_text())["compiled"]
    assert compiled["max_dims"] == {"batch": 1}
    assert compiled["inputs"] == {"x": [1, 3, 12, 12]}  # batch's default 2 lowered to the bound
    assert compiled["memory"]["main_out"]["dynamic"] == 0
    assert json.loads((tmp_path / "out.so.json").read_text())["max_dims"] == {"batch": 1}
    loaded = backend.load(lib)
    assert_agrees(ort_run(conv_net(), images(1)), loaded.run(images(1)))
    with pytest.raises(InputError, match="batch <= 1"):
        loaded.run(images(2))


def front_end() -> onnx.ModelProto:
    """Conv(k=10, s=5) -> MaxPool(k=2, s=2) over ``[batch, 1, samples]``: 15 samples at
    the least (two frames for the pool)."""
    rng = np.random.default_rng(SEED)
    w = numpy_helper.from_array(rng.standard_normal((4, 1, 10)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], strides=[5]),
            helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2], strides=[2]),
        ],
        "front_end",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, "samples"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_size_under_the_windows_smallest_is_refused_in_memory_and_after_load(tmp_path):
    # Under 15 samples the pool has no window: ONNX Runtime fails; the library gave an
    # empty output, or TVM's "match_cast error" from inside the VM.
    compiled = backend.compile(front_end(), "avx512", max_dims={"batch": BOUND})
    assert compiled.signature.min_dims == {"samples": 15}
    assert compiled.signature.accepts() == "x[batch, 1, samples] with samples >= 15, batch <= 4"
    rng = np.random.default_rng(SEED)
    feeds = {"x": rng.standard_normal((2, 1, 15)).astype(np.float32)}
    assert_agrees(ort_run(front_end(), feeds), compiled.run(feeds))
    short = {"x": rng.standard_normal((2, 1, 14)).astype(np.float32)}
    path = compiled.export(tmp_path / "front.so")
    assert json.loads((tmp_path / "front.so.json").read_text())["min_dims"] == {"samples": 15}
    loaded = backend.load(path)
    for model in (compiled, loaded):
        assert_refused(model, short, "'x'", "axis 2 (samples) is 14", "samples >= 15")


def test_metadata_version_4_loads_without_lower_bounds(tmp_path):
    loaded = written_as(backend.compile(front_end(), "avx512").export(tmp_path / "old.so"), 4, "min_dims")
    assert loaded.signature.min_dims == {}
