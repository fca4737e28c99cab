"""The rewrite job behind the CLI: load, rewrite, verify, save atomically, report.

>>> from rewriter.job import rewrite_file
>>> report = rewrite_file("model.onnx", "out.onnx", "two-pass-softmax")  # doctest: +SKIP
>>> report.verification.passed  # doctest: +SKIP
True
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from rewriter import io, paths, staging, verify
from rewriter.errors import InputError, RewriterError, VerificationError, shorten
from rewriter.manager import PassRecord, PipelineResult, run_pipeline
from rewriter.pass_base import PassContext, RewritePass
from rewriter.registry import parse_pipeline

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

# numpy's seeds are 32-bit.
MAX_SEED = 2**32 - 1


@dataclasses.dataclass
class Verification:
    """The comparison of the rewritten model with the original on the same inputs."""

    outputs: list[verify.OutputComparison]
    inputs: dict[str, list[int]]
    tolerance: dict[str, float] | None
    enforced: bool

    @property
    def passed(self) -> bool:
        return all(output.passed is not False for output in self.outputs)

    @property
    def warnings(self) -> list[str]:
        """Outputs whose comparison proves nothing (constant in the original), one line each."""
        return [output.warning for output in self.outputs if output.warning]

    def to_json(self) -> dict[str, Any]:
        return {
            "outputs": [output.to_json() for output in self.outputs],
            "inputs": self.inputs,
            "tolerance": self.tolerance,
            "enforced": self.enforced,
            "passed": self.passed,
            "warnings": self.warnings,
        }


@dataclasses.dataclass
class Report:
    """What a rewrite did; ``to_json`` gives the ``--report-json`` document."""

    input: str
    output: str
    passes: list[PassRecord]
    verification: Verification | None
    seconds: float
    # With a --target: the compiled model (rewriter.backends.tvm.verify.CompiledCheck).
    compiled: Any = None

    @property
    def exact(self) -> bool:
        return all(record.exact for record in self.passes)

    def to_json(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "output": self.output,
            "exact": self.exact,
            "passes": [dataclasses.asdict(record) for record in self.passes],
            "verification": self.verification.to_json() if self.verification else None,
            "compiled": self.compiled.to_json() if self.compiled is not None else None,
            "seconds": self.seconds,
        }

    def write_json(self, path: str | Path) -> None:
        with io.staged_output(Path(path)) as staged:
            staged.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def rewrite_file(
    source: str | Path,
    destination: str | Path,
    passes: str | Sequence[RewritePass],
    *,
    inputs: str | Path | Mapping[str, np.ndarray] | None = None,
    calibration: str | Path | Mapping[str, np.ndarray] | None = None,
    dims: Mapping[str, int] | None = None,
    max_dims: Mapping[str, int] | None = None,
    seed: int = 0,
    check: bool = True,
    tolerance: verify.Tolerance | None = None,
    force: bool = False,
    progress: Progress | None = None,
    target: str | None = None,
    library: str | Path | None = None,
    cuda_arch: str = "sm_90",
    tune: int | None = None,
    tune_db: str | Path | None = None,
    tune_seconds: float | None = None,
    report_json: str | Path | None = None,
    protect: Mapping[str, str | Path] | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    tune_rpc: str | None = None,
    tune_key: str | None = None,
) -> Report:
    """Rewrite the model at ``source`` with ``passes`` and write it to ``destination``.

    With ``check`` the original and the rewritten model run on the same inputs
    (``inputs``: an ``.npz`` path or arrays; else generated with ``dims`` and
    ``seed``); an exact pipeline whose outputs differ beyond ``tolerance`` raises
    :class:`VerificationError` and writes nothing. ``calibration`` (an ``.npz``
    path or arrays, checked against the model's inputs) is what passes that measure
    the model calibrate on.

    With ``target`` (a preset of :mod:`rewriter.backends.tvm.targets`) the rewritten
    model is also compiled with TVM for the verification inputs' shapes, run, and
    compared with ONNX Runtime on the original (``Report.compiled``); ``library``
    is where its shared library goes (written only if that check passes).
    ``max_dims`` (``--max-dim``) bounds symbolic dimensions the library keeps: its memory
    is planned at the bounds and it refuses larger sizes; generated inputs stay within
    them.
    ``tune`` (trials), ``tune_db`` and ``tune_seconds`` tune it with MetaSchedule
    first (:mod:`rewriter.backends.tvm.tuning`; CPU targets); ``tune_rpc``
    (``HOST:PORT`` of a TVM RPC tracker) and ``tune_key`` measure the candidates on the
    devices registered there under that key.

    ``workers`` (a local Ray with that many one-CPU workers) or ``ray_address`` (a Ray
    cluster to join) spread the measuring passes' evaluations (prune's distortion
    curves, quantize's LIM importance per calibration batch) over Ray
    (:mod:`rewriter.distributed`; the ``distributed`` extra): the same result as the
    serial run, which runs without them.

    Every output (the model and its ``.data`` file, ``library`` and its ``.json``,
    ``report_json``, the plots of passes with a ``plot`` option) is written, or none
    is: before any work each is checked against every file the job reads (the model,
    its external data, ``inputs``, ``calibration`` and the ``protect`` files, e.g. the
    pipeline file, by role) and against the others, and all are renamed into place
    together at the end (:mod:`rewriter.staging`). ``force`` lets the output model
    replace the input model, nothing else.
    """
    say = progress or (lambda message: logger.info("%s", message))
    start = time.perf_counter()
    source = Path(source)
    if isinstance(passes, str):
        passes = parse_pipeline(passes)
    tuning_options = (tune, tune_db, tune_seconds)
    remote = _check_options(seed, tolerance, target, library, cuda_arch, tuning_options, (tune_rpc, tune_key))
    if max_dims and target is None:
        raise InputError("--max-dim needs --target: it bounds the memory of the compiled model")
    if max_dims and any(option is not None for option in (*tuning_options, tune_rpc)):
        raise InputError(
            "--max-dim: tuning compiles at the verification inputs' fixed shapes, which leaves "
            "nothing to bound (drop --max-dim, or the tuning options)"
        )
    if workers is not None or ray_address is not None:
        from rewriter import distributed

        distributed.Pool(workers, ray_address)  # a bad count, or no Ray, fails before any work
    plots = {rewrite_pass: rewrite_pass.options.plot for rewrite_pass in passes if getattr(rewrite_pass.options, "plot", "")}
    writes = _writes(destination, library, report_json, plots)
    reads = [(paths.INPUT_MODEL, source), *_file_reads(inputs, calibration, protect)]
    paths.check_overlaps(reads, writes, force=force)
    with staging.Outputs() as outputs:
        staged_model = outputs.add(destination, role=paths.OUTPUT_MODEL, companions=[io.data_file(destination)])
        staged_library = None
        if library is not None:
            staged_library = outputs.add(library, role="--lib", companions=[_metadata_file(library)])
        staged_report = outputs.add(report_json, role="--report-json") if report_json is not None else None
        staged_plots = {rewrite_pass: outputs.add(plot, role="--plot") for rewrite_pass, plot in plots.items()}
        destination = Path(destination)

        say(f"loading {source}")
        model, data_files = io.load_with_sources(source)
        verify.check_dims(_input_shapes(model), dims or {})
        bounds = verify.check_max_dims(_input_shapes(model), max_dims or {}, dims)
        reads += [("the input's external data", path) for path in data_files]
        paths.check_overlaps(reads, writes, force=force)
        feeds: dict[str, np.ndarray] | None = None
        reference = None
        if check:
            feeds = _inputs(source, inputs, dims, seed, bounds)
            say("verifying: running the original model")
            reference = verify.run_original(source, feeds, generated=inputs is None)
        context = PassContext(
            dims=dict(dims or {}), seed=seed, source=source, workers=workers, ray_address=ray_address
        )
        context.calibration = _calibration(source, calibration)

        result = _run_passes(model, passes, context, staged_plots, say)
        records = result.records
        verification = None
        compiled = None
        say(f"writing {destination}")
        io.write(result.model, staged_model)
        try:
            io.check_model(staged_model, name=destination)
        except InputError as exc:
            raise RewriterError(f"the rewritten model fails the ONNX checker: {exc}; nothing written") from exc
        if check:
            assert feeds is not None and reference is not None
            defaults = verify.output_tolerances(source) if tolerance is None else {}
            verification = _verify(staged_model, feeds, reference, result.exact, tolerance or defaults, say)
            if verification.enforced and not verification.passed:
                raise _verification_error(verification)
        if target is not None:
            compiled = _compile(
                source, staged_model, target, cuda_arch, staged_library, feeds, dims, seed, reference,
                result.exact, say, tuning_options, remote, bounds,
            )
            if library is not None:
                compiled.library = str(library)
        report = Report(
            input=str(source),
            output=str(destination),
            passes=records,
            verification=verification,
            seconds=time.perf_counter() - start,
            compiled=compiled,
        )
        if staged_report is not None:
            staged_report.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        outputs.commit()
    return report


def _calibration(
    source: Path, calibration: str | Path | Mapping[str, np.ndarray] | None
) -> list[dict[str, np.ndarray]]:
    """The calibration batches given (none: the passes generate one), checked."""
    if calibration is None:
        return []
    if isinstance(calibration, (str, Path)):
        batch = verify.load_inputs(calibration, source, what="calibration")
        verify.check_calibration(batch, source=str(calibration))
        return [batch]
    verify.check_inputs(calibration, source, source="calibration data")
    verify.check_calibration(calibration, source="calibration data")
    return [dict(calibration)]


def _verification_error(verification: Verification) -> VerificationError:
    """The error of an exact rewrite that failed verification, naming its worst output."""
    worst = max((o for o in verification.outputs if o.passed is False), key=lambda o: o.max_row_rel_err)
    tolerance = worst.tolerance or verification.tolerance or {}
    return VerificationError(
        f"exact rewrite changed output '{worst.name}': max abs err {worst.max_abs_err:.3g}, "
        f"max rel err {worst.max_rel_err:.3g} (worst row {worst.max_row_rel_err:.3g}) exceed the "
        f"per-row tolerance (rtol {tolerance.get('rtol', math.nan):.3g}, "
        f"atol {tolerance.get('atol', math.nan):.3g}); nothing written"
    )


def _check_options(
    seed: int,
    tolerance: verify.Tolerance | None,
    target: str | None,
    library: str | Path | None,
    cuda_arch: str,
    tuning_options: tuple[int | None, str | Path | None, float | None],
    rpc: tuple[str | None, str | None] = (None, None),
) -> Any:
    """Refuse option values that cannot work, before anything is read or written.

    Returns the tuning's RPC devices (a ``rewriter.backends.tvm.tuning.Remote``) or None.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InputError(f"--seed {shorten(str(seed))}: expected an integer from 0 to 2**32 - 1")
    if tolerance is not None:
        for name, value in (("--rtol", tolerance.rtol), ("--atol", tolerance.atol)):
            if not math.isfinite(value) or value < 0:
                raise InputError(f"{name} {value}: expected a finite number >= 0")
    if library is not None and target is None:
        raise InputError("--lib needs --target: the library is compiled for a target")
    flags = ("--tune", "--tune-db", "--tune-time", "--tune-rpc", "--tune-key")
    given = [flag for flag, value in zip(flags, (*tuning_options, *rpc), strict=True) if value is not None]
    if target is None and given:
        raise InputError(f"{given[0]} needs --target: tuning measures code compiled for a target")
    if rpc[1] is not None and rpc[0] is None:
        raise InputError("--tune-key needs --tune-rpc HOST:PORT: the tracker the key is registered with")
    remote = None
    if target is not None:
        from rewriter.backends.tvm import targets, tuning

        targets.target_dict(target, cuda_arch=cuda_arch)  # an unknown target fails early
        remote = tuning.Remote.parse(rpc[0], rpc[1]) if rpc[0] is not None else None
        tuning.check_options(target, *tuning_options, remote)
    return remote


def _writes(
    destination: str | Path,
    library: str | Path | None,
    report_json: str | Path | None,
    plots: Mapping[RewritePass, str],
) -> list[tuple[str, str | Path]]:
    """Every file the job may write, by role (the data file whether or not it is needed).
    The output model's location is checked first: its data file's name is derived from
    it (``-o .`` has no file name to derive one from)."""
    paths.check_output_location(destination, paths.OUTPUT_MODEL)
    writes: list[tuple[str, str | Path]] = [
        (paths.OUTPUT_MODEL, destination),
        (paths.OUTPUT_DATA, io.data_file(destination)),
    ]
    if library is not None:
        writes += [("--lib", library), ("the library's metadata", _metadata_file(library))]
    if report_json is not None:
        writes.append(("--report-json", report_json))
    writes += [(f"the plot of {rewrite_pass.name}", plot) for rewrite_pass, plot in plots.items()]
    return writes


def _file_reads(
    inputs: str | Path | Mapping[str, np.ndarray] | None,
    calibration: str | Path | Mapping[str, np.ndarray] | None,
    protect: Mapping[str, str | Path] | None,
) -> list[tuple[str, str | Path]]:
    """The files given as options that the job reads, by role."""
    reads: list[tuple[str, str | Path]] = []
    if isinstance(inputs, (str, Path)):
        reads.append(("--inputs", inputs))
    if isinstance(calibration, (str, Path)):
        reads.append(("--calibration", calibration))
    reads += [(role, path) for role, path in (protect or {}).items() if path is not None]
    return reads


def _metadata_file(library: str | Path) -> Path:
    """The ``.json`` beside a compiled library (``Compiled.export`` writes it)."""
    return Path(str(library) + ".json")


def _run_passes(
    model: ir.Model,
    passes: Sequence[RewritePass],
    context: PassContext,
    staged_plots: Mapping[RewritePass, Path],
    say: Progress,
) -> PipelineResult:
    """Run the pipeline with each pass's plot going to its staged path."""

    def announce(index: int, rewrite_pass: RewritePass) -> None:
        say(f"pass {index + 1}/{len(passes)}: {rewrite_pass.name}")

    final = {rewrite_pass: rewrite_pass.options.plot for rewrite_pass in staged_plots}
    for rewrite_pass, staged in staged_plots.items():
        rewrite_pass.options.plot = str(staged)
    try:
        result = run_pipeline(model, passes, context=context, on_pass=announce)
    except ir.passes.PreconditionError as exc:
        raise InputError(shorten(" ".join(str(exc).split()), 500)) from exc
    finally:
        for rewrite_pass, plot in final.items():
            rewrite_pass.options.plot = plot
    for record in result.records:  # notes name the plot where it will be
        for rewrite_pass, staged in staged_plots.items():
            record.notes = [note.replace(str(staged), final[rewrite_pass]) for note in record.notes]
    return result


def _compile(
    source: Path,
    rewritten: Path,
    target: str,
    cuda_arch: str,
    library: str | Path | None,
    feeds: dict[str, np.ndarray] | None,
    dims: Mapping[str, int] | None,
    seed: int,
    reference: dict[str, np.ndarray] | None,
    exact: bool,
    say: Progress,
    tuning_options: tuple[int | None, str | Path | None, float | None] = (None, None, None),
    remote: Any = None,
    max_dims: Mapping[str, int] | None = None,
) -> Any:
    """Compile the rewritten model for ``target``; raise if it disagrees with the original."""
    from rewriter.backends.tvm import verify as compile_check

    if feeds is None:  # --no-verify: compile for the shapes verification would use
        feeds = verify.make_inputs(source, dims=dims, seed=seed, max_dims=max_dims)
    tune, tune_db, tune_seconds = tuning_options
    compiled = compile_check.check_compiled(
        rewritten, target, feeds=feeds, reference=reference, cuda_arch=cuda_arch,
        library=library, enforce=exact, say=say, tune=tune, tune_db=tune_db, tune_seconds=tune_seconds,
        dims=dims,
        tune_rpc=remote,
        max_dims=max_dims,
    )
    if compiled.enforced and not compiled.passed:
        worst = max(compiled.outputs, key=lambda o: o.max_rel_err)
        raise VerificationError(
            f"the model compiled for {target} changed output '{worst.name}': max abs err "
            f"{worst.max_abs_err:.3g}, max rel err {worst.max_rel_err:.3g} exceed the compiled "
            f"tolerance (rtol {compiled.tolerance['rtol']:.3g}); nothing written"  # type: ignore[index]
        )
    return compiled


def _input_shapes(model: ir.Model) -> dict[str, list[int | str | None]]:
    """Each graph input's dimensions (a size, a symbolic name, or None), by name."""
    shapes: dict[str, list[int | str | None]] = {}
    for value in model.graph.inputs:
        if value.name in model.graph.initializers or value.shape is None:
            continue
        shapes[value.name or ""] = [dim if isinstance(dim, int) else dim.value for dim in value.shape]
    return shapes


def _inputs(
    source: Path,
    inputs: str | Path | Mapping[str, np.ndarray] | None,
    dims: Mapping[str, int] | None,
    seed: int,
    max_dims: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    if inputs is None:
        return verify.make_inputs(source, dims=dims, seed=seed, max_dims=max_dims)
    if isinstance(inputs, (str, Path)):
        return verify.load_inputs(inputs, source)
    verify.check_inputs(inputs, source, source="inputs")
    return dict(inputs)


def _verify(
    rewritten: Path,
    feeds: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    exact: bool,
    tolerance: verify.Tolerance | Mapping[str, verify.Tolerance],
    say: Progress,
) -> Verification:
    """Compare the rewritten model with the original's outputs ``reference``; an ``exact``
    rewrite's float outputs are checked against ``tolerance`` (``--rtol``/``--atol``), or
    per output name (:func:`rewriter.verify.output_tolerances`), else by dtype."""
    say("verifying: running the rewritten model")
    candidate = verify.run(rewritten, feeds)
    outputs = []
    used: dict[str, float] | None = None
    mask = verify.find_attention_mask(feeds)
    for name, ref in reference.items():
        comparison = verify.compare(name, ref, candidate[name], mask=mask)
        if exact and verify.is_inexact(ref.dtype):
            chosen = tolerance if isinstance(tolerance, verify.Tolerance) else tolerance.get(name)
            chosen = chosen or verify.default_tolerance(str(ref.dtype))
            verify.check_tolerance(comparison, ref, chosen)
            if used is None or chosen.rtol > used["rtol"]:  # the report names the loosest
                used = {"rtol": chosen.rtol, "atol": chosen.atol}
        elif exact:
            comparison.passed = comparison.max_abs_err == 0
        if exact and comparison.rewritten_shape is not None:
            comparison.passed = False
        if comparison.warning:
            logger.warning("%s", comparison.warning)
        outputs.append(comparison)
    return Verification(
        outputs=outputs,
        inputs={name: list(value.shape) for name, value in feeds.items()},
        tolerance=used,
        enforced=exact,
    )
