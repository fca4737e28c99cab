"""Fault cases about what the user gives: options, input files, calibration data and invalid
models. Each is a clean exit 2 with one line, never an internal error or a success."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rewriter import verify
from rewriter.errors import InputError
from tests.faults import assert_refused, attention_like, run_cli, same_code_env, snapshot

PASSES = ["--passes", "two-pass-softmax"]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    attention_like(tmp_path / "m.onnx")
    return tmp_path


def _refused(folder: Path, capsys, argv: list[str], message: str) -> None:
    before = snapshot(folder)
    code, lines = run_cli(argv, capsys)
    assert_refused(code, lines, message)
    assert snapshot(folder) == before


# --- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,message",
    [
        (["--seed", "-1"], r"--seed -1: expected an integer from 0 to 2\*\*32 - 1"),
        (["--seed", str(2**32)], "--seed 4294967296: expected"),
        (["--rtol=-1e-5"], "--rtol -1e-05: expected a finite number >= 0"),
        (["--atol", "-1"], "--atol -1.0: expected a finite number >= 0"),
        (["--rtol", "nan"], "--rtol nan: expected"),
        (["--dim", "batch=²"], "--dim 'batch=²': expected NAME=POSITIVE_INT"),
        (["--dim", "batch=" + "9" * 5000], r"--dim 'batch=9+\.\.\.': expected NAME=POSITIVE_INT"),
        (["--dim", "batch=99999999999"], r"generated input 'x' would have shape \[99999999999, 16\].*2\*\*31 elements"),
        (["--dim", "batch=80000000"], r"generated inputs are limited to .* 4 GiB in all"),
    ],
)
def test_bad_option_values(options, message, folder, capsys):
    _refused(folder, capsys, ["m.onnx", *PASSES, "-o", "o.onnx", *options], message)


def test_huge_dim_with_no_verify_and_a_target_is_refused_too(folder, capsys):
    _refused(
        folder, capsys,
        ["m.onnx", *PASSES, "-o", "o.onnx", "--no-verify", "--target", "llvm", "--dim", "batch=99999999999"],
        "generated input 'x'",
    )


def test_unknown_option_is_echoed_back_shortened(folder, capsys):
    code, lines = run_cli(["m.onnx", *PASSES, "-o", "o.onnx", "--" + "x" * 100_000], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("rewrite: error: unrecognized arguments: --xxxx") and "..." in lines[0]
    assert len(lines[0]) < 200


def test_huge_pass_list_is_echoed_back_shortened(folder, capsys):
    code, lines = run_cli(["m.onnx", "--passes", "y" * 100_000, "-o", "o.onnx"], capsys)
    assert_refused(code, lines, r"unknown pass 'y+\.\.\.'")
    assert len(lines[0]) < 400


def test_malformed_argument_value_is_one_line(folder, capsys):
    code, lines = run_cli(["m.onnx", *PASSES, "-o", "o.onnx", "--seed", "z" * 10_000], capsys)
    assert code == 2 and len(lines) == 1 and len(lines[0]) < 300, lines


# --- pipeline files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,message",
    [
        ("{ log_softmax = { a = 1 } }", "option 'log_softmax' of pass 'two-pass-softmax' is a table"),
        ("{ log_softmax = [[1]] }", "option 'log_softmax' .* is list"),
        ("{ log_softmax = 1979-05-27 }", "option 'log_softmax' .* is date"),
        ("{ log_softmax = 2 }", "option 'log_softmax' expects bool, got '2'"),
    ],
)
def test_pipeline_option_of_the_wrong_kind(options, message, folder, capsys):
    (folder / "p.toml").write_text(f'[[pass]]\nname = "two-pass-softmax"\noptions = {options}\n')
    _refused(folder, capsys, ["m.onnx", "--pipeline", "p.toml", "-o", "o.onnx"], message)


def test_pipeline_values_keep_their_meaning(folder, capsys):
    (folder / "p.toml").write_text(
        '[[pass]]\nname = "quantize"\noptions = { bits = 8, exclude = ["nothing", "none*"], clip = "none" }\n'
    )
    from rewriter.registry import load_pipeline

    (quantize,) = load_pipeline(folder / "p.toml")
    assert quantize.options.bits == 8 and quantize.options.exclude == ["nothing", "none*"]


def test_pipeline_name_that_is_not_a_string(folder, capsys):
    (folder / "p.toml").write_text("[[pass]]\nname = { a = 1 }\n")
    _refused(folder, capsys, ["m.onnx", "--pipeline", "p.toml", "-o", "o.onnx"], "needs a name")


@pytest.mark.parametrize(
    "text,message",
    [
        (
            '[[pass]]\nname = "two-pass-softmax"\nopts = { log_softmax = false }\n',
            r"p\.toml: unknown key 'opts' in \[\[pass\]\] 'two-pass-softmax' \(accepted: name, options\)",
        ),
        (
            '[[pass]]\nname = "two-pass-softmax"\n[pass.option]\nlog_softmax = false\n',
            r"p\.toml: unknown key 'option' in \[\[pass\]\] 'two-pass-softmax' \(accepted: name, options\)",
        ),
        (
            'pases = 1\n[[pass]]\nname = "two-pass-softmax"\n',
            r"p\.toml: unknown key 'pases' at the top level \(accepted: pass\)",
        ),
    ],
    ids=["opts", "pass.option table", "top level"],
)
def test_pipeline_with_a_misspelt_key(text, message, folder, capsys):
    """A typo must not run the pass with its default options."""
    (folder / "p.toml").write_text(text)
    _refused(folder, capsys, ["m.onnx", "--pipeline", "p.toml", "-o", "o.onnx"], message)


def test_pipeline_that_is_a_folder(folder, capsys):
    (folder / "pipes").mkdir()
    _refused(folder, capsys, ["m.onnx", "--pipeline", "pipes", "-o", "o.onnx"], "pipes: is a folder")


# --- input and calibration files -------------------------------------------------------


def test_inputs_given_as_npy(folder, capsys):
    np.save(folder / "x.npy", np.ones((2, 16), np.float32))
    _refused(folder, capsys, ["m.onnx", *PASSES, "-o", "o.onnx", "--inputs", "x.npy"], "x.npy: a single array, not an .npz")


def test_inputs_that_are_a_folder_or_hold_pickles(folder, capsys):
    (folder / "dir.npz").mkdir()
    _refused(folder, capsys, ["m.onnx", *PASSES, "-o", "o.onnx", "--inputs", "dir.npz"], "dir.npz: not a readable .npz")
    np.savez(folder / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    _refused(folder, capsys, ["m.onnx", *PASSES, "-o", "o.onnx", "--inputs", "objects.npz"], "objects.npz: not a readable")


def _npy_member(shape: str, data: bytes = b"") -> bytes:
    """An ``.npy`` file of float32 declaring ``shape`` and holding ``data``."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (118 - len(header)) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("option", ["--inputs", "--calibration"])
def test_npz_member_declaring_more_than_it_holds(option, compression, folder, capsys):
    """A 200-byte file whose header declares 58 TiB is refused before anything is allocated."""
    with zipfile.ZipFile(folder / "huge.npz", "w", compression=compression) as archive:
        archive.writestr("x.npy", _npy_member("(2, 8000000000000)"))
    argv = ["m.onnx", "--passes", "quantize", "-o", "o.onnx", option, "huge.npz"]
    _refused(folder, capsys, argv, r"huge\.npz: member 'x' declares shape \(2, 8000000000000\) float32 .*holds 0")


def test_npz_member_that_runs_out_of_memory(folder, capsys, monkeypatch):
    """A size the file can hold but memory cannot is the same clean error, naming the member."""
    np.savez(folder / "inputs.npz", x=np.ones((2, 16), np.float32))

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 58.2 TiB for an array with shape (8000000000000,)")

    monkeypatch.setattr(np.lib.format, "read_array", no_memory)
    argv = ["m.onnx", *PASSES, "-o", "o.onnx", "--inputs", "inputs.npz"]
    _refused(folder, capsys, argv, r"inputs\.npz: member 'x' does not fit in memory \(Unable to allocate 58\.2 TiB")


@pytest.mark.parametrize("pass_spec", ["quantize(avg_bits=6)", "quantize(activations=int8)", "prune", "quantize"])
@pytest.mark.parametrize(
    "data,message",
    [
        (np.ones((0, 16), np.float32), "no calibration samples"),
        (np.full((2, 16), np.nan, np.float32), "calibration input 'x' holds NaN values"),
    ],
    ids=["empty", "nan"],
)
def test_calibration_without_samples(pass_spec, data, message, folder, capsys):
    np.savez(folder / "c.npz", x=data)
    _refused(folder, capsys, ["m.onnx", "--passes", pass_spec, "-o", "o.onnx", "--calibration", "c.npz"], message)


def test_calibration_arrays_through_the_api(folder):
    from rewriter.job import rewrite_file

    with pytest.raises(InputError, match="holds NaN"):
        rewrite_file("m.onnx", "o.onnx", "prune", calibration={"x": np.full((2, 16), np.nan, np.float32)})
    assert not (folder / "o.onnx").exists()


# --- invalid models ------------------------------------------------------------------------


def _save(path: Path, nodes, inputs, outputs, *, opset: int = 17) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def _tensor(name: str, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def invalid_models(folder: Path) -> dict[str, Path]:
    x, y = _tensor("x", [2, 4]), _tensor("y", [2, 4])
    return {
        "dangling input": _save(
            folder / "dangling.onnx",
            [helper.make_node("Add", ["x", "nowhere"], ["s"]), helper.make_node("Softmax", ["s"], ["y"])],
            [x], [y],
        ),
        "cycle": _save(
            folder / "cycle.onnx",
            [
                helper.make_node("Add", ["x", "b"], ["a"]),
                helper.make_node("Relu", ["a"], ["b"]),
                helper.make_node("Softmax", ["a"], ["y"]),
            ],
            [x], [y],
        ),
        "rank-0 softmax": _save(
            folder / "rank0.onnx", [helper.make_node("Softmax", ["x"], ["y"])], [_tensor("x", [])], [_tensor("y", [])]
        ),
        "unknown op": _save(
            folder / "unknown.onnx",
            [helper.make_node("Frobnicate", ["x"], ["s"]), helper.make_node("Softmax", ["s"], ["y"])],
            [x], [y],
        ),
    }


@pytest.mark.parametrize("case", ["dangling input", "cycle", "rank-0 softmax", "unknown op"])
@pytest.mark.parametrize("verify_flag", [[], ["--no-verify"]])
def test_invalid_models_are_refused(case, verify_flag, folder, capsys):
    model = invalid_models(folder)[case]
    _refused(folder, capsys, [model.name, *PASSES, "-o", "o.onnx", *verify_flag], f"{model.name}: invalid ONNX model")


def test_opset_too_old_for_the_pass(folder, capsys):
    attention_like(folder / "m7.onnx", opset=7)
    _refused(folder, capsys, ["m7.onnx", *PASSES, "-o", "o.onnx"], "two-pass-softmax needs opset >= 9, the model has 7")


def test_no_traceback_without_verbose(folder):
    """A fresh process, with the CLI's own logging: no shape-inference traceback on stderr."""
    invalid_models(folder)
    for name in ("rank0.onnx", "dangling.onnx"):
        done = subprocess.run(
            [sys.executable, "-m", "rewriter.cli", name, *PASSES, "-o", "o.onnx"],
            capture_output=True, text=True, check=False, cwd=folder, env=same_code_env(),
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert not (folder / "o.onnx").exists()


def test_a_pass_that_breaks_the_model_writes_nothing(folder, capsys, monkeypatch):
    from rewriter.registry import available

    TwoPassSoftmaxPass = available()["two-pass-softmax"]  # noqa: N806 (a class)
    original = TwoPassSoftmaxPass.call

    def broken(self, model):
        result = original(self, model)
        model.graph[0].op_type = "Frobnicate"  # an op no opset has
        return result

    monkeypatch.setattr(TwoPassSoftmaxPass, "call", broken)
    before = snapshot(folder)
    code, lines = run_cli(["m.onnx", *PASSES, "-o", "o.onnx", "--no-verify"], capsys)
    assert_refused(code, lines, "the rewritten model fails the ONNX checker: o.onnx: invalid", exit_code=1)
    assert snapshot(folder) == before


def test_generated_inputs_are_bounded_in_the_api(folder):
    with pytest.raises(InputError, match="2\\*\\*31 elements"):
        verify.make_inputs("m.onnx", dims={"batch": 2**40})
