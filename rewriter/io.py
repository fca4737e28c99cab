"""Loading and saving ONNX models, external data included.

Loading never modifies the input file. It refuses external data outside the model's
folder (:func:`rewriter.paths.resolve_inside`) and a model that fails
``onnx.checker`` (full check, with shape inference). Saving is atomic: the model
(and its external-data file, if any) is written into a stage folder beside the
destination and renamed into place only when complete (:mod:`rewriter.staging`), so
a failure leaves no half-written output.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from rewriter import paths, staging
from rewriter.errors import InputError, first_line, shorten

logger = logging.getLogger(__name__)

# Protobuf cannot serialize a message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 1 << 30

# Element types stored several to a byte: bits per element.
_PACKED_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(onnx.TensorProto, name)
}


def load(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX model into onnx-ir, checking it and its external data.

    Large tensors stored as external data are referenced, not read, so models over
    the 2 GB protobuf limit load in little memory. Raises :class:`InputError` for a
    missing or corrupt file, external data that is missing, truncated, of the wrong
    length or outside the model's folder, and a model ``onnx.checker`` rejects.

    >>> model = load("model.onnx")  # doctest: +SKIP
    """
    return load_with_sources(path)[0]


def load_with_sources(path: str | os.PathLike[str]) -> tuple[ir.Model, list[Path]]:
    """:func:`load`, also returning the external-data files the model reads (real paths)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable ONNX model ({first_line(exc)})") from exc
    if not proto.graph.node and not proto.graph.output:
        raise InputError(f"{path}: not an ONNX model (no graph)")
    data_files = _check_external_data(proto, path.parent)
    check_model(path)
    try:
        with gc_paused():
            model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx-ir raises several types on malformed protos
        raise InputError(f"{path}: malformed ONNX model ({first_line(exc)})") from exc
    # External tensors are memory-mapped from the input's folder, read-only.
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    return model, data_files


def check_model(path: str | os.PathLike[str], *, name: str | os.PathLike[str] | None = None) -> None:
    """Run ``onnx.checker`` (full check: shape inference too) on the model file at ``path``.

    The path form reads external data only to check it exists, so it serves models
    over 2 GB. Raises :class:`InputError` naming ``name`` (default ``path``) with
    the checker's first line.

    A path that is not UTF-8 (:func:`rewriter.paths.is_utf8`), which the checker cannot
    take, is checked as the model read into memory with its external data.

    >>> check_model("model.onnx")  # doctest: +SKIP
    """
    try:
        if paths.is_utf8(path):
            onnx.checker.check_model(os.fspath(path), full_check=True)
        else:
            onnx.checker.check_model(_read_whole(Path(path)), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError, and others from C++
        raise InputError(f"{name or path}: invalid ONNX model ({first_line(exc)})") from exc


def _read_whole(path: Path) -> onnx.ModelProto:
    """The model at ``path`` with its external data read into its tensors (Python's file
    reading takes any path; onnx's external-data loader, like the checker, UTF-8 only)."""
    proto = onnx.load(os.fspath(path), load_external_data=False)
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        with paths.resolve_inside(path.parent, info.get("location", "")).open("rb") as data:
            data.seek(int(info.get("offset", "0")))
            tensor.raw_data = data.read(int(info["length"])) if "length" in info else data.read()
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    return proto


def data_file(path: str | os.PathLike[str]) -> Path:
    """Where :func:`save` puts the external data of a model written to ``path``.

    >>> data_file("out/m.onnx").as_posix()
    'out/m.onnx.data'
    """
    path = Path(path)
    return path.with_name(path.name + ".data")


def uses_external_data(model: ir.Model) -> bool:
    """True when any initializer of the model lives in an external file."""
    return any(
        isinstance(value.const_value, ir.ExternalTensor)
        for value in model.graph.initializers.values()
    )


def external_data_dir(model: ir.Model) -> Path | None:
    """The folder the model's external-data locations are relative to (None: no external data).

    A model serialized from onnx-ir keeps its external tensors as references (locations
    relative to this folder), so ONNX Runtime, given the bytes, needs the folder too
    (:func:`rewriter.verify.session`'s ``data_dir``); the bytes then stay small however
    large the weights are.

    >>> external_data_dir(load("big/model.onnx"))  # doctest: +SKIP
    PosixPath('big')
    """
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            return Path(value.const_value.base_dir)
    return None


def save(model: ir.Model, path: str | os.PathLike[str], *, external_data: bool | None = None) -> None:
    """Write ``model`` to ``path`` atomically.

    ``external_data=None`` picks external data when the tensors are too large for one
    protobuf (or the model came with external data); the data file is
    ``<name>.data`` beside the model.

    It refuses (:class:`InputError`) a path whose model or data file is one of the
    files the model's external data is read from.

    >>> save(model, "out.onnx")  # doctest: +SKIP
    """
    path = Path(path)
    reads = [
        (f"the external data of '{value.name}'", value.const_value.path)
        for value in model.graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    ]
    paths.check_overlaps(reads, [(paths.OUTPUT_MODEL, path), (paths.OUTPUT_DATA, data_file(path))])
    with staged_output(path, companions=[data_file(path)]) as staged:
        write(model, staged, external_data=external_data)


def write(model: ir.Model, path: Path, *, external_data: bool | None = None) -> None:
    """Write ``model`` to ``path`` directly (not atomically); see :func:`save`."""
    if external_data is None:
        external_data = uses_external_data(model) or _tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
    if external_data and not paths.is_utf8(path.name):
        raise InputError(
            f"{path.name}: the output's external data would be named {path.name}.data, and ONNX stores "
            "that name as UTF-8 text: choose an output name in UTF-8"
        )
    with gc_paused():
        if external_data:
            ir.save(model, path, external_data=path.name + ".data")
        else:
            ir.save(model, path)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a graph is converted or rewritten whole.

    Converting a model between its proto and onnx-ir creates millions of live objects
    and little garbage; every collection on the way would scan the growing heap for
    nothing (a third of the load time at 100k nodes, and growing with the graph). What a
    rewrite leaves (the nodes it replaced) is collected once the collector runs again.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def staged_output(path: Path, *, companions: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a staged path for ``path``; when the block ends without error, put it in place.

    ``companions`` written beside the staged file (a model's ``.data`` file) are
    moved too, first, so a reader never sees a model whose data is missing. See
    :class:`rewriter.staging.Outputs` for several outputs at once.
    """
    with staging.Outputs() as outputs:
        staged = outputs.add(path, companions=companions)
        yield staged
        outputs.commit()


def _tensor_bytes(model: ir.Model) -> int:
    return sum(
        value.const_value.nbytes
        for value in model.graph.initializers.values()
        if value.const_value is not None
    )


def _check_external_data(proto: onnx.ModelProto, base_dir: Path) -> list[Path]:
    """Check each external tensor's location, offset and length; return the files (real paths).

    A location outside ``base_dir`` is refused before anything there is looked at.
    """
    files: dict[Path, None] = {}
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"external data of tensor '{tensor.name}'"
        if not location:
            raise InputError(f"{where}: no location given")
        try:
            data_path = paths.resolve_inside(base_dir, location)
        except InputError as exc:
            raise InputError(f"{where}: {exc}; external data must lie in the model's folder") from exc
        offset = _byte_count(info, "offset", where) or 0
        length = _byte_count(info, "length", where)
        expected = _tensor_bytes_of(tensor)
        if length is not None and expected is not None and length != expected:
            raise InputError(
                f"{where}: length {length} does not match its shape {list(tensor.dims)} "
                f"and type ({expected} bytes)"
            )
        if not data_path.is_file():
            raise InputError(f"external data file '{location}' of tensor '{tensor.name}' not found in {base_dir}")
        needed = offset + (length if length is not None else expected or 0)
        size = data_path.stat().st_size
        if size < needed:
            raise InputError(
                f"external data file '{location}' is truncated: tensor '{tensor.name}' "
                f"needs {needed} bytes, file has {size}"
            )
        files[data_path] = None
    return list(files)


def _byte_count(info: dict[str, str], key: str, where: str) -> int | None:
    """The ``offset`` or ``length`` entry of external data (None when absent)."""
    if key not in info:
        return None
    text = info[key].strip()
    if not re.fullmatch(r"[0-9]{1,20}", text):
        raise InputError(f"{where}: {key} {shorten(info[key])!r} is not a byte count")
    return int(text)


def _tensor_bytes_of(tensor: onnx.TensorProto) -> int | None:
    """The bytes the tensor's data takes, from its shape and type (None: not a fixed size)."""
    count = math.prod(tensor.dims)
    if count < 0:
        return None
    if tensor.data_type in _PACKED_BITS:
        return (count * _PACKED_BITS[tensor.data_type] + 7) // 8
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def _all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from onnx.external_data_helper._get_all_tensors(proto)

