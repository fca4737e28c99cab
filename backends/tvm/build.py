"""Compile a model with TVM: import, build, run, export and load.

:func:`compile` imports the model into Relax (:mod:`rewriter.backends.tvm.import_onnx`
or :mod:`rewriter.backends.tvm.import_torch`), runs the Relax pipeline of
:func:`rewriter.backends.tvm.pipeline.relax_pipeline` and builds the Relax VM
executable; :class:`Compiled` runs it and exports it as a shared library with a JSON
sidecar (:class:`Signature`) that :func:`load` reads back in any process.

>>> compiled = compile("model.onnx", target="avx512", dims={"batch": 1})  # doctest: +SKIP
>>> outputs = compiled.run({"x": x})  # doctest: +SKIP
>>> compiled.export("model.so")  # doctest: +SKIP
>>> load("model.so").run({"x": x})  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rewriter import verify
from rewriter.backends.tvm import (
    amx_runtime,
    cpu_features,
    parallel_cost,
    targets,
    thread_pool,
    tuning,
)
from rewriter.backends.tvm import import_onnx as onnx_import
from rewriter.backends.tvm import import_torch as torch_import
from rewriter.backends.tvm.pipeline import relax_pipeline
from rewriter.backends.tvm.relax_passes import cpu_schedule, memory_plan
from rewriter.backends.tvm.session import Session
from rewriter.errors import InputError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# The sidecar beside an exported library: what load() needs besides the code, the
# library's SHA-256 (since version 2), checked before the library is mapped, and its
# target's CPU features (version 3), checked against this CPU's before it is mapped, and
# the upper bounds of symbolic dimensions its memory is planned for (version 4) and their
# lower bounds, the smallest sizes the model's windows take (version 5), checked on every
# call. Versions 3 (no bounds) and 4 are still read; a reader of an older version refuses
# a newer one, which could hold bounds it would not check.
METADATA_SUFFIX = ".json"
METADATA_VERSION = 5
READABLE_VERSIONS = (3, 4, 5)


@dataclasses.dataclass
class Signature:
    """Names, dtypes and shapes of a compiled model's inputs, its output names, and its
    target: the preset's name, the TVM target (as a dict) and every feature LLVM enabled
    for it (:func:`cpu_features.target_features`; [] for GPU code); ``max_dims``: the
    largest size of each symbolic dimension (by name) whose memory is planned statically
    (``compile(max_dims=...)``) or that a fixed-length table of the model takes (BERT's
    512 positions; :func:`import_onnx.largest_sizes`), which a run may not exceed; ``min_dims``: the smallest
    size of each symbolic dimension that the model's convolution and pooling windows
    take (where more than 1: wav2vec2's samples >= 400; ONNX Runtime fails below it),
    which a run may not go under."""

    inputs: list[tuple[str, list[int | str | None], str]]
    outputs: list[str]
    target: str
    target_json: dict[str, Any]
    features: list[str]
    max_dims: dict[str, int] = dataclasses.field(default_factory=dict)
    min_dims: dict[str, int] = dataclasses.field(default_factory=dict)

    def accepts(self) -> str:
        """The input shapes this model takes, as text: ``images[batch, 3, 224, 224] with
        batch <= 16`` (a name without a bound: any size)."""
        shapes = ", ".join(
            f"{name}[{', '.join('?' if dim is None else str(dim) for dim in shape)}]"
            for name, shape, _ in self.inputs
        )
        bounds = verify.dimension_bounds(self.min_dims, self.max_dims)
        return f"{shapes} with {bounds}" if bounds else shapes

    def missing_features(self) -> list[str]:
        """The features the code may use that this CPU lacks (see :mod:`.cpu_features`)."""
        return cpu_features.missing(self.features)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": METADATA_VERSION,
            "inputs": [{"name": n, "shape": s, "dtype": d} for n, s, d in self.inputs],
            "outputs": self.outputs,
            "target": self.target,
            "target_json": self.target_json,
            "features": self.features,
            "max_dims": self.max_dims,
            "min_dims": self.min_dims,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Signature:
        if data.get("version") not in READABLE_VERSIONS:
            raise InputError(
                f"compiled-model metadata version {data.get('version')} is not supported "
                f"(versions {READABLE_VERSIONS[0]} to {METADATA_VERSION} hold the library's "
                "SHA-256 and CPU features): export the model again"
            )
        max_dims = data.get("max_dims", {}) if data["version"] >= 4 else {}
        min_dims = data.get("min_dims", {}) if data["version"] >= 5 else {}
        for field, bounds in (("max_dims", max_dims), ("min_dims", min_dims)):
            if not isinstance(bounds, dict) or not all(
                isinstance(bound, int) and not isinstance(bound, bool) and bound > 0
                for bound in bounds.values()
            ):
                raise TypeError(f"{field} is not a dict of positive integers: {bounds!r}")
        return cls(
            inputs=[(i["name"], list(i["shape"]), i["dtype"]) for i in data["inputs"]],
            outputs=list(data["outputs"]),
            target=data["target"],
            target_json=dict(data["target_json"]),
            features=[str(feature) for feature in data["features"]],
            max_dims={str(name): int(bound) for name, bound in max_dims.items()},
            min_dims={str(name): int(bound) for name, bound in min_dims.items()},
        )


class Compiled:
    """A model built by TVM: run it (CPU targets), or export it as a shared library."""

    def __init__(self, executable: Any, signature: Signature, *, device: str = "cpu") -> None:
        self.executable = executable
        self.signature = signature
        self.device = device
        self._vm: Any = None
        self._session: Session | None = None
        # With compile(tune=...): what the tuning stage did (a tuning.TuningReport).
        self.tuning: tuning.TuningReport | None = None
        # CPU builds: which rule scheduled each function, and which none did.
        self.schedules: cpu_schedule.ScheduleRecord | None = None
        # Each Relax function's storage allocations planned statically and at run time.
        self.memory: memory_plan.StorageRecord | None = None
        # Whether its parallel loops run on our thread pool (a loaded library), not TVM's.
        self.thread_pool = False

    @property
    def input_names(self) -> list[str]:
        return [name for name, _, _ in self.signature.inputs]

    @property
    def output_names(self) -> list[str]:
        return list(self.signature.outputs)

    @property
    def runnable(self) -> bool:
        """False for GPU code on a machine without that GPU, and for CPU code that needs
        a feature this CPU lacks."""
        return self.not_runnable() is None

    def not_runnable(self) -> str | None:
        """Why this machine cannot run the code (no such GPU; CPU features it lacks), or
        None when it can."""
        import tvm

        if not self._device(tvm).exist:
            return f"no {self.device} device on this machine"
        missing = self.signature.missing_features() if self.device == "cpu" else []
        if missing:
            return (
                f"this CPU lacks {', '.join(missing)}, which code for target {self.signature.target} "
                f"(mcpu {self.signature.target_json.get('mcpu', 'generic')}) may use"
            )
        return None

    def _device(self, tvm: Any) -> Any:
        return tvm.cuda(0) if self.device == "cuda" else tvm.cpu(0)

    def _machine(self) -> Any:
        """This model's Relax VM, made once (the benchmarks call its functions directly)."""
        if self._vm is None:
            self._vm = self._new_machine()
        return self._vm

    def _new_machine(self) -> Any:
        """A Relax VM of its own on the shared executable: a VM's registers are state, so
        two threads must never call one VM."""
        import tvm
        from tvm import relax

        why = self.not_runnable()
        if why is not None:
            raise InputError(f"{why}: the model cannot run here")
        if amx_runtime.uses_amx(self.signature.target_json):
            amx_runtime.ensure_permission()  # else the first tile instruction is SIGILL
        return relax.VirtualMachine(self.executable, self._device(tvm))

    def session(self) -> Session:
        """A :class:`Session` on a Relax VM of its own: repeated calls without copies or
        allocations (inputs through DLPack, outputs in buffers it reuses once the caller
        dropped them, or written into ``out=`` arrays); one per thread (sessions of one
        model in several threads run at once, each on its own VM). :meth:`run` uses one of its own.

        >>> session = compiled.session()  # doctest: +SKIP
        >>> for batch in batches:  # doctest: +SKIP
        ...     logits = session.run({"input_ids": batch})["logits"]
        """
        import tvm

        return Session(
            self._new_machine(), self.signature, self._device(tvm), pooled=self.thread_pool
        )

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run on ``inputs`` (numpy arrays or torch tensors, by name); returns the outputs
        by name, as numpy arrays the kernels wrote, without a copy (see :class:`Session`,
        which this calls through; a contiguous, 64-byte aligned input is read in place).

        The arrays belong to the caller, although nothing is copied: the outputs are
        written into buffers that are used again only once no array on them is alive
        (a view the caller took included), so a later call never writes over an output
        the caller still holds, and a loop that drops them allocates nothing. The
        library's ``main`` gives an output that would be a constant of the model or an
        input a buffer of its own (``relax_passes.outputs_as_params``), so writing into
        an output changes nothing in the model. Hence ``run`` shares buffers by default
        and stays safe; ``session().run(inputs, out=...)`` writes into arrays of the
        caller's. Not for concurrent calls from several threads: one session per thread.

        Raises :class:`InputError` naming the input for a missing or unknown name and
        for a dtype, rank or shape the model does not take (a symbolic dimension takes
        any size, up to its bound where it has one: ``signature.max_dims``).

        >>> compiled.run({"input_ids": ids, "attention_mask": mask})["logits"].shape  # doctest: +SKIP
        (1, 2)
        """
        if self._session is None:
            self._session = self.session()
        return self._session.run(inputs)

    def export(self, path: str | os.PathLike[str]) -> Path:
        """Write the shared library to ``path`` and its metadata to ``path + '.json'``.

        The metadata holds the signature and the library's SHA-256, which :func:`load`
        checks. Both are written atomically (a temporary file beside the destination,
        then ``os.replace``), the metadata first so a reader never sees a library
        without it.

        >>> compiled.export("bert.so")  # doctest: +SKIP
        """
        path = Path(path)
        if not path.parent.is_dir():
            raise InputError(f"{path.parent}: output folder does not exist")
        meta = Path(str(path) + METADATA_SUFFIX)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        library = Path(name)
        try:
            with _without_stderr_lines(EXPORT_NOISE):
                self.executable.export_library(str(library))
            metadata = {**self.signature.to_json(), "sha256": file_sha256(library)}
            _write_atomically(
                meta, lambda tmp: tmp.write_text(json.dumps(metadata, indent=2) + "\n")
            )
            _set_mode(library, 0o755)
            os.replace(library, path)
        finally:
            library.unlink(missing_ok=True)
        logger.info("wrote %s and %s", path, meta)
        return path

    def device_source(self) -> str | None:
        """The generated GPU source (CUDA C) of a GPU build; None for CPU targets.

        >>> "__global__" in compile(model, "cuda").device_source()  # doctest: +SKIP
        True
        """
        pending = [self.executable.mod if hasattr(self.executable, "mod") else self.executable]
        while pending:
            module = pending.pop()
            if module.kind == "cuda":
                return str(module.inspect_source())
            pending.extend(module.imports)
        return None


# TVM's VM logs one of these per constant when it saves an executable that has run (109
# for MiniLM, after the CLI's check), with an empty scope: noise that buries the report.
EXPORT_NOISE = "Warning: Scope Saving:"


@contextlib.contextmanager
def _without_stderr_lines(noise: str) -> Iterator[None]:
    """Drop the lines containing ``noise`` that C++ code writes to stderr (fd 2) inside the
    block; every other line is written to stderr after it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(True) if noise.encode() not in line]
            if kept:
                os.write(2, b"".join(kept))


def _write_atomically(path: Path, write: Any, mode: int = 0o644) -> None:
    """Write through ``write(tmp)`` to a temporary file beside ``path``, then rename it."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _set_mode(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _set_mode(path: Path, mode: int) -> None:
    """``chmod`` to ``mode`` less the umask (mkstemp makes files private, 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks, as hex.

    >>> file_sha256("bert.so")  # doctest: +SKIP
    '3f1c...'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compile(
    model: onnx_import.ModelLike | torch.export.ExportedProgram,
    target: str = "avx512",
    *,
    cuda_arch: str = targets.DEFAULT_CUDA_ARCH,
    dims: Mapping[str, int] | None = None,
    max_dims: Mapping[str, int] | None = None,
    fast_math: bool = True,
    kernel: onnx_import.KernelFactory | None = None,
    tune: int | None = None,
    tune_db: str | os.PathLike[str] | None = None,
    tune_seconds: float | None = None,
    progress: tuning.Progress | None = None,
    tune_rpc: tuning.Remote | None = None,
) -> Compiled:
    """Compile a model for ``target``: an ONNX model (path, ``onnx.ModelProto`` or
    ``onnx_ir.Model``) or a ``torch.export.ExportedProgram`` (inputs by placeholder
    name, outputs ``output_0``, ...; our fx ops lowered to our kernels).

    ``target`` is a preset of :mod:`rewriter.backends.tvm.targets`. ``dims`` fixes
    symbolic input dimensions (see :func:`onnx_import.prepare`); fixed shapes give
    faster code. ``max_dims`` bounds symbolic dimensions instead (by name, or
    ``input.axis``; none that ``dims`` fixes): the buffers they size are planned once, at
    the bound, rather than allocated on every call (``compiled.memory`` counts them), and
    a run with a larger size is refused (``signature.max_dims``; the library's metadata
    keeps them). ``fast_math`` uses TVM's polynomial ``exp``/``erf``/``tanh``
    (relative error ~1e-7). ``kernel`` overrides the two-pass softmax kernel factory.

    ``tune`` (CPU targets): tune with MetaSchedule, ``tune`` trials shared by the
    functions the database ``tune_db`` (default :func:`tuning.default_database`) has no
    record of, for at most ``tune_seconds``; then each function with a record uses its
    best schedule, unless ours was faster side by side (``tune=0`` or ``tune_db``
    alone: apply the records, tune nothing).
    ``compiled.tuning`` says what was tuned and reused; ``progress`` gets a line per batch.
    Without ``tune`` and ``tune_db`` no database is read: our schedules only.
    ``tune_rpc`` measures the candidates on the devices of a TVM RPC tracker
    (:class:`tuning.Remote`) instead of this machine.

    >>> compiled = compile("bert_tp.onnx", "avx512", dims={"batch": 1, "sequence": 128})  # doctest: +SKIP
    >>> bounded = compile("resnet18.onnx", "avx512", max_dims={"batch": 16})  # doctest: +SKIP
    >>> tuned = compile("bert_tp.onnx", "avx512", dims={"batch": 1}, tune=64)  # doctest: +SKIP
    """
    from tvm import relax

    tvm_target = targets.resolve(target, cuda_arch=cuda_arch)
    tuning.check_options(target, tune, tune_db, tune_seconds, tune_rpc)
    tuner = None
    if tune is not None or tune_db is not None:
        tuner = tuning.Tuner(tune or 0, tune_db, tune_seconds, progress, remote=tune_rpc)
    bounds: dict[str, int] = {}
    smallest: dict[str, int] = {}  # torch.export states its own bounds (Dim(min=...))
    if torch_import.is_exported_program(model):
        if max_dims:
            raise InputError(
                "max_dims applies to ONNX models; bound a torch.export dimension with "
                "torch.export.Dim(name, max=...)"
            )
        inputs, outputs = torch_import.signature(model)
        source: Any = model
    else:
        shapes = input_shapes(model) if dims or max_dims else {}
        if dims:  # a name that matches no axis would be ignored: the library left symbolic
            verify.check_dims(shapes, dims, option="dims")
        if max_dims:
            bounds = verify.check_max_dims(shapes, max_dims, dims)
        source = onnx_import.prepare(model, dims=dims, gpu=targets.is_gpu(target))
        inputs = onnx_import.input_signature(source)
        outputs = [output.name for output in source.graph.output]
        smallest = onnx_import.smallest_sizes(source)
    signature = Signature(
        inputs=inputs,
        outputs=outputs,
        target=target,
        target_json=targets.target_dict(target, cuda_arch=cuda_arch),
        features=cpu_features.target_features(tvm_target),
        max_dims=dict(bounds),  # and the tables' bounds, which do not plan memory
        min_dims=smallest,
    )
    symbolic = [
        f"{name}[{axis}]={dim or '?'}"
        for name, shape, _ in signature.inputs
        for axis, dim in enumerate(shape)
        if not isinstance(dim, int) or dim <= 0
    ]
    try:
        if torch_import.is_exported_program(source):
            mod = torch_import.import_exported_program(source, target=tvm_target, kernel=kernel)
        else:
            try:
                mod = onnx_import.import_onnx(source, target=tvm_target, kernel=kernel)
            except InputError:
                raise
            except Exception as exc:
                if symbolic:
                    raise
                raise UnsupportedModelError(
                    f"TVM cannot import the model: {_importer_failure(exc, source)}"
                ) from exc
            # Past a fixed-length table's end (BERT's 512 positions) ONNX Runtime fails
            # and the library would read past it: refused as the bounds given are.
            for name, largest in onnx_import.largest_sizes(mod).items():
                signature.max_dims[name] = min(largest, signature.max_dims.get(name, largest))
        mod = memory_plan.bound_dims(mod, bounds)
        record = cpu_schedule.ScheduleRecord()
        storage = memory_plan.StorageRecord()
        pipeline = relax_pipeline(
            tvm_target, fast_math=fast_math, tuner=tuner, record=record, storage=storage
        )
        # CPU: TVM's TIR pipeline, small parallel loops kept on the calling thread.
        tir_pipeline = "default" if targets.is_gpu(target) else parallel_cost.pipeline_name()
        executable = relax.build(
            mod, target=tvm_target, relax_pipeline=pipeline, tir_pipeline=tir_pipeline
        )
    except InputError:
        raise
    except Exception as exc:
        if not symbolic:
            raise
        # TVM's importer and VM shape lowering fail on many data-dependent shapes.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise SymbolicDimsError(
            f"TVM cannot compile the model with symbolic input dimensions "
            f"({', '.join(symbolic)}): {first}; fix them with dims= (CLI: --dim NAME=VALUE)"
        ) from exc
    compiled = Compiled(executable, signature, device="cuda" if targets.is_gpu(target) else "cpu")
    compiled.tuning = tuner.report if tuner is not None else None
    compiled.schedules = None if targets.is_gpu(target) else record
    compiled.memory = storage
    return compiled


def _importer_failure(exc: BaseException, proto: Any) -> str:
    """TVM's importer error in one line, naming the ONNX operator where it names a node."""
    import re

    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = next(
        (line for line in lines if line.startswith("Node ")),
        lines[-1] if lines else type(exc).__name__,
    )
    found = re.match(r"Node (\S+)", text)
    if found:
        op_types = {node.name: node.op_type for node in getattr(proto.graph, "node", [])}
        op_type = op_types.get(found.group(1))
        if op_type:
            text = f"{op_type} {text}"
    return text


class UnsupportedModelError(InputError):
    """TVM's ONNX importer cannot convert the model (an operator or a form of it that it
    lacks); the error names the operator."""


class SymbolicDimsError(InputError):
    """TVM could not compile the model with its symbolic input dimensions kept (its importer
    and VM shape lowering fail on many exporters' shape arithmetic); fixed ``dims`` may."""


def load(path: str | os.PathLike[str], device: str = "cpu") -> Compiled:
    """Load a library written by :meth:`Compiled.export` (in any process).

    Loading a library runs its native code in this process: load only libraries you
    built or trust. The library's SHA-256 is checked against its ``.json`` metadata
    first, so a truncated or altered file is an :class:`InputError`, not a crash
    (a library cut short can kill the process with SIGBUS when mapped); the check
    guards against accidents, not against someone who can rewrite both files.

    >>> load("bert.so").run({"input_ids": ids, "attention_mask": mask})  # doctest: +SKIP
    """
    import tvm

    path = Path(path)
    meta = Path(str(path) + METADATA_SUFFIX)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if not meta.is_file():
        raise InputError(f"{meta}: metadata of the compiled model not found (written by export)")
    try:
        metadata = json.loads(meta.read_text())
        signature = Signature.from_json(metadata)
        expected = metadata["sha256"]
        if not isinstance(expected, str):
            raise TypeError("sha256 is not a string")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{meta}: unreadable metadata ({exc})") from exc
    if device not in ("cpu", "cuda"):
        raise InputError(f"device {device!r}: expected cpu or cuda")
    if file_sha256(path) != expected:
        raise InputError(
            f"{path}: the library does not match the SHA-256 in {meta.name} "
            "(truncated or changed since export); not loaded"
        )
    missing = signature.missing_features() if device == "cpu" else []
    if missing:  # its code would die of an illegal instruction
        raise InputError(
            f"{path}: built for target {signature.target} "
            f"(mcpu {signature.target_json.get('mcpu', 'generic')}), whose code may use "
            f"{', '.join(missing)}, which this CPU lacks; not loaded (compile it again with "
            "--target native)"
        )
    try:
        executable = tvm.runtime.load_module(str(path))
    except Exception as exc:  # TVM's loader raises its own error types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path}: cannot load the library ({first})") from exc
    compiled = Compiled(executable, signature, device=device)
    compiled.thread_pool = device == "cpu" and thread_pool.install(path)
    return compiled


def compile_and_run(
    model: onnx_import.ModelLike,
    inputs: Mapping[str, np.ndarray],
    target: str = "avx512",
    **options: Any,
) -> dict[str, np.ndarray]:
    """Compile ``model`` for the shapes of ``inputs`` and run it once (a test helper)."""
    compiled = compile(model, target, dims=shape_dims(model, inputs), **options)
    return compiled.run(inputs)


def shape_dims(model: onnx_import.ModelLike, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    """``dims`` that fix each symbolic input dimension of ``model`` to the size in ``inputs``.

    >>> shape_dims("bert.onnx", {"input_ids": np.zeros((1, 8), np.int64)})  # doctest: +SKIP
    {'input_ids.0': 1, 'input_ids.1': 8}
    """
    dims: dict[str, int] = {}
    for name, shape, _ in onnx_import.input_signature(_graph_proto(model)):
        if name not in inputs:
            continue
        for axis, (dim, size) in enumerate(zip(shape, inputs[name].shape, strict=False)):
            if not isinstance(dim, int) or dim <= 0:
                dims[f"{name}.{axis}"] = int(size)
    return dims


def input_shapes(model: onnx_import.ModelLike) -> dict[str, list[int | str | None]]:
    """Each input's dimensions (a size, a symbolic name, or None) by name, as the model
    declares them (its weights are not read).

    >>> input_shapes("resnet18.onnx")  # doctest: +SKIP
    {'images': ['batch', 3, 224, 224]}
    """
    return {name: shape for name, shape, _ in onnx_import.input_signature(_graph_proto(model))}


def _graph_proto(model: onnx_import.ModelLike) -> Any:
    """``model`` as an ``onnx.ModelProto`` (a file's external data not loaded)."""
    import onnx
    import onnx_ir as ir

    if isinstance(model, ir.Model):
        return ir.serde.serialize_model(model)
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model), load_external_data=False)
