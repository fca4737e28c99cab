"""MetaSchedule on this machine: build, run and search candidates for :mod:`.tuning`.

:class:`Measure` holds what the tasks of one compile share: a builder whose worker
processes live across batches, MetaSchedule's local runner (median of
:data:`REPEATS` timed repeats), the XGBoost cost model, and MetaSchedule's log, which
goes to ``logs/tuning.log`` in the database rather than the console. Per task it runs
the evolutionary search (:meth:`Measure.search`) with a callback that prints a progress
line per batch and ends the task once the time limit has passed, then times the best
record and our schedule side by side (:meth:`Measure.side_by_side`).

Why every trial used to fail here ("N/A", no valid measurement): MetaSchedule's
``LocalBuilder`` starts new worker processes for every batch, and each worker's build
imports ``tvm.s_tir.tensor_intrin``, which parses ~250 TVMScript functions, each through
``inspect.stack()``. tvm-ffi imports torch, so ~2000 modules are loaded, and
``inspect.getmodule`` rescans all of them for every frame of the import machinery: the
import took 20-50 s on the loaded 2-core machine, and every build hit the 30 s build
timeout. Here builds skip that import (:func:`build_candidate`: a candidate already holds
its intrinsics' code; only *generating* tensorized candidates needs them, in this
process), the workers are reused, and the one import in this process runs with a
shortcut for those frames (:func:`import_tensor_intrinsics`: ~7 s instead of ~35 s).

>>> with Measure(tune_target, database_dir) as measure:  # doctest: +SKIP
...     valid = measure.search(task, 16, database, math.inf, "tuning 1/1", print)
...     ours_us, best_us = measure.side_by_side(task, database.get_top_k(workload, 1)[0], target)
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger(__name__)

# Where the tuning stage reports its progress: one line at a time (compile(progress=...)).
Progress = Callable[[str], None]

# Candidates built and measured per search round (the time limit is checked between rounds).
BATCH = 16
# The evolutionary search's population: MetaSchedule's default (512) for large budgets,
# smaller for a handful of trials, where sampling 512 schedules would dominate the time.
POPULATION_PER_TRIAL = 32
POPULATION_RANGE = (64, 512)
SEED = 42
# A build takes ~1-5 s; the limit leaves room for a loaded machine without letting one
# pathological candidate stall the search.
BUILD_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 30.0
# Builds per builder worker before it is replaced (MetaSchedule replaces its workers
# every batch, against a slow leak; starting one costs ~5-9 s here).
BUILDS_PER_WORKER = 64
# One measurement: the median of 3 timed repeats of at least 40 ms each (the machines
# are shared, so a single repeat is noisy).
REPEATS = 3
MIN_REPEAT_MS = 40
# With --tune-rpc: how long connecting to the tracker, getting a device and one run may take.
RPC_SESSION_TIMEOUT_S = 60
# Our schedule and the search's best are timed alternately this many times each (of
# REPEATS repeats), and compared by their fastest repeat: other jobs on the machine only
# ever slow a run down, so the minimum is the steadiest estimate of a kernel's own time
# (medians of the same two kernels moved by 20% from one run to the next here).
SIDE_BY_SIDE_ROUNDS = 5


@dataclasses.dataclass(frozen=True)
class Remote:
    """Run the candidates on the devices registered under ``key`` with TVM's RPC tracker at
    ``host:port`` (``python -m tvm.exec.rpc_tracker``, and ``python -m tvm.exec.rpc_server
    --tracker HOST:PORT --key KEY`` on each device), not on this machine.

    MetaSchedule's ``RPCRunner`` uploads each built candidate to a free device, times it
    there (the same evaluator as the local runner's) and frees the device; one session
    per device at a time, so the devices of a key measure a batch in parallel. The
    builds stay here: the target must describe the device (``TVM_NUM_THREADS``: its cores).

    >>> Remote.parse("127.0.0.1:9190", "zen4")
    Remote(host='127.0.0.1', port=9190, key='zen4')
    """

    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, address: str, key: str | None) -> Remote:
        """``HOST:PORT`` and the device key, checked (:class:`InputError` naming the option)."""
        from rewriter.errors import InputError, shorten

        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(f"--tune-rpc {shorten(address)!r}: expected HOST:PORT of a TVM RPC tracker")
        if not key:
            raise InputError("--tune-rpc needs --tune-key KEY: the key the devices registered with")
        return cls(host.strip("[]"), int(port), key)

    def config(self) -> Any:
        """MetaSchedule's ``RPCConfig`` for this tracker and key."""
        from tvm.s_tir.meta_schedule.runner import RPCConfig

        return RPCConfig(
            tracker_host=self.host,
            tracker_port=self.port,
            tracker_key=self.key,
            session_timeout_sec=RPC_SESSION_TIMEOUT_S,
        )

    def devices(self) -> int:
        """How many devices of the key the tracker has (:class:`InputError` if none or unreachable)."""
        from rewriter.errors import InputError

        try:
            return int(self.config().count_num_servers(allow_missing=False))
        except (ValueError, OSError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"--tune-rpc {self.host}:{self.port} --tune-key {self.key}: {first}") from exc


class Measure:
    """Builder, runner and cost model shared by the tuned tasks of one compile.

    ``remote``: run the candidates on the devices of a TVM RPC tracker (:class:`Remote`)
    instead of MetaSchedule's local runner.
    """

    def __init__(self, target: tvm.target.Target, directory: Path, remote: Remote | None = None) -> None:
        from tvm.s_tir import meta_schedule as ms

        self.target = target
        self.directory = directory
        self.cores = int(target.attrs["num-cores"])
        self.stopped_by_time = False
        self._cleanup = contextlib.ExitStack()
        try:
            self._cleanup.enter_context(_meta_schedule_logs(directory / "logs" / "tuning.log"))
            self.builder = _pooled_builder(self.cores)  # its workers start while the rest loads
            self._cleanup.callback(self.builder.pool.shutdown)
            evaluator = ms.runner.EvaluatorConfig(number=1, repeat=REPEATS, min_repeat_ms=MIN_REPEAT_MS)
            if remote is None:
                self.runner = ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S, evaluator_config=evaluator)
            else:
                self.runner = ms.runner.RPCRunner(
                    remote.config(), evaluator_config=evaluator, max_workers=remote.devices()
                )
            self._cleanup.callback(self.runner.pool.shutdown)
            self.cost_model = ms.cost_model.CostModel.create(
                "xgb", num_tuning_cores=self.cores, tree_method="auto"
            )
            import_tensor_intrinsics()  # TuneContext imports them; here, fast
        except BaseException:
            self._cleanup.close()
            raise

    def __enter__(self) -> Measure:
        return self

    def __exit__(self, *exc: object) -> None:
        self._cleanup.close()

    def side_by_side(
        self, task: Any, record: Any, target: tvm.target.Target
    ) -> tuple[float | None, float | None]:
        """Time our schedule of ``task`` and ``record``'s, alternating, in the runner.

        Returns each one's fastest repeat in us (``None`` for ours where our rules do not
        schedule the function). Both build in this process: ours builds in every compile,
        and the record's already built once in a worker.
        """
        from tvm import s_tir
        from tvm.s_tir.meta_schedule.arg_info import ArgInfo
        from tvm.s_tir.meta_schedule.builder.local_builder import default_export
        from tvm.s_tir.meta_schedule.runner import RunnerInput
        from tvm.s_tir.meta_schedule.utils import remove_build_dir

        workload = task.dispatched[0]
        tuned = s_tir.Schedule(record.workload.mod)
        record.trace.apply_to_schedule(tuned, remove_postproc=False)
        schedules = {"best": tuned}
        ours = our_schedule(workload["main"], target)
        if ours is not None:
            schedules["ours"] = ours
        artifacts = {
            name: default_export(build_candidate(sch.mod, self.target, None))
            for name, sch in schedules.items()
        }
        args_info = ArgInfo.from_prim_func(workload["main"])
        order = [name for _ in range(SIDE_BY_SIDE_ROUNDS) for name in artifacts]
        times: dict[str, list[float]] = {name: [] for name in artifacts}
        try:
            inputs = [RunnerInput(artifacts[name], "cpu", args_info) for name in order]
            for name, future in zip(order, self.runner.run(inputs), strict=True):
                measured = future.result()
                if measured.error_msg is None and measured.run_secs:
                    times[name].extend(float(value) for value in measured.run_secs)
                else:
                    logger.info(
                        "%s of %s did not run: %s", name, task.task_name, measured.error_msg
                    )
        finally:
            for artifact in artifacts.values():
                remove_build_dir(artifact)
        fastest = {name: min(values) * 1e6 if values else None for name, values in times.items()}
        return fastest.get("ours"), fastest["best"]

    def search(
        self,
        task: Any,
        trials: int,
        database: Any,
        deadline: float,
        label: str,
        say: Progress,
    ) -> int:
        """MetaSchedule's evolutionary search on ``task`` for ``trials`` candidates, until
        ``deadline`` (``time.perf_counter``); returns how many built and ran."""
        from tvm.s_tir import meta_schedule as ms

        low, high = POPULATION_RANGE
        context = ms.TuneContext(
            mod=task.dispatched[0],
            target=self.target,
            space_generator="post-order-apply",
            search_strategy=ms.search_strategy.EvolutionarySearch(
                population_size=min(max(POPULATION_PER_TRIAL * trials, low), high)
            ),
            task_name=task.task_name,
            logger=logging.getLogger(f"tvm.s_tir.meta_schedule.rewriter.{task.task_name}"),
            rand_state=SEED,
            num_threads=self.cores,
        )
        watch = Watch(trials, deadline, label, say)
        ms.tune.tune_tasks(
            tasks=[context],
            task_weights=[1.0],
            work_dir=str(self.directory),  # MetaSchedule's default database would go here
            max_trials_global=trials,
            max_trials_per_task=trials,
            num_trials_per_iter=min(trials, BATCH),
            builder=self.builder,
            runner=self.runner,
            database=database,
            cost_model=self.cost_model,
            measure_callbacks=[
                *ms.measure_callback.MeasureCallback.create("default"),
                watch.callback(),
            ],
            task_scheduler="round-robin",
        )
        self.stopped_by_time = self.stopped_by_time or watch.stopped_by_time
        return watch.valid


class Watch:
    """After each batch of one task: a progress line; past ``deadline``, end the task.

    The task's records so far stay in the database (MetaSchedule commits each batch
    before its callbacks run), so ending it keeps the best found.
    """

    def __init__(self, trials: int, deadline: float, label: str, say: Progress) -> None:
        self.trials = trials
        self.deadline = deadline
        self.label = label
        self.say = say
        self.measured = 0
        self.valid = 0
        self.best_us = math.inf
        self.stopped_by_time = False

    def batch(self, runner_results: Sequence[Any], end_task: Callable[[], None]) -> None:
        """Account for one batch's ``runner_results``; ``end_task`` stops the search."""
        self.measured += len(runner_results)
        for measured in runner_results:
            if measured.error_msg is None and measured.run_secs:
                self.valid += 1
                self.best_us = min(self.best_us, median_us(measured.run_secs))
        filled = min(10, 10 * self.measured // max(self.trials, 1))
        bar = "#" * filled + "-" * (10 - filled)
        best = f"best {self.best_us:.1f} us" if self.valid else "no valid trial yet"
        self.say(f"{self.label} [{bar}] {self.measured}/{self.trials} trials, {best}")
        if time.perf_counter() >= self.deadline and self.measured < self.trials:
            self.stopped_by_time = True
            self.say(f"{self.label}: time limit reached, keeping the best so far")
            end_task()

    def callback(self) -> Any:
        """This watch as a MetaSchedule measure callback."""
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

        watch = self

        @derived_object
        class WatchCallback(PyMeasureCallback):
            def apply(
                self,
                task_scheduler: Any,
                task_id: int,
                _candidates: Any,
                _builder_results: Any,
                runner_results: Any,
            ) -> None:
                watch.batch(runner_results, lambda: task_scheduler.terminate_task(task_id))

        return WatchCallback()


def our_schedule(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> Any:
    """The traced ``s_tir.Schedule`` our CPU rules give ``func``, or None (no rule fits)."""
    from rewriter.backends.tvm.relax_passes import cpu_schedule

    for rule in cpu_schedule.cpu_rules(target):
        space = rule.apply(func, target, False)
        if space is not None:
            return space[0] if isinstance(space, list) else space
    return None


def median_us(run_secs: Sequence[Any]) -> float:
    """The median of MetaSchedule's run times (seconds), in microseconds."""
    values = sorted(float(value) for value in run_secs)
    middle = len(values) // 2
    median = values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
    return median * 1e6


def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params: Any) -> Any:
    """MetaSchedule's default build, without importing ``tvm.s_tir.tensor_intrin``
    (and through ``tvm.tirx.build``: ``tvm.driver.build`` is deprecated)."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target)


def _build_and_export(job: tuple[tvm.IRModule, tvm.target.Target]) -> str:
    """A builder worker's job: build one candidate and export it; the artifact's path.

    Runs in the worker processes, passed by reference: this module must be importable
    there, and it imports nothing heavy at module level.
    """
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export

    mod, target = job
    return str(default_export(build_candidate(mod, target, None)))


def _pooled_builder(cores: int) -> Any:
    """A MetaSchedule builder whose ``cores`` worker processes live across batches."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class PooledBuilder(PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.pool = PopenPoolExecutor(
                max_workers=cores,
                timeout=BUILD_TIMEOUT_S,
                maximum_process_uses=BUILDS_PER_WORKER,
            )
            for _ in range(cores):  # start the workers now
                self.pool.submit(int)

        def build(self, build_inputs: list[Any]) -> list[Any]:
            jobs = [(item.mod, item.target) for item in build_inputs]
            results = []
            for outcome in self.pool.map_with_error_catching(_build_and_export, jobs):
                if outcome.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(outcome.value, None))
                elif outcome.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"build timed out ({BUILD_TIMEOUT_S} s)"))
                else:
                    results.append(BuilderResult(None, f"build failed: {outcome.value}"))
            return results

    return PooledBuilder()


def import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (``TuneContext`` does) with fast frame lookups.

    ``T.prim_func`` calls ``inspect.stack()``, which calls ``inspect.getmodule`` on every
    frame; for the ``<frozen importlib._bootstrap>`` frames of an import that is a scan of
    all of ``sys.modules`` which finds nothing. Answering None for frames of ``<...>``
    files (what the scan returns for them) gives the same stacks ~5x faster.
    """
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    getmodule = inspect.getmodule

    def frame_module(obj: object, _filename: str | None = None) -> Any:
        if inspect.isframe(obj) and obj.f_code.co_filename.startswith("<"):
            return None
        return getmodule(obj, _filename)

    inspect.getmodule = frame_module  # type: ignore[assignment]
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.getmodule = getmodule


@contextlib.contextmanager
def _meta_schedule_logs(path: Path) -> Iterator[None]:
    """Send MetaSchedule's log (per-trial IR, errors) to ``path`` instead of the console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    saved = (ms_logger.level, ms_logger.propagate)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
    ms_logger.addHandler(handler)
    ms_logger.setLevel(logging.INFO)
    ms_logger.propagate = False
    try:
        yield
    finally:
        ms_logger.removeHandler(handler)
        handler.close()
        ms_logger.setLevel(saved[0])
        ms_logger.propagate = saved[1]
