"""Helpers of the fault tests (``test_faults_*.py``): small models, folder snapshots, and
the check that a refused run printed one clean line and touched nothing."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.cli import main


def same_code_env() -> dict[str, str]:
    """The environment for a child Python that imports the same ``rewriter`` as this process."""
    import rewriter

    root = str(Path(rewriter.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def attention_like(path: Path, *, location: str | None = None, opset: int = 17) -> Path:
    """MatMul -> Softmax -> MatMul with a 16 x 16 weight and a symbolic batch.

    With ``location`` the weight is external data in that file (relative to the model).
    """
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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if location is None:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, location=location, size_threshold=0)
    return path


def set_external_data(path: Path, **entries: str) -> None:
    """Rewrite the external-data entries (location, offset, length) of the model's weight."""
    proto = onnx.load(str(path), load_external_data=False)
    (weight,) = proto.graph.initializer
    values = {entry.key: entry.value for entry in weight.external_data} | entries
    del weight.external_data[:]
    for key, value in values.items():
        weight.external_data.add(key=key, value=value)
    onnx.save_model(proto, str(path))


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too): its SHA-256, link target or 'dir'."""
    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                state[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                state[key] = "dir"
            elif not path.is_file():
                state[key] = "special"  # a FIFO: reading it would block
            else:
                state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def run_cli(argv: Sequence[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """``rewrite ARGV`` in this process: the exit code and the lines on stderr."""
    try:
        code = main([str(arg) for arg in argv])
    except SystemExit as exc:  # argparse's errors exit
        code = int(exc.code or 0)
    return code, capsys.readouterr().err.strip().splitlines()


def assert_refused(code: int, lines: list[str], match: str, *, exit_code: int = 2) -> None:
    """Exit 2 (or ``exit_code``) with exactly one ``rewrite: error:`` line matching ``match``."""
    assert code == exit_code, lines
    assert len(lines) == 1 and lines[0].startswith("rewrite: error: "), lines
    assert re.search(match, lines[0]), lines[0]
