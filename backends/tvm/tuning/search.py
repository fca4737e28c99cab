"""MetaSchedule tuning: tune the functions our CPU schedules would get, keep the best on disk.

``compile(model, "avx512", tune=64)`` adds one stage to the CPU pipeline, after weight
packing and before :func:`rewriter.backends.tvm.relax_passes.cpu_schedule.cpu_schedule`:

1. **tune** (only with ``tune > 0``): the distinct unscheduled PrimFuncs (our kernels,
   marked ``tirx.is_scheduled``, are skipped) become MetaSchedule tasks. A task with a
   valid record in the database is *reused*. The others share the trial budget by their
   share of the model's FLOPs, heaviest first (a task whose share rounds to zero trials
   keeps our schedule). Each runs MetaSchedule's evolutionary search for its trials
   (:mod:`rewriter.backends.tvm.tuning.measure`); then its best record and our schedule are
   timed side by side, and the faster one is chosen (:data:`CHOICES_FILE`). The search's
   best is the minimum of many noisy measurements, so it flatters the winner: on the
   shared 2-core machine a 256-trial search recorded 1.05 ms for its best against
   2.04 ms for our schedule timed once before it; timed alternately, ours was the faster
   (0.95 against 1.01 ms, medians of 15 rounds). With
   ``seconds`` the stage stops at the first batch boundary past the limit and keeps what
   it measured (tasks not reached keep our schedules).
2. **apply**: ``MetaScheduleApplyDatabase`` gives every function with a record its best
   schedule and marks it scheduled, except where our schedule was chosen; our rules
   schedule the rest.

The database is MetaSchedule's JSON database in a directory: by default
``~/.cache/rewriter/tuning/<target key>`` (:func:`default_database`), one per target,
core count and TVM version, since MetaSchedule looks a record up by workload alone. Records
are appended as they are measured, so an interrupted or time-boxed run keeps them; a
database without our choices file (e.g. from TVM's ``tune_relax``) is applied as it is.
Compiles without ``tune``/``tune_db`` read no database.

>>> compiled = compile("model.onnx", "avx512", tune=64, tune_seconds=600)  # doctest: +SKIP
>>> compiled.tuning.counts()  # doctest: +SKIP
{'tuned': 3, 'reused': 0, 'untuned': 5, 'failed': 0}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm import targets
from rewriter.backends.tvm.tuning import measure
from rewriter.backends.tvm.tuning.measure import Progress, Remote
from rewriter.errors import InputError

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger(__name__)

DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")
# Beside them: per workload (structural hash), our schedule and the database's best timed
# side by side, and which one compiles use.
CHOICES_FILE = "rewriter_choices.json"
CHOICES_VERSION = 1


@dataclasses.dataclass
class TaskResult:
    """One tuning task (a distinct PrimFunc) and what the tuning stage did with it.

    ``status``: ``tuned`` (searched in this compile), ``reused`` (a record was in the
    database), ``untuned`` (no trials for it, or the time limit came first: our schedule)
    or ``failed`` (searched, but no candidate built and ran; see ``logs/tuning.log`` in
    the database). ``ours_us`` and ``best_us``: our schedule and the database's best,
    timed side by side (fastest of the repeats, microseconds); ``choice``: the one
    compiles use (``tuned`` or ``ours``).
    """

    name: str
    weight: int
    flop_share: float
    status: str
    trials: int = 0  # candidates that built and ran in this compile
    ours_us: float | None = None
    best_us: float | None = None
    choice: str | None = None

    @property
    def speedup(self) -> float | None:
        """Our schedule's time over the database best's, side by side."""
        if self.ours_us is None or self.best_us is None or self.best_us <= 0:
            return None
        return self.ours_us / self.best_us


@dataclasses.dataclass
class TuningReport:
    """What the tuning stage of one compile did: per task, and in all."""

    database: str
    target_key: str
    trials: int
    seconds_limit: float | None
    tasks: list[TaskResult] = dataclasses.field(default_factory=list)
    applied: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    stopped_by_time: bool = False
    # With --tune-rpc: "HOST:PORT key KEY", where the candidates ran.
    remote: str | None = None

    def counts(self) -> dict[str, int]:
        """Tasks by status."""
        counts = {"tuned": 0, "reused": 0, "untuned": 0, "failed": 0}
        for task in self.tasks:
            counts[task.status] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "target_key": self.target_key,
            "trials": self.trials,
            "seconds_limit": self.seconds_limit,
            "seconds": self.seconds,
            "stopped_by_time": self.stopped_by_time,
            "remote": self.remote,
            "counts": self.counts(),
            "applied": self.applied,
            "tasks": [{**dataclasses.asdict(task), "speedup": task.speedup} for task in self.tasks],
        }


def check_options(
    target: str,
    trials: int | None,
    database: str | os.PathLike[str] | None,
    seconds: float | None,
    remote: Remote | None = None,
) -> None:
    """Raise :class:`InputError` for tuning options that cannot work (before any compile).

    >>> check_options("avx512", -1, None, None)  # doctest: +SKIP
    InputError: --tune -1: expected a number of trials >= 0
    """
    if trials is None and database is None and seconds is None and remote is None:
        return
    if remote is not None and not trials:
        raise InputError("--tune-rpc needs --tune TRIALS: the devices measure the candidates of a search")
    if seconds is not None and trials is None:
        raise InputError("--tune-time needs --tune TRIALS: it limits the tuning")
    if targets.is_gpu(target):
        raise InputError(
            f"--tune: MetaSchedule measures candidates on this machine's CPU; target {target!r} "
            "is a GPU (tune llvm, avx2 or avx512)"
        )
    if trials is not None and (isinstance(trials, bool) or trials < 0):
        raise InputError(f"--tune {trials}: expected a number of trials >= 0")
    if seconds is not None and not (0 < seconds < math.inf):
        raise InputError(f"--tune-time {seconds}: expected a positive number of seconds")
    if trials is None and database is not None and not has_database(Path(database).expanduser()):
        raise InputError(
            f"--tune-db {database}: no tuning database there ({DATABASE_FILES[0]}); "
            "tune into it first with --tune TRIALS"
        )


def has_database(directory: Path) -> bool:
    """True if ``directory`` holds MetaSchedule's JSON database files."""
    return all((directory / name).is_file() for name in DATABASE_FILES)


def num_cores() -> int:
    """Threads the compiled code runs on: ``TVM_NUM_THREADS``, else the physical cores."""
    from tvm.s_tir.meta_schedule.utils import cpu_count

    configured = os.environ.get("TVM_NUM_THREADS", "")
    return int(configured) if configured.isdigit() and int(configured) > 0 else cpu_count(False)


def tuning_target(target: tvm.target.Target) -> tvm.target.Target:
    """``target`` with ``num-cores`` (MetaSchedule's CPU rules size parallel loops by it)."""
    import tvm

    attrs = dict(target.export())
    attrs.setdefault("num-cores", num_cores())
    return tvm.target.Target(attrs)


def target_key(target: tvm.target.Target) -> str:
    """A directory name for ``target``'s records, e.g. ``llvm-x86-64-v4-2c-41f51c53cc``.

    The digest covers the whole target (features, core count) and the TVM version.
    """
    import tvm

    tuned = tuning_target(target)
    text = json.dumps({"target": str(tuned), "tvm": tvm.__version__})
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    mcpu = str(tuned.attrs.get("mcpu", "generic"))
    return f"{tuned.kind.name}-{mcpu}-{int(tuned.attrs['num-cores'])}c-{digest}"


def default_database(target: tvm.target.Target, remote: Remote | None = None) -> Path:
    """``$XDG_CACHE_HOME/rewriter/tuning/<target key>`` (``~/.cache`` without it); with
    ``remote``, ``<target key>-rpc-<device key>``: records measured on those devices.

    >>> default_database(targets.resolve("avx512"))  # doctest: +SKIP
    PosixPath('/root/.cache/rewriter/tuning/llvm-x86-64-v4-2c-41f51c53cc')
    """
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    name = target_key(target) + (f"-rpc-{remote.key}" if remote is not None else "")
    return Path(cache) / "rewriter" / "tuning" / name


def allocate(trials: int, weights: Sequence[float]) -> list[int]:
    """Split ``trials`` in proportion to ``weights``; the largest remainders get the rest.

    A weight of zero gets no trials.

    >>> allocate(10, [3.0, 1.0, 0.0])
    [8, 2, 0]
    """
    total = sum(weights)
    if trials <= 0 or total <= 0:
        return [0 for _ in weights]
    exact = [trials * weight / total for weight in weights]
    shares = [int(value) for value in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - shares[i], reverse=True)
    for index in by_remainder[: trials - sum(shares)]:
        if weights[index] > 0:
            shares[index] += 1
    return shares


class Tuner:
    """The tuning stage of one compile: its passes, and the report they fill in.

    >>> tuner = Tuner(trials=64, database=None, seconds=None)
    >>> passes = tuner.passes(target)  # doctest: +SKIP  (in the pipeline, before our rules)
    >>> tuner.report.counts()  # doctest: +SKIP  (after the build)
    """

    def __init__(
        self,
        trials: int,
        database: str | os.PathLike[str] | None,
        seconds: float | None,
        progress: Progress | None = None,
        remote: Remote | None = None,
    ) -> None:
        self.trials = trials
        self.remote = remote
        if remote is not None and trials > 0:
            remote.devices()  # an unreachable tracker, or no device of the key: an error now
        self.database = Path(database).expanduser() if database is not None else None
        self.seconds = seconds
        self.progress = progress
        self.report: TuningReport | None = None

    def passes(self, target: tvm.target.Target) -> list[tvm.transform.Pass]:
        """The stage's module passes for CPU ``target``: tune (if trials), then apply."""
        import tvm

        directory = self.database or default_database(target, self.remote)
        report = self.report = TuningReport(
            database=str(directory),
            target_key=target_key(target),
            trials=self.trials,
            seconds_limit=self.seconds,
            remote=f"{self.remote.host}:{self.remote.port} key {self.remote.key}" if self.remote else None,
        )

        @tvm.transform.module_pass(opt_level=0, name="RewriterMetaScheduleTune")
        def tune(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
            start = time.perf_counter()
            tune_module(
                mod, target, directory, self.trials, self.seconds, self.progress, report, remote=self.remote
            )
            report.seconds = time.perf_counter() - start
            return mod

        @tvm.transform.module_pass(opt_level=0, name="RewriterMetaScheduleApply")
        def apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
            mod, report.applied = apply_database(mod, target, directory)
            return mod

        return [tune, apply] if self.trials > 0 else [apply]


def apply_database(
    mod: tvm.IRModule, target: tvm.target.Target, directory: Path
) -> tuple[tvm.IRModule, list[str]]:
    """Give each unscheduled PrimFunc of ``mod`` with a record in ``directory`` its best
    schedule (``MetaScheduleApplyDatabase``), unless our schedule was timed faster; returns
    the module and the names of the functions that got a record's schedule.

    Functions scheduled before (our kernels) are kept as they were.
    """
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    if not has_database(directory):
        return mod, []
    database = ms.database.JSONDatabase(work_dir=str(directory))
    choices = load_choices(directory)
    keep = {
        gv: func
        for gv, func in mod.functions_items()
        if is_scheduled(func) or choices.get(workload_key(func), {}).get("choice") == "ours"
    }
    with tuning_target(target), database:
        result = relax.transform.MetaScheduleApplyDatabase()(mod)
    for gv, func in keep.items():
        result[gv] = func
    applied = sorted(
        gv.name_hint
        for gv, func in result.functions_items()
        if gv not in keep and is_scheduled(func)
    )
    logger.info("tuned schedules applied to %s", applied)
    return result, applied


def workload_key(func: Any) -> str:
    """The structural hash of a PrimFunc as MetaSchedule's workload (``""`` for others)."""
    import tvm
    from tvm.s_tir.meta_schedule.utils import shash2hex

    if not isinstance(func, tvm.tirx.PrimFunc):
        return ""
    normalize = tvm.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")  # as the lookup
    return shash2hex(normalize(func))


def load_choices(directory: Path) -> dict[str, dict[str, Any]]:
    """The side-by-side decisions in ``directory`` (:data:`CHOICES_FILE`), by workload key."""
    path = directory / CHOICES_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"{path}: unreadable ({exc}); delete it to re-decide") from exc
    if data.get("version") != CHOICES_VERSION:
        return {}
    return dict(data["workloads"])


def save_choice(directory: Path, key: str, entry: dict[str, Any]) -> None:
    """Add one decision to ``directory``'s :data:`CHOICES_FILE` (written atomically)."""
    choices = load_choices(directory)
    choices[key] = entry
    text = json.dumps({"version": CHOICES_VERSION, "workloads": choices}, indent=1) + "\n"
    fd, name = tempfile.mkstemp(prefix=f".{CHOICES_FILE}.", dir=directory)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(name, directory / CHOICES_FILE)


def is_scheduled(func: Any) -> bool:
    """True for a PrimFunc marked ``tirx.is_scheduled`` (our kernels, applied records)."""
    import tvm

    return isinstance(func, tvm.tirx.PrimFunc) and bool(func.attrs.get("tirx.is_scheduled", False))


def task_flops(workload: tvm.IRModule) -> float:
    """FLOPs of one call of a task's PrimFunc; 0 (not tuned) for symbolic shapes, which
    MetaSchedule cannot measure, or a function TVM cannot count."""
    from tvm.s_tir.analysis import estimate_tir_flops
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    func = workload["main"]
    try:
        ArgInfo.from_prim_func(func)  # the runner's random inputs: static shapes only
        return float(estimate_tir_flops(workload))
    except Exception as exc:  # symbolic shapes, or an op the estimator has no rule for
        logger.info("not tuned: %s (%s)", func.attrs.get("global_symbol"), exc)
        return 0.0


def tune_module(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    directory: Path,
    trials: int,
    seconds: float | None,
    progress: Progress | None,
    report: TuningReport,
    *,
    remote: Remote | None = None,
) -> None:
    """Tune the tasks of ``mod`` that ``directory`` has no record of; fill in ``report``.

    ``remote``: measure on the devices of a TVM RPC tracker (:class:`Remote`).
    """
    from tvm.s_tir import meta_schedule as ms

    say = progress or (lambda message: logger.info("%s", message))
    deadline = time.perf_counter() + seconds if seconds is not None else math.inf
    tune_target = tuning_target(target)
    tasks = [
        task
        for task in ms.relax_integration.extract_tasks(mod, tune_target)
        if not is_scheduled(task.dispatched[0]["main"])
    ]
    flops = [task_flops(task.dispatched[0]) * int(task.weight) for task in tasks]
    order = sorted(range(len(tasks)), key=lambda i: -flops[i])
    tasks, flops = [tasks[i] for i in order], [flops[i] for i in order]
    results = [
        TaskResult(task.task_name, int(task.weight), share / (sum(flops) or 1.0), "untuned")
        for task, share in zip(tasks, flops, strict=True)
    ]
    report.tasks = results

    directory.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(directory))
    choices = load_choices(directory)
    pending = []
    for index, (task, result) in enumerate(zip(tasks, results, strict=True)):
        best = database.query_tuning_record(task.dispatched[0], tune_target, task.task_name)
        if best is not None:
            result.status = "reused"
            decided = choices.get(workload_key(task.dispatched[0]["main"]), {})
            result.ours_us = decided.get("ours_us")
            result.best_us = decided.get("best_us", measure.median_us(best.run_secs))
            result.choice = decided.get("choice", "tuned")
        elif flops[index] > 0:
            pending.append(index)
    shares = allocate(trials, [flops[i] for i in pending])
    work = [(i, share) for i, share in zip(pending, shares, strict=True) if share > 0]
    reused = sum(result.status == "reused" for result in results)
    say(
        f"tuning: {len(results)} tasks, {reused} in the database {directory}, "
        f"{len(work)} to tune with {sum(share for _, share in work)} trials"
    )
    if not work:
        return

    def out_of_time(left: int) -> bool:
        if time.perf_counter() < deadline:
            return False
        report.stopped_by_time = True
        say(f"tuning: time limit reached, {left} tasks left on our schedules")
        return True

    if out_of_time(len(work)):
        return
    where = f" on the RPC devices {remote.key!r} of {remote.host}:{remote.port}" if remote else ""
    if where:
        say(f"tuning: measuring{where}")
    with measure.Measure(tune_target, directory, remote) as measurer:
        for done, (index, share) in enumerate(work):
            if out_of_time(len(work) - done):
                break
            result, task = results[index], tasks[index]
            label = f"tuning {done + 1}/{len(work)} {result.name}"
            result.trials = measurer.search(task, share, database, deadline, label, say)
            best = database.query_tuning_record(task.dispatched[0], tune_target, result.name)
            if result.trials == 0 or best is None:
                result.status = "failed"
                say(f"{label}: no candidate built and ran; see {directory / 'logs'}")
                continue
            result.status = "tuned"
            result.ours_us, result.best_us = measurer.side_by_side(task, best, target)
            faster = result.ours_us is None or (
                result.best_us is not None and result.best_us < result.ours_us
            )
            result.choice = "tuned" if faster else "ours"
            entry = {"task": result.name, "ours_us": result.ours_us, "best_us": result.best_us}
            save_choice(
                directory,
                workload_key(task.dispatched[0]["main"]),
                {**entry, "choice": result.choice},
            )
            say(f"{label}: {_verdict(result)}")
        report.stopped_by_time = report.stopped_by_time or measurer.stopped_by_time


def _verdict(result: TaskResult) -> str:
    """``best 1007.8 us, ours 949.6 us side by side: ours kept``."""
    best = f"best {result.best_us:.1f} us" if result.best_us is not None else "best not timed"
    if result.ours_us is None:
        return f"{best} (our rules do not schedule it): tuned schedule used"
    chosen = "tuned schedule used" if result.choice == "tuned" else "ours kept"
    return f"{best}, ours {result.ours_us:.1f} us side by side: {chosen}"
