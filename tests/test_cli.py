"""The ``rewrite`` CLI: a run end to end, its report, and every bad input it must refuse."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.cli import main


def _attention_like(path: Path, *, external: bool = False) -> Path:
    """MatMul -> Softmax -> MatMul with a weight, symbolic batch: a small realistic graph."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["scores"]),
            helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
            helper.make_node("MatMul", ["probs", "w"], ["y"]),
        ],
        "attention_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".weights", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return _attention_like(tmp_path / "model.onnx")


def test_rewrite_end_to_end_with_report(model_path, tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    before = _digest(model_path)
    code = main([str(model_path), "--passes", "two-pass-softmax", "-o", str(out), "--report-json", str(report)])
    assert code == 0
    assert _digest(model_path) == before  # the input is never modified
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    data = json.loads(report.read_text())
    assert data["input"] == str(model_path) and data["output"] == str(out)
    assert data["passes"][0]["name"] == "two-pass-softmax"
    assert data["passes"][0]["stats"] == {"softmax_replaced": 1, "log_softmax_replaced": 0, "skipped": 0}
    assert data["passes"][0]["seconds"] >= 0
    (output,) = data["verification"]["outputs"]
    assert output["name"] == "y"
    assert output["max_abs_err"] < 1e-4 and output["max_rel_err"] < 1e-5 and output["cosine"] > 0.999999
    assert data["verification"]["inputs"] == {"x": [2, 16]}  # 'batch' defaults to 2
    printed = capsys.readouterr().out
    assert "softmax_replaced=1" in printed and "ok" in printed


def test_dim_and_seed_options(model_path, tmp_path):
    report = tmp_path / "r.json"
    code = main([str(model_path), "--passes", "two-pass-softmax", "-o", str(tmp_path / "o.onnx"), "-q",
                 "--dim", "batch=5", "--seed", "3", "--report-json", str(report)])
    assert code == 0
    assert json.loads(report.read_text())["verification"]["inputs"] == {"x": [5, 16]}


def test_inputs_file(model_path, tmp_path):
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.ones((3, 16), np.float32))
    report = tmp_path / "r.json"
    assert main([str(model_path), "--passes", "two-pass-softmax", "-o", str(tmp_path / "o.onnx"), "-q",
                 "--inputs", str(inputs), "--report-json", str(report)]) == 0
    assert json.loads(report.read_text())["verification"]["inputs"] == {"x": [3, 16]}


def test_calibration_file_reaches_the_passes(model_path, tmp_path, monkeypatch):
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, x=np.full((4, 16), 0.5, np.float32))
    seen = []
    from rewriter.passes.two_pass_softmax import TwoPassSoftmaxPass

    original = TwoPassSoftmaxPass.call

    def spy(self, model):
        seen.append(self.context.calibration_inputs(model))
        return original(self, model)

    monkeypatch.setattr(TwoPassSoftmaxPass, "call", spy)
    assert main([str(model_path), "--passes", "two-pass-softmax", "-o", str(tmp_path / "o.onnx"), "-q",
                 "--calibration", str(calibration)]) == 0
    ((batch,),) = seen
    np.testing.assert_array_equal(batch["x"], np.full((4, 16), 0.5, np.float32))


def test_plot_goes_to_the_passes_that_draw(model_path, tmp_path):
    plot = tmp_path / "layers.png"
    assert main([str(model_path), "--passes", "quantize(bits=8)", "-o", str(tmp_path / "q.onnx"), "-q",
                 "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_when_the_drawing_pass_has_its_own(model_path, tmp_path, capsys):
    """Two destinations for one plot: refused with a message that says so (it said that no
    pass draws a plot)."""
    own, plot = tmp_path / "a.png", tmp_path / "b.png"
    code = main([str(model_path), "--passes", f"quantize(bits=8,plot={own})", "-o", str(tmp_path / "q.onnx"),
                 "--plot", str(plot)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "quantize already has its own plot option" in lines[0] and "none of the passes" not in lines[0]
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".png" or p.name.startswith((".q.onnx", "q.onnx"))]


def test_pipeline_file(model_path, tmp_path):
    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_text('[[pass]]\nname = "two-pass-softmax"\noptions = { log_softmax = false }\n')
    assert main([str(model_path), "--pipeline", str(pipeline), "-o", str(tmp_path / "o.onnx"), "-q"]) == 0


def test_list_passes(capsys):
    assert main(["--list-passes"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("two-pass-softmax"))
    assert "exact" in line


def test_external_data_round_trip(tmp_path):
    source = _attention_like(tmp_path / "ext.onnx", external=True)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "rewritten.onnx"
    assert main([str(source), "--passes", "two-pass-softmax", "-o", str(out), "-q"]) == 0
    assert (out_dir / "rewritten.onnx.data").is_file()  # data kept external, beside the output
    assert sorted(p.name for p in out_dir.iterdir()) == ["rewritten.onnx", "rewritten.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)


def test_verification_failure_exits_3_and_writes_nothing(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    # A zero tolerance cannot hold: the rewrite's rounding differs from ORT's Softmax.
    code = main([str(model_path), "--passes", "two-pass-softmax", "-o", str(out), "--rtol", "0", "--atol", "0"])
    assert code == 3
    assert not out.exists()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rewrite: error: exact rewrite changed output 'y'")
    assert list(tmp_path.iterdir()) == [model_path]


def _bad_cases(tmp_path: Path, model_path: Path) -> dict[str, list[str]]:
    out = str(tmp_path / "out.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 2])
    text = tmp_path / "text.onnx"
    text.write_text("this is not a model\n" * 20)
    wrong_names = tmp_path / "names.npz"
    np.savez(wrong_names, input_ids=np.ones((2, 16), np.float32))
    wrong_shape = tmp_path / "shape.npz"
    np.savez(wrong_shape, x=np.ones((2, 15), np.float32))
    wrong_dtype = tmp_path / "dtype.npz"
    np.savez(wrong_dtype, x=np.ones((2, 16), np.float64))
    external = _attention_like(tmp_path / "ext.onnx", external=True)
    (tmp_path / "ext.onnx.weights").unlink()
    passes = ["--passes", "two-pass-softmax"]
    model = str(model_path)
    return {
        "missing file": [str(tmp_path / "nope.onnx"), *passes, "-o", out],
        "truncated file": [str(truncated), *passes, "-o", out],
        "not onnx": [str(text), *passes, "-o", out],
        "unknown pass": [model, "--passes", "no-such-pass", "-o", out],
        "unknown option": [model, "--passes", "two-pass-softmax(bogus=1)", "-o", out],
        "bad option value": [model, "--passes", "two-pass-softmax(log_softmax=maybe)", "-o", out],
        "malformed pass list": [model, "--passes", "two-pass-softmax((", "-o", out],
        "inputs wrong names": [model, *passes, "-o", out, "--inputs", str(wrong_names)],
        "inputs wrong shape": [model, *passes, "-o", out, "--inputs", str(wrong_shape)],
        "inputs wrong dtype": [model, *passes, "-o", out, "--inputs", str(wrong_dtype)],
        "inputs missing file": [model, *passes, "-o", out, "--inputs", str(tmp_path / "none.npz")],
        "missing external data": [str(external), *passes, "-o", out],
        "output is input": [model, *passes, "-o", model],
        "bad dim": [model, *passes, "-o", out, "--dim", "batch=zero"],
        "max dim zero": [model, *passes, "-o", out, "--target", "avx512", "--max-dim", "batch=0"],
        "max dim without a value": [model, *passes, "-o", out, "--target", "avx512", "--max-dim", "batch"],
        "max dim names no axis": [model, *passes, "-o", out, "--target", "avx512", "--max-dim", "batch_size=4"],
        "max dim also a dim": [model, *passes, "-o", out, "--target", "avx512", "--dim", "batch=2", "--max-dim", "x.0=4"],
        "max dim without target": [model, *passes, "-o", out, "--max-dim", "batch=4"],
        "max dim with tuning": [model, *passes, "-o", out, "--target", "avx512", "--tune", "0", "--max-dim", "batch=4"],
        "plot without a drawing pass": [model, *passes, "-o", out, "--plot", str(tmp_path / "p.png")],
        "calibration wrong shape": [model, *passes, "-o", out, "--calibration", str(wrong_shape)],
        "calibration wrong names": [model, *passes, "-o", out, "--calibration", str(wrong_names)],
        "no output": [model, *passes],
        "no passes": [model, "-o", out],
    }




@pytest.mark.parametrize(
    "case",
    [
        "missing file", "truncated file", "not onnx", "unknown pass", "unknown option",
        "bad option value", "malformed pass list", "inputs wrong names", "inputs wrong shape",
        "inputs wrong dtype", "inputs missing file", "missing external data", "output is input",
        "bad dim", "no output", "no passes", "calibration wrong shape", "calibration wrong names",
        "plot without a drawing pass", "max dim zero", "max dim without a value",
        "max dim names no axis", "max dim also a dim", "max dim without target", "max dim with tuning",
    ],
)
def test_bad_input_one_line_exit_2_no_output(case, model_path, tmp_path, capsys):
    argv = _bad_cases(tmp_path, model_path)[case]
    before = _digest(model_path)
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rewrite: error: "), captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "out.onnx").exists()
    assert _digest(model_path) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.onnx")]  # no staging left


def test_force_allows_in_place(tmp_path):
    path = _attention_like(tmp_path / "m.onnx")
    assert main([str(path), "--passes", "two-pass-softmax", "-o", str(path), "--force", "-q"]) == 0
    assert "TwoPassSoftmax" in {node.op_type for node in onnx.load(str(path)).graph.node}


def test_console_script_is_installed(model_path, tmp_path):
    exe = shutil.which("rewrite", path=str(Path(sys.executable).parent))
    assert exe is not None, "the `rewrite` console script is not installed in this environment"
    done = subprocess.run([exe, "--list-passes"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "two-pass-softmax" in done.stdout
    bad = subprocess.run([exe, str(tmp_path / "nope.onnx"), "--passes", "two-pass-softmax", "-o", str(tmp_path / "o.onnx")],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def _zero_head(path: Path) -> Path:
    """Softmax attention-like scores, then a zero-initialised head (torchvision ViT with
    weights=None): every output is 0 whatever the rewrite does to the Softmax."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    head = numpy_helper.from_array(np.zeros((16, 4), np.float32), "head")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["scores"]),
            helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
            helper.make_node("MatMul", ["probs", "head"], ["y"]),
        ],
        "zero_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[weight, head],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_constant_output_is_warned_in_the_report_the_json_and_stderr(tmp_path):
    model = _zero_head(tmp_path / "zero.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "rewriter.cli", str(model), "--passes", "two-pass-softmax", "-o", str(out),
         "--report-json", str(report)],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    warning = "output 'y' of the original model is all zero on the verification inputs: the comparison proves nothing"
    assert f"warning: {warning}" in done.stdout
    assert warning in done.stderr
    data = json.loads(report.read_text())
    assert data["verification"]["warnings"] == [warning]
    assert data["verification"]["outputs"][0]["warning"] == warning


def test_varying_output_has_no_warning(model_path, tmp_path, capsys):
    report = tmp_path / "report.json"
    assert main([str(model_path), "--passes", "two-pass-softmax", "-o", str(tmp_path / "o.onnx"), "--report-json", str(report)]) == 0
    assert "warning" not in capsys.readouterr().out
    assert json.loads(report.read_text())["verification"]["warnings"] == []
