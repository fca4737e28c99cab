"""Loading and saving ONNX models, external data included.

Loading never modifies the input file. Saving is atomic: the model (and its
external-data file, if any) is written into a temporary folder beside the
destination and renamed into place only when complete, so a failure leaves no
half-written output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from rewriter.errors import InputError

logger = logging.getLogger(__name__)

# Protobuf cannot serialize a message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 1 << 30


def load(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX model into onnx-ir, checking its external data is present.

    Large tensors stored as external data are referenced, not read, so models over
    the 2 GB protobuf limit load in little memory.

    >>> model = load("model.onnx")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from exc
    if not proto.graph.node and not proto.graph.output:
        raise InputError(f"{path}: not an ONNX model (no graph)")
    _check_external_data(proto, path.parent)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx-ir raises several types on malformed protos
        raise InputError(f"{path}: malformed ONNX model ({_first_line(exc)})") from exc
    # External tensors are memory-mapped from the input's folder, read-only.
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    return model


def uses_external_data(model: ir.Model) -> bool:
    """True when any initializer of the model lives in an external file."""
    return any(
        isinstance(value.const_value, ir.ExternalTensor)
        for value in model.graph.initializers.values()
    )


def save(model: ir.Model, path: str | os.PathLike[str], *, external_data: bool | None = None) -> None:
    """Write ``model`` to ``path`` atomically.

    ``external_data=None`` picks external data when the tensors are too large for one
    protobuf (or the model came with external data); the data file is
    ``<name>.data`` beside the model.

    >>> save(model, "out.onnx")  # doctest: +SKIP
    """
    path = Path(path)
    with staged_output(path) as staged:
        write(model, staged, external_data=external_data)


def write(model: ir.Model, path: Path, *, external_data: bool | None = None) -> None:
    """Write ``model`` to ``path`` directly (not atomically); see :func:`save`."""
    if external_data is None:
        external_data = uses_external_data(model) or _tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
    if external_data:
        ir.save(model, path, external_data=path.name + ".data")
    else:
        ir.save(model, path)


@contextlib.contextmanager
def staged_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename everything written there.

    Files written next to the staged model (its ``.data`` file) are moved too, data
    first, so a reader never sees a model whose data is missing.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: output folder does not exist")
    stage_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = stage_dir / path.name
        yield staged
        for extra in sorted(stage_dir.iterdir()):
            if extra != staged:
                os.replace(extra, path.parent / extra.name)
        os.replace(staged, path)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)


def _tensor_bytes(model: ir.Model) -> int:
    return sum(
        value.const_value.nbytes
        for value in model.graph.initializers.values()
        if value.const_value is not None
    )


def _check_external_data(proto: onnx.ModelProto, base_dir: Path) -> None:
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        data_path = (base_dir / location).resolve()
        if not location or not data_path.is_file():
            raise InputError(
                f"external data file '{location}' of tensor '{tensor.name}' not found in {base_dir}"
            )
        needed = int(info.get("offset", 0)) + int(info.get("length", 0))
        if data_path.stat().st_size < needed:
            raise InputError(
                f"external data file '{location}' is truncated: tensor '{tensor.name}' "
                f"needs {needed} bytes, file has {data_path.stat().st_size}"
            )


def _all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from onnx.external_data_helper._get_all_tensors(proto)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
