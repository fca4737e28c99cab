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
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rewriter import io, verify
from rewriter.errors import InputError, VerificationError
from rewriter.manager import PassRecord, run_pipeline
from rewriter.pass_base import PassContext, RewritePass
from rewriter.registry import parse_pipeline

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


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

    def to_json(self) -> dict[str, Any]:
        return {
            "outputs": [output.to_json() for output in self.outputs],
            "inputs": self.inputs,
            "tolerance": self.tolerance,
            "enforced": self.enforced,
            "passed": self.passed,
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
    ``tune`` (trials), ``tune_db`` and ``tune_seconds`` tune it with MetaSchedule
    first (:mod:`rewriter.backends.tvm.tuning`; CPU targets).
    """
    say = progress or (lambda message: logger.info("%s", message))
    start = time.perf_counter()
    source, destination = Path(source), Path(destination)
    if isinstance(passes, str):
        passes = parse_pipeline(passes)
    if source.resolve() == destination.resolve() and not force:
        raise InputError(f"{destination}: output would overwrite the input (use --force to allow)")
    if library is not None and target is None:
        raise InputError("--lib needs --target: the library is compiled for a target")
    tuning_options = (tune, tune_db, tune_seconds)
    flags = ("--tune", "--tune-db", "--tune-time")
    given = [flag for flag, value in zip(flags, tuning_options, strict=True) if value is not None]
    if target is None and given:
        raise InputError(f"{given[0]} needs --target: tuning measures code compiled for a target")
    if target is not None:
        from rewriter.backends.tvm import targets, tuning

        targets.target_dict(target, cuda_arch=cuda_arch)  # an unknown target fails early
        tuning.check_options(target, *tuning_options)
    say(f"loading {source}")
    model = io.load(source)
    feeds: dict[str, np.ndarray] | None = None
    if check:
        feeds = _inputs(source, inputs, dims, seed)
    context = PassContext(dims=dict(dims or {}), seed=seed, source=source)
    if isinstance(calibration, (str, Path)):
        context.calibration = [verify.load_inputs(calibration, source, what="calibration")]
    elif calibration is not None:
        verify.check_inputs(calibration, source, source="calibration data")
        context.calibration = [dict(calibration)]

    def announce(index: int, rewrite_pass: RewritePass) -> None:
        say(f"pass {index + 1}/{len(passes)}: {rewrite_pass.name}")

    result = run_pipeline(model, passes, context=context, on_pass=announce)
    records = result.records
    verification = None
    compiled = None
    with io.staged_output(destination) as staged:
        say(f"writing {destination}")
        io.write(result.model, staged)
        reference = None
        if check:
            assert feeds is not None
            say("verifying: running the original model")
            reference = verify.run(source, feeds)
            verification = _verify(staged, feeds, reference, result.exact, tolerance, say)
            if verification.enforced and not verification.passed:
                worst = max(verification.outputs, key=lambda o: o.max_rel_err)
                raise VerificationError(
                    f"exact rewrite changed output '{worst.name}': max abs err {worst.max_abs_err:.3g}, "
                    f"max rel err {worst.max_rel_err:.3g} exceed the tolerance "
                    f"(rtol {verification.tolerance['rtol']:.3g}, atol {verification.tolerance['atol']:.3g}); "  # type: ignore[index]
                    "nothing written"
                )
        if target is not None:
            compiled = _compile(
                source, staged, target, cuda_arch, library, feeds, dims, seed, reference, result.exact, say,
                tuning_options,
            )
    return Report(
        input=str(source),
        output=str(destination),
        passes=records,
        verification=verification,
        seconds=time.perf_counter() - start,
        compiled=compiled,
    )


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
) -> Any:
    """Compile the rewritten model for ``target``; raise if it disagrees with the original."""
    from rewriter.backends.tvm import verify as compile_check

    if feeds is None:  # --no-verify: compile for the shapes verification would use
        feeds = verify.make_inputs(source, dims=dims, seed=seed)
    tune, tune_db, tune_seconds = tuning_options
    compiled = compile_check.check_compiled(
        rewritten, target, feeds=feeds, reference=reference, cuda_arch=cuda_arch,
        library=library, enforce=exact, say=say, tune=tune, tune_db=tune_db, tune_seconds=tune_seconds,
    )
    if compiled.enforced and not compiled.passed:
        worst = max(compiled.outputs, key=lambda o: o.max_rel_err)
        raise VerificationError(
            f"the model compiled for {target} changed output '{worst.name}': max abs err "
            f"{worst.max_abs_err:.3g}, max rel err {worst.max_rel_err:.3g} exceed the compiled "
            f"tolerance (rtol {compiled.tolerance['rtol']:.3g}); nothing written"  # type: ignore[index]
        )
    return compiled


def _inputs(
    source: Path,
    inputs: str | Path | Mapping[str, np.ndarray] | None,
    dims: Mapping[str, int] | None,
    seed: int,
) -> dict[str, np.ndarray]:
    if inputs is None:
        return verify.make_inputs(source, dims=dims, seed=seed)
    if isinstance(inputs, (str, Path)):
        return verify.load_inputs(inputs, source)
    verify.check_inputs(inputs, source, source="inputs")
    return dict(inputs)


def _verify(
    rewritten: Path,
    feeds: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    exact: bool,
    tolerance: verify.Tolerance | None,
    say: Progress,
) -> Verification:
    say("verifying: running the rewritten model")
    candidate = verify.run(rewritten, feeds)
    outputs = []
    used: dict[str, float] | None = None
    mask = verify.find_attention_mask(feeds)
    for name, ref in reference.items():
        comparison = verify.compare(name, ref, candidate[name], mask=mask)
        if exact and np.issubdtype(ref.dtype, np.floating):
            chosen = tolerance or verify.DEFAULT_TOLERANCE.get(str(ref.dtype), verify.DEFAULT_TOLERANCE["float32"])
            verify.check_tolerance(comparison, ref, chosen)
            used = {"rtol": chosen.rtol, "atol": chosen.atol}
        elif exact:
            comparison.passed = comparison.max_abs_err == 0
        outputs.append(comparison)
    return Verification(
        outputs=outputs,
        inputs={name: list(value.shape) for name, value in feeds.items()},
        tolerance=used,
        enforced=exact,
    )
