"""The ``rewrite`` command line.

    rewrite MODEL.onnx --passes two-pass-softmax -o OUT.onnx [--report-json R.json]
    rewrite MODEL.onnx --passes two-pass-softmax -o OUT.onnx --target avx512 --lib OUT.so
    rewrite MODEL.onnx --passes two-pass-softmax -o OUT.onnx --target avx512 --lib OUT.so --max-dim batch=16
    rewrite MODEL.onnx --passes two-pass-softmax -o OUT.onnx --target avx512 --tune 64 --tune-time 600
    rewrite MODEL.onnx --passes prune --calibration CAL.npz -o OUT.onnx --workers 8
    rewrite --list-passes

Exit codes: 0 success; 2 bad input (one line on stderr, no output file);
3 an exact pipeline failed verification (no output file); 130 interrupted (Ctrl-C) and
143 terminated (SIGTERM), no output file either way; 1 an internal error.

The console script enters through :mod:`rewriter.entry`, which handles both signals
while this module is imported; :func:`main` handles them for the run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from rewriter import registry, verify
from rewriter.errors import InputError, RewriterError, shorten
from rewriter.job import MAX_SEED, Report, rewrite_file
from rewriter.pass_base import RewritePass

# One error line at most this long: a message that echoes a huge argument is cut.
MAX_ERROR_CHARS = 1000


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, each argument it echoes shortened."""

    def error(self, message: str) -> NoReturn:
        words = " ".join(shorten(word) for word in message.split(" "))
        self.exit(2, f"{self.prog}: error: {_one_line(words)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rewrite",
        description="Rewrite an ONNX model with verified passes.",
        epilog="Pass options: NAME(key=value,...), e.g. --passes 'two-pass-softmax(log_softmax=false)'. "
        "Exit codes: 0 success, 2 bad input, 3 an exact rewrite failed verification, 130 interrupted, "
        "143 terminated (no output is written unless the exit code is 0), 1 an internal error.",
    )
    parser.add_argument("model", nargs="?", help="input ONNX model (never modified)")
    parser.add_argument("-o", "--output", help="where to write the rewritten model")
    passes = parser.add_mutually_exclusive_group()
    passes.add_argument("--passes", help="comma-separated pass list, NAME or NAME(key=value,...)")
    passes.add_argument("--pipeline", help="TOML pipeline file with [[pass]] tables")
    parser.add_argument("--list-passes", action="store_true", help="list the available passes and exit")
    parser.add_argument("--report-json", metavar="PATH", help="write the report as JSON")
    parser.add_argument("--no-verify", action="store_true", help="skip running the models to compare them")
    parser.add_argument("--inputs", metavar="NPZ", help="verification inputs (.npz keyed by input name)")
    parser.add_argument(
        "--calibration", metavar="NPZ", help="calibration inputs for passes that measure the model (.npz keyed by input name)"
    )
    parser.add_argument(
        "--dim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"value of a symbolic input dimension (defaults: {verify.DEFAULT_DIMS}, others {verify.DEFAULT_DIM}); "
        "generated inputs are limited to 2**31 elements each and 4 GiB in all",
    )
    parser.add_argument(
        "--max-dim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="largest size of a symbolic input dimension the compiled model keeps (with --target): "
        "its memory is planned once at that size rather than allocated on every call, and the "
        "library refuses larger inputs",
    )
    parser.add_argument(
        "--plot", metavar="PNG", help="write the per-layer plot of passes that draw one (prune, quantize) here"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help=f"seed of the generated inputs, 0 to {MAX_SEED} (default 0)"
    )
    parser.add_argument(
        "--rtol", type=float, help="relative tolerance of exact passes, per row (default by dtype; float32 1e-5)"
    )
    parser.add_argument(
        "--atol", type=float, help="absolute tolerance of exact passes, per row (default by dtype; float32 1e-6)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="allow the output model to replace the input model (never its external data or other inputs)",
    )
    parser.add_argument(
        "--target",
        choices=("llvm", "avx2", "avx512", "sapphirerapids", "zen4", "native", "cuda"),
        help="also compile the rewritten model with TVM for this target and compare it with the original "
        "(avx512: portable AVX-512, the usual choice; native: this CPU's own features, from /proc/cpuinfo)",
    )
    parser.add_argument("--lib", metavar="PATH", help="write the compiled model here (.so, needs --target)")
    parser.add_argument("--cuda-arch", default="sm_90", help="GPU architecture of --target cuda (default sm_90)")
    parser.add_argument(
        "--tune",
        type=int,
        metavar="TRIALS",
        help="tune the compiled model with MetaSchedule: TRIALS measured candidates in all, for the "
        "functions the tuning database has no record of (CPU targets; 0: apply the records only)",
    )
    parser.add_argument(
        "--tune-db",
        metavar="DIR",
        help="the tuning database (default ~/.cache/rewriter/tuning/<target key>); "
        "without --tune its records are applied and nothing is tuned",
    )
    parser.add_argument(
        "--tune-time", type=float, metavar="SECONDS", help="stop tuning after about this long, keeping the best so far"
    )
    parser.add_argument(
        "--tune-rpc",
        metavar="HOST:PORT",
        help="measure the tuning candidates on the devices of this TVM RPC tracker (with --tune-key) "
        "instead of this machine",
    )
    parser.add_argument("--tune-key", metavar="KEY", help="the key the --tune-rpc devices registered with")
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="measure prune's distortion curves and quantize's LIM importance on a local Ray with N "
        "one-CPU workers (the distributed extra); the result is the serial run's",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="run those measurements on the Ray cluster at ADDR (e.g. ray://head:10001 or auto); "
        "with --workers N, N workers there, else one per CPU of the cluster",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    with _sigterm_as_interrupt() as terminated:
        try:
            return _run(parser, args)
        except RewriterError as exc:
            if args.verbose:
                raise
            print(f"rewrite: error: {_one_line(str(exc))}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt as exc:
            how, signum = ("terminated", signal.SIGTERM) if terminated else ("interrupted", signal.SIGINT)
            print(f"rewrite: {how}; {str(exc) or 'nothing written'}", file=sys.stderr)
            return 128 + signum
        except Exception as exc:  # an internal error: one line unless -v
            if args.verbose:
                raise
            first = _one_line((str(exc).strip().splitlines() or [""])[0])
            print(f"rewrite: internal error: {type(exc).__name__}: {first} (run with -v for details)", file=sys.stderr)
            return 1


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[list[int]]:
    """SIGTERM handled like Ctrl-C while the block runs; yields the SIGTERMs received.

    The SIGINT handler in force takes it: Python's raises ``KeyboardInterrupt``, and
    :class:`rewriter.staging.Outputs`' (during the write) never cuts a commit in half and
    removes the stage folders. Where SIGINT is ignored, SIGTERM still stops the run. Off
    the main thread (no signal handlers there) nothing changes.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):  # SIG_IGN or SIG_DFL
            handler = signal.default_int_handler
        handler(signal.SIGINT, frame)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield received
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line(message: str) -> str:
    """``message`` on one line of at most :data:`MAX_ERROR_CHARS` characters."""
    return shorten(" ".join(message.split()), MAX_ERROR_CHARS)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.list_passes:
        for name, cls in registry.available().items():
            kind = "exact" if cls.exact else "approximate"
            print(f"{name:<24} {kind:<12} {cls.description}")
        return 0
    if not args.model:
        parser.error("a model is required (or --list-passes)")
    if not args.output:
        raise InputError("an output path is required: -o OUT.onnx")
    if not args.passes and not args.pipeline:
        raise InputError("no passes given: use --passes NAME[,NAME...] or --pipeline FILE")
    dims = _parse_dims(args.dim)
    max_dims = _parse_dims(args.max_dim, option="--max-dim")
    passes = registry.load_pipeline(args.pipeline) if args.pipeline else registry.parse_pipeline(args.passes)
    if args.plot:
        _route_plot(passes, Path(args.plot))
    tolerance = None
    if args.rtol is not None or args.atol is not None:
        default = verify.DEFAULT_TOLERANCE["float32"]
        tolerance = verify.Tolerance(
            rtol=args.rtol if args.rtol is not None else default.rtol,
            atol=args.atol if args.atol is not None else default.atol,
        )
    started = time.perf_counter()

    # Progress goes to an interactive terminal (or with -v); logs and pipes get the
    # summary and, on failure, exactly one error line.
    show_progress = not args.quiet and (sys.stderr.isatty() or args.verbose)

    def progress(message: str) -> None:
        if show_progress:
            print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    report = rewrite_file(
        args.model,
        args.output,
        passes,
        inputs=args.inputs,
        calibration=args.calibration,
        dims=dims,
        max_dims=max_dims,
        seed=args.seed,
        check=not args.no_verify,
        tolerance=tolerance,
        force=args.force,
        progress=progress,
        target=args.target,
        library=args.lib,
        cuda_arch=args.cuda_arch,
        tune=args.tune,
        tune_db=args.tune_db,
        tune_seconds=args.tune_time,
        report_json=args.report_json,
        protect={"--pipeline": args.pipeline} if args.pipeline else None,
        workers=args.workers,
        ray_address=args.ray_address,
        tune_rpc=args.tune_rpc,
        tune_key=args.tune_key,
    )
    if not args.quiet:
        try:
            print(format_report(report))
        except KeyboardInterrupt:
            raise KeyboardInterrupt("the outputs were written") from None
    return 0


def _route_plot(passes: Sequence[RewritePass], path: Path) -> None:
    """Give ``--plot`` to the passes with a ``plot`` option (``NAME.PASS.png`` when several)
    that were not given one of their own. Where every drawing pass has its own, ``--plot``
    is refused rather than ignored: two destinations for one figure are a mistake."""
    drawing = [p for p in passes if hasattr(p.options, "plot")]
    if not drawing:
        raise InputError("--plot: none of the passes draws a plot (prune and quantize do)")
    own = [p for p in drawing if p.options.plot]
    drawing = [p for p in drawing if not p.options.plot]
    if not drawing:
        given = ", ".join(f"{p.name} already has its own plot option (plot={shorten(p.options.plot)})" for p in own)
        raise InputError(f"--plot: {given}; give one or the other")
    for rewrite_pass in drawing:
        target = path if len(drawing) == 1 else path.with_name(f"{path.stem}.{rewrite_pass.name}{path.suffix}")
        rewrite_pass.options.plot = str(target)


def _parse_dims(items: Sequence[str], option: str = "--dim") -> dict[str, int]:
    """``NAME=VALUE`` items as a dict; VALUE in ASCII digits, 1 to 12 of them (the
    generated inputs' size is bounded later, see :func:`rewriter.verify.make_inputs`)."""
    dims: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not re.fullmatch(r"[0-9]{1,12}", value.strip()) or int(value) < 1:
            raise InputError(f"{option} {shorten(item)!r}: expected NAME=POSITIVE_INT")
        dims[name.strip()] = int(value)
    return dims


def format_report(report: Report) -> str:
    """The human-readable summary printed after a rewrite."""
    lines = [f"{report.input} -> {report.output} ({report.seconds:.1f} s)"]
    for record in report.passes:
        kind = "exact" if record.exact else "approximate"
        stats = ", ".join(f"{key}={value}" for key, value in record.stats.items()) or "no changes"
        lines.append(f"  {record.name} [{kind}] {stats} ({record.seconds:.2f} s)")
        lines.extend(f"    note: {note}" for note in record.notes)
    if report.verification is None:
        lines.append("  verification: skipped (--no-verify)")
        return "\n".join(lines + _compiled_lines(report.compiled))
    shapes = ", ".join(f"{name}{shape}" for name, shape in report.verification.inputs.items())
    lines.append(f"  verification on {shapes}:")
    lines.append(f"    {'output':<28} {'max abs err':>12} {'max rel err':>12} {'cosine':>10} {'argmax':>8}  result")
    for output in report.verification.outputs:
        argmax = "-" if output.argmax_agreement is None else f"{output.argmax_agreement:.3f}"
        verdict = {True: "ok", False: "FAIL", None: "reported"}[output.passed]
        lines.append(
            f"    {output.name[:28]:<28} {output.max_abs_err:>12.3g} {output.max_rel_err:>12.3g} "
            f"{output.cosine:>10.6f} {argmax:>8}  {verdict}"
        )
        if output.rewritten_shape is not None:
            lines.append(
                f"    {'':<28} shape {output.shape} -> {output.rewritten_shape} "
                "(figures over the leading rows both have)"
            )
        if output.pooled_cosine_mean is not None:
            lines.append(
                f"    {'':<28} over the attention mask: max abs err {output.masked_max_abs_err:.3g}, "
                f"pooled cosine mean {output.pooled_cosine_mean:.6f} min {output.pooled_cosine_min:.6f}"
            )
        if output.warning:
            lines.append(f"    warning: {output.warning}")
    return "\n".join(lines + _compiled_lines(report.compiled))


def _compiled_lines(compiled: Any) -> list[str]:
    """The report lines of the TVM-compiled model (``--target``): a ``CompiledCheck`` or None."""
    if compiled is None:
        return []
    where = f", written to {compiled.library}" if compiled.library else ""
    lines = [f"  compiled for {compiled.target} ({compiled.compile_seconds:.1f} s{where}):"]
    if compiled.features:
        mcpu = compiled.target_json.get("mcpu", "generic")
        lines.append(f"    mcpu {mcpu}, features {' '.join(compiled.features)}")
    if compiled.accepts:
        shapes = ", ".join(
            f"{name}[{', '.join('?' if dim is None else str(dim) for dim in shape)}]"
            for name, shape in compiled.accepts.items()
        )
        bounds = verify.dimension_bounds(compiled.min_dims, compiled.max_dims)
        if bounds:
            lines.append(f"    accepts {shapes} with {bounds} (a name without a bound: any size)")
        else:
            lines.append(f"    accepts {shapes} (a name: any size)")
    main_memory = (compiled.memory or {}).get("main")
    if main_memory and (main_memory["dynamic"] or compiled.max_dims):  # fixed shapes: all static
        total = main_memory["dynamic"] + main_memory["static"]
        lines.append(
            f"    memory: {main_memory['static']} of {total} storage allocations planned statically, "
            f"{main_memory['dynamic']} sized on each call"
        )
    if compiled.note:
        lines.append(f"    note: {compiled.note}")
    lines.extend(_tuning_lines(compiled.tuning))
    unscheduled = (compiled.schedules or {}).get("unscheduled", [])
    if unscheduled:
        names = ", ".join(sorted(unscheduled)[:8]) + (", ..." if len(unscheduled) > 8 else "")
        lines.append(f"    {len(unscheduled)} functions on TVM's default lowering (no schedule of ours): {names}")
    for output in compiled.outputs:
        verdict = {True: "ok", False: "FAIL", None: "reported"}[output.passed]
        lines.append(
            f"    {output.name[:28]:<28} {output.max_abs_err:>12.3g} {output.max_rel_err:>12.3g} "
            f"{output.cosine:>10.6f} {'':>8}  {verdict} (vs ONNX Runtime on the original)"
        )
    return lines


def _tuning_lines(tuning: dict[str, Any] | None) -> list[str]:
    """The report lines of MetaSchedule tuning (``--tune``): totals, then one line per task."""
    if tuning is None:
        return []
    counts = tuning["counts"]
    tuned = [task for task in tuning["tasks"] if task["status"] == "tuned"]
    limit = "; stopped at --tune-time" if tuning["stopped_by_time"] else ""
    lines = [
        f"    tuning: {counts['tuned']} tasks tuned ({sum(t['trials'] for t in tuned)} trials, "
        f"{tuning['seconds']:.1f} s{limit}), {counts['reused']} reused, "
        f"{counts['untuned'] + counts['failed']} on our schedules; "
        f"{len(tuning['applied'])} functions use tuned schedules (database {tuning['database']})"
    ]
    if tuning.get("remote"):
        lines[0] += f"; measured on the RPC devices at {tuning['remote']}"
    for task in tuning["tasks"]:
        if task["status"] == "untuned":
            continue
        times = ""
        if task["best_us"] is not None:
            times = f"best {task['best_us']:.1f} us"
            if task["ours_us"] is not None:
                times += f", ours {task['ours_us']:.1f} us ({task['speedup']:.2f}x)"
        chosen = {"tuned": "tuned schedule used", "ours": "ours kept", None: ""}[task["choice"]]
        lines.append(
            f"      {task['name'][:32]:<32} {task['status']:<7} {task['flop_share']:>6.1%} of FLOPs  {times}  {chosen}".rstrip()
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
