"""Compile a rewritten model for a target, write its library, compare it with ONNX Runtime.

What ``rewrite ... --target avx512 --lib OUT.so`` adds to the report as ``compiled``:
the compiled model runs on the verification inputs and each output is compared with
ONNX Runtime's output of the *original* model (:func:`rewriter.verify.compare`). GPU
code on a machine without that GPU is built and written but not run, and the report
says so.

>>> check = check_compiled("out.onnx", "avx512", feeds=feeds, reference=ref)  # doctest: +SKIP
>>> check.passed  # doctest: +SKIP
True
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rewriter import verify
from rewriter.backends.tvm import targets

if TYPE_CHECKING:
    from rewriter.backends.tvm.tuning import Remote

logger = logging.getLogger(__name__)

# The compiled model differs from ONNX Runtime by more than the rewrite does: TVM's
# fast exp/erf/tanh polynomials (~1e-7 relative each), matmuls accumulated in another
# order (~sqrt(k) ulp, k up to a few thousand) and fused epilogues, compounded over
# ~10-20 layers. 1e-4 of the output's scale leaves an order of magnitude of room over
# what BERT-sized models show (~5e-7) and still catches a wrong kernel (errors ~1e-1).
COMPILED_TOLERANCE = {
    "float32": verify.Tolerance(rtol=1e-4, atol=1e-6),
    "float16": verify.Tolerance(rtol=1e-2, atol=1e-3),
    "bfloat16": verify.Tolerance(rtol=5e-2, atol=1e-2),
    "float64": verify.Tolerance(rtol=1e-9, atol=1e-12),
}


def _dtype_tolerance(dtype: np.dtype) -> verify.Tolerance:
    """:data:`COMPILED_TOLERANCE` by ``dtype`` alone (complex types by their component)."""
    name = verify.COMPONENT_TYPES.get(str(dtype), str(dtype))
    return COMPILED_TOLERANCE.get(name, COMPILED_TOLERANCE["float32"])


@dataclasses.dataclass
class CompiledCheck:
    """The compiled model: where it was written, and how it compares with the original."""

    target: str
    target_json: dict[str, Any]
    library: str | None
    ran: bool
    note: str | None
    inputs: dict[str, list[int]]
    outputs: list[verify.OutputComparison]
    tolerance: dict[str, float] | None
    enforced: bool
    compile_seconds: float
    # With tuning: rewriter.backends.tvm.tuning.TuningReport.to_json().
    tuning: dict[str, Any] | None = None
    # CPU targets: rewriter.backends.tvm.relax_passes.cpu_schedule.ScheduleRecord.to_json() (which rule
    # scheduled each function; the functions left to TVM's default lowering).
    schedules: dict[str, Any] | None = None
    # The input shapes the library takes: a size, or a name (any size).
    accepts: dict[str, list[int | str | None]] | None = None
    # Every feature LLVM enabled for the target (CPU code; the library's .so.json too).
    features: list[str] = dataclasses.field(default_factory=list)
    # The largest size of each bounded symbolic dimension (by name; --max-dim), which
    # the library refuses to exceed (its .so.json too).
    max_dims: dict[str, int] = dataclasses.field(default_factory=dict)
    # The smallest size of each symbolic dimension the model's windows take (by name),
    # which the library refuses to go under (its .so.json too).
    min_dims: dict[str, int] = dataclasses.field(default_factory=dict)
    # Each Relax function's storage allocations, planned statically or sized on each call
    # (rewriter.backends.tvm.relax_passes.memory_plan.StorageRecord.to_json()).
    memory: dict[str, dict[str, int]] | None = None

    @property
    def passed(self) -> bool:
        return all(output.passed is not False for output in self.outputs)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "target_json": self.target_json,
            "library": self.library,
            "ran": self.ran,
            "note": self.note,
            "inputs": self.inputs,
            "outputs": [output.to_json() for output in self.outputs],
            "tolerance": self.tolerance,
            "enforced": self.enforced,
            "passed": self.passed,
            "compile_seconds": self.compile_seconds,
            "tuning": self.tuning,
            "schedules": self.schedules,
            "accepts": self.accepts,
            "features": self.features,
            "max_dims": self.max_dims,
            "min_dims": self.min_dims,
            "memory": self.memory,
        }


def check_compiled(
    model: str | Path,
    target: str,
    *,
    feeds: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None,
    cuda_arch: str = targets.DEFAULT_CUDA_ARCH,
    library: str | Path | None = None,
    enforce: bool = True,
    say: Callable[[str], None] | None = None,
    tune: int | None = None,
    tune_db: str | Path | None = None,
    tune_seconds: float | None = None,
    dims: Mapping[str, int] | None = None,
    tune_rpc: Remote | None = None,
    max_dims: Mapping[str, int] | None = None,
) -> CompiledCheck:
    """Compile ``model`` for ``target`` and compare it with ``reference`` on ``feeds``.

    Symbolic input dimensions stay symbolic, so the library runs at any size, but those
    ``dims`` fixes (``--dim``); where TVM cannot keep them (its importer fails on many text
    models' shape arithmetic), or when tuning (MetaSchedule measures fixed shapes), every
    one is fixed to its size in ``feeds``, and the ``note`` says so. ``max_dims``
    (``--max-dim``) bounds symbolic dimensions that stay symbolic: their memory is planned
    at the bound (``memory`` counts the allocations planned statically) and the library
    refuses larger sizes. ``accepts`` records the input shapes the library takes (a name:
    any size, up to its bound in ``max_dims``).

    ``reference`` is ONNX Runtime's output of the original model on ``feeds`` (None:
    build only). ``library``: where to write the shared library (atomically, with its
    ``.json`` metadata), only when the check passed. ``enforce`` marks each float output against
    :data:`COMPILED_TOLERANCE` for the least precise float type it is computed in
    (:func:`rewriter.verify.output_tolerances`: a float16 softmax between float32 inputs
    and outputs gets float16's). ``tune``, ``tune_db``, ``tune_seconds``, ``tune_rpc``:
    MetaSchedule tuning (see :func:`rewriter.backends.tvm.compile`); its progress goes to ``say``.

    >>> check_compiled("out.onnx", "cuda", feeds=feeds, reference=None).ran  # doctest: +SKIP
    False
    """
    from rewriter.backends import tvm as backend

    say = say or (lambda message: logger.info("%s", message))
    say(f"compiling for {target} with TVM")
    start = time.perf_counter()
    options: dict[str, Any] = {
        "cuda_arch": cuda_arch, "tune": tune, "tune_db": tune_db, "tune_seconds": tune_seconds, "progress": say,
        "tune_rpc": tune_rpc,
    }
    fixed = backend.shape_dims(model, feeds)
    shapes_note = None
    if tune is not None or tune_db is not None or tune_rpc is not None:
        compiled = backend.compile(model, target, dims=fixed, **options)
    else:
        try:
            compiled = backend.compile(
                model, target, dims=dict(dims or {}), max_dims=dict(max_dims or {}), **options
            )
        except backend.SymbolicDimsError as exc:
            reason = str(exc).split(": ", 1)[-1].split("; fix them")[0]
            shapes_note = (
                f"symbolic input dimensions fixed to the verification inputs' sizes (TVM could not "
                f"keep them: {reason}); the library takes only these shapes (--dim to choose them)"
            )
            if max_dims:
                shapes_note += "; --max-dim had nothing left to bound"
            say(f"compiling for {target} with TVM at fixed shapes")
            compiled = backend.compile(model, target, dims=fixed, **options)
    seconds = time.perf_counter() - start
    note = None
    outputs: list[verify.OutputComparison] = []
    used: dict[str, float] | None = None
    ran = False
    if reference is None:
        note = "verification skipped: the compiled model was built, not run"
    elif (why := compiled.not_runnable()) is not None:
        note = f"{why}: the library was built, not run"
    else:
        say(f"verifying: running the model compiled for {target}")
        # The rewritten model may have dropped an input the original took (unused).
        candidate = compiled.run({name: feeds[name] for name in compiled.input_names if name in feeds})
        ran = True
        mask = verify.find_attention_mask(feeds)
        tolerances = verify.output_tolerances(model, COMPILED_TOLERANCE) if enforce else {}
        for name, ref in reference.items():
            comparison = verify.compare(name, ref, candidate[name], mask=mask)
            if enforce and verify.is_inexact(ref.dtype):
                chosen = tolerances.get(name) or _dtype_tolerance(ref.dtype)
                verify.check_tolerance(comparison, ref, chosen)
                if used is None or chosen.rtol > used["rtol"]:  # the report names the loosest
                    used = {"rtol": chosen.rtol, "atol": chosen.atol}
            elif enforce:
                comparison.passed = comparison.max_abs_err == 0
            outputs.append(comparison)
    if note:
        say(note)
    if shapes_note:
        note = shapes_note if note is None else f"{shapes_note}; {note}"
    check = CompiledCheck(
        target=target,
        target_json=compiled.signature.target_json,
        library=str(library) if library is not None else None,
        ran=ran,
        note=note,
        inputs={name: list(np.shape(value)) for name, value in feeds.items()},
        outputs=outputs,
        tolerance=used,
        enforced=enforce and ran,
        compile_seconds=seconds,
        tuning=compiled.tuning.to_json() if compiled.tuning is not None else None,
        schedules=compiled.schedules.to_json() if compiled.schedules is not None else None,
        accepts={name: list(shape) for name, shape, _ in compiled.signature.inputs},
        features=compiled.signature.features,
        max_dims=dict(compiled.signature.max_dims),
        min_dims=dict(compiled.signature.min_dims),
        memory=compiled.memory.to_json() if compiled.memory is not None else None,
    )
    if library is not None and check.passed:
        say(f"writing {library}")
        compiled.export(library)
    return check
