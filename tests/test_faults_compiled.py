"""Fault cases of compiled libraries: a damaged library is refused before it is mapped, and
wrong inputs are an InputError naming the input, never a raw TVM error."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rewriter.backends import tvm as backend
from rewriter.backends.tvm import cpu_features
from rewriter.errors import InputError
from tests.faults import attention_like, same_code_env


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> tuple[Path, backend.Compiled]:
    """The attention-like model compiled for llvm at batch 2, exported."""
    folder = tmp_path_factory.mktemp("compiled")
    model = attention_like(folder / "m.onnx")
    compiled = backend.compile(model, "llvm", dims={"batch": 2})
    path = compiled.export(folder / "m.so")
    return path, compiled


def _copy(library: Path, folder: Path, name: str = "copy.so") -> Path:
    copy = folder / name
    copy.write_bytes(library.read_bytes())
    Path(str(copy) + ".json").write_text(Path(str(library) + ".json").read_text())
    return copy


def test_export_records_the_libraries_sha256(library):
    path, _ = library
    metadata = json.loads(Path(str(path) + ".json").read_text())
    assert metadata["version"] == backend.METADATA_VERSION
    assert metadata["sha256"] == backend.file_sha256(path)
    x = np.ones((2, 16), np.float32)
    np.testing.assert_array_equal(backend.load(path).run({"x": x})["y"], library[1].run({"x": x})["y"])


def test_a_truncated_library_is_refused_not_a_crash(library, tmp_path):
    """In a fresh process: mapping a truncated library can kill it with SIGBUS."""
    copy = _copy(library[0], tmp_path)
    copy.write_bytes(copy.read_bytes()[: copy.stat().st_size // 2])
    script = textwrap.dedent(
        f"""
        from rewriter.backends.tvm import load
        from rewriter.errors import InputError
        try:
            load({str(copy)!r})
        except InputError as exc:
            print("refused:", exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False, env=same_code_env()
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "refused:" in done.stdout and "does not match the SHA-256" in done.stdout


def test_a_changed_library_is_refused(library, tmp_path):
    copy = _copy(library[0], tmp_path)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match the SHA-256 in copy.so.json"):
        backend.load(copy)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"version": 1}, "metadata version 1 is not supported.*export the model again"),
        ({"sha256": None}, "unreadable metadata"),
        ({"sha256": 12}, "unreadable metadata"),
        ({"inputs": "x"}, "unreadable metadata"),
    ],
)
def test_metadata_without_a_usable_hash_is_refused(change, message, library, tmp_path):
    copy = _copy(library[0], tmp_path)
    meta = Path(str(copy) + ".json")
    data = json.loads(meta.read_text()) | change
    if change.get("sha256", 0) is None:
        del data["sha256"]
    meta.write_text(json.dumps(data))
    with pytest.raises(InputError, match=message):
        backend.load(copy)


def _lacking_feature() -> str:
    """A feature compiled code may use that this CPU lacks (Intel lacks SSE4A, AMD AMX)."""
    flags = cpu_features.host_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags on this machine: nothing to check features against")
    return sorted(f for f, flag in cpu_features.LLVM_TO_FLAG.items() if flag not in flags)[0]


def test_a_library_needing_a_feature_this_cpu_lacks_is_refused_in_one_line(library, tmp_path):
    """Its metadata claims a feature this CPU lacks: an InputError naming it, before the
    library is mapped, instead of an illegal instruction in the first call."""
    feature = _lacking_feature()
    copy = _copy(library[0], tmp_path)
    meta = Path(str(copy) + ".json")
    data = json.loads(meta.read_text())
    data["features"] = [*data["features"], feature]
    meta.write_text(json.dumps(data))
    with pytest.raises(InputError) as refused:
        backend.load(copy)
    message = str(refused.value)
    assert "\n" not in message and f"may use {feature}, which this CPU lacks" in message


def test_a_compiled_model_needing_a_feature_this_cpu_lacks_does_not_run(library):
    feature = _lacking_feature()
    path, compiled = library
    signature = dataclasses.replace(compiled.signature, features=[*compiled.signature.features, feature])
    lacking = backend.Compiled(backend.load(path).executable, signature)
    assert not lacking.runnable and feature in (lacking.not_runnable() or "")
    with pytest.raises(InputError, match=f"this CPU lacks {feature}"):
        lacking.run({"x": np.ones((2, 16), np.float32)})


@pytest.mark.parametrize(
    "inputs,message",
    [
        ({"x": np.ones((2, 16), np.float32), "y": np.ones(1)}, r"unknown inputs \['y'\]; the compiled model takes \['x'\]"),
        ({}, r"missing inputs \['x'\]"),
        ({"x": np.ones((2, 16), np.float64)}, "input 'x' has dtype float64, the compiled model takes float32"),
        ({"x": np.ones((2, 16, 1), np.float32)}, r"input 'x' has rank 3 \(shape \[2, 16, 1\]\), the compiled model takes \[2, 16\]"),
        ({"x": np.ones((3, 16), np.float32)}, r"input 'x' has shape \[3, 16\], the compiled model takes \[2, 16\]"),
        ({"x": np.ones((2, 15), np.float32)}, r"input 'x' has shape \[2, 15\]"),
    ],
)
def test_wrong_inputs_name_the_input(inputs, message, library):
    _, compiled = library
    with pytest.raises(InputError, match=message):
        compiled.run(inputs)


def test_symbolic_dimensions_take_any_size(tmp_path):
    model = attention_like(tmp_path / "m.onnx")
    try:
        compiled = backend.compile(model, "llvm")
    except InputError as exc:  # TVM could not build the symbolic batch
        pytest.skip(str(exc))
    assert compiled.signature.inputs == [("x", ["batch", 16], "float32")]
    for batch in (1, 3):
        assert compiled.run({"x": np.ones((batch, 16), np.float32)})["y"].shape == (batch, 16)
    with pytest.raises(InputError, match=r"input 'x' has shape \[3, 15\], the compiled model takes \[batch, 16\]"):
        compiled.run({"x": np.ones((3, 15), np.float32)})
