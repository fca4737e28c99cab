"""MetaSchedule tuning (``compile(..., tune=...)``, ``--tune``): options, the database,
reuse without re-tuning, the time limit, and agreement with ONNX Runtime.

Tuned code is compared with ONNX Runtime on the same model at
:data:`rewriter.backends.tvm.verify.COMPILED_TOLERANCE` (float32: max abs err <= 1e-4
of the output's scale; a tuned schedule only reorders the float32 sums of a matmul,
~sqrt(K) ulp, while a wrong schedule is off by O(1)).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import tvm
import tvm_ffi
from onnx import TensorProto, helper, numpy_helper

from rewriter import cli, verify
from rewriter.backends import tvm as backend
from rewriter.backends.tvm import targets, tuning
from rewriter.backends.tvm.tuning import measure, search
from rewriter.backends.tvm.verify import COMPILED_TOLERANCE
from rewriter.errors import InputError
from rewriter.registry import create_pass
from tests.helpers import to_proto

TOLERANCE = COMPILED_TOLERANCE["float32"]
SEED = 0


def linear(m: int, k: int, n: int, *, softmax: bool = False) -> onnx.ModelProto:
    """``MatMul(x, W) + b`` (optionally then Softmax) with ``x`` of ``m x k``."""
    rng = np.random.default_rng(SEED)
    weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["z"]),
    ]
    nodes.append(
        helper.make_node("Softmax", ["z"], ["y"], axis=-1)
        if softmax
        else helper.make_node("Identity", ["z"], ["y"])
    )
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [weight, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def two_pass(model: onnx.ModelProto) -> onnx.ModelProto:
    result = create_pass("two-pass-softmax")(ir.serde.deserialize_model(model))
    assert result.modified
    return to_proto(result.model)


def feeds_for(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(SEED + 1).standard_normal(shape).astype(np.float32)}


def assert_best_record_agrees_with_ort(
    model: onnx.ModelProto, database: Path, scratch: Path, task: str
) -> None:
    """Compile with the search's best record applied, whichever was chosen (a copy of the
    database without our choices applies its best as MetaSchedule would)."""
    copy = scratch / "records-only"
    shutil.copytree(database, copy, ignore=shutil.ignore_patterns(search.CHOICES_FILE))
    compiled = backend.compile(model, "avx512", tune_db=copy)
    assert compiled.tuning is not None and compiled.tuning.applied == [task]
    assert_agrees_with_ort(model, compiled)


def assert_agrees_with_ort(model: onnx.ModelProto, compiled: backend.Compiled) -> None:
    feeds = feeds_for(model)
    reference = verify.run(model.SerializeToString(), feeds)["y"]
    comparison = verify.compare("y", reference, compiled.run(feeds)["y"])
    scale = float(np.abs(reference).max())
    assert TOLERANCE.allows(comparison.max_abs_err, scale), (comparison.max_abs_err, scale)


class TuningForbidden(AssertionError):
    pass


def forbid_tuning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to measure a candidate fail the test."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise TuningForbidden("the compile tried to tune")

    monkeypatch.setattr(measure, "Measure", refuse)


# --- options, keys, budget --------------------------------------------------------------


def test_allocate_splits_trials_by_flops_and_skips_zero_weights():
    assert search.allocate(10, [3.0, 1.0, 0.0]) == [8, 2, 0]
    assert search.allocate(1, [5.0, 1.0]) == [1, 0]
    assert search.allocate(7, [1.0, 1.0, 1.0]) == [3, 2, 2]
    assert search.allocate(0, [1.0]) == [0]
    assert search.allocate(5, [0.0, 0.0]) == [0, 0]


@pytest.mark.parametrize(
    ("target", "trials", "database", "seconds", "message"),
    [
        ("avx512", -1, None, None, "expected a number of trials >= 0"),
        ("cuda", 8, None, None, "GPU"),
        ("avx512", None, None, 10.0, "--tune-time needs --tune"),
        ("avx512", 8, None, 0.0, "positive number of seconds"),
        ("avx512", 8, None, math.inf, "positive number of seconds"),
        ("avx512", None, "missing-db", None, "no tuning database"),
    ],
)
def test_bad_tuning_options_are_input_errors(target, trials, database, seconds, message, tmp_path):
    database = str(tmp_path / database) if database else None
    with pytest.raises(InputError, match=message):
        search.check_options(target, trials, database, seconds)
    with pytest.raises(InputError, match=message):  # before the model is read
        backend.compile(
            linear(4, 8, 8), target, tune=trials, tune_db=database, tune_seconds=seconds
        )


def test_database_key_separates_targets_and_core_counts(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    avx512 = search.default_database(targets.resolve("avx512"))
    assert avx512.parent == tmp_path / "rewriter" / "tuning"
    assert avx512.name.startswith("llvm-x86-64-v4-2c-")
    assert search.default_database(targets.resolve("avx2")) != avx512
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    assert "-1c-" in search.default_database(targets.resolve("avx512")).name


def doubled(shape: tuple[object, ...]) -> tvm.IRModule:
    """``y = x * 2`` over ``shape`` as a task's workload module."""
    from tvm import te

    x = te.placeholder(shape, name="x")
    y = te.compute(shape, lambda i, j: x[i, j] * 2.0, name="y")
    return tvm.IRModule({"main": te.create_prim_func([x, y])})


def test_functions_with_symbolic_shapes_are_not_tuned():
    assert search.task_flops(doubled((4, 8))) == 32.0
    assert search.task_flops(doubled((tvm.tirx.Var("rows", "int64"), 8))) == 0.0


def test_untuned_compile_reads_no_database(monkeypatch):
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise TuningForbidden("an untuned compile built a tuning stage")

    monkeypatch.setattr(tuning, "Tuner", refuse)
    model = linear(8, 16, 16)
    compiled = backend.compile(model, "avx512")
    assert compiled.tuning is None
    assert_agrees_with_ort(model, compiled)


# --- the time limit ----------------------------------------------------------------------


class FakeRun:
    """A runner result: three timed repeats, or an error."""

    def __init__(self, seconds: float | None) -> None:
        self.error_msg = None if seconds is not None else "LocalRunner: Timeout"
        self.run_secs = [seconds] * 3 if seconds is not None else None


@pytest.mark.parametrize("past_deadline", [False, True])
def test_time_limit_ends_the_task_after_its_batch(past_deadline):
    lines: list[str] = []
    ended: list[bool] = []
    deadline = -math.inf if past_deadline else math.inf
    watch = measure.Watch(8, deadline, "tuning 1/1 fused_matmul_add", lines.append)
    watch.batch(
        [FakeRun(1e-5), FakeRun(None), FakeRun(3e-5), FakeRun(2e-5)], lambda: ended.append(True)
    )
    assert watch.valid == 3 and watch.measured == 4
    assert lines[0] == "tuning 1/1 fused_matmul_add [#####-----] 4/8 trials, best 10.0 us"
    assert ended == ([True] if past_deadline else [])
    assert watch.stopped_by_time is past_deadline
    watch.batch([FakeRun(1e-5)] * 4, lambda: ended.append(True))  # the budget is spent
    assert ended == ([True] if past_deadline else [])


def test_time_limit_reached_before_tuning_keeps_our_schedules(tmp_path):
    model = linear(8, 16, 16)
    compiled = backend.compile(model, "avx512", tune=8, tune_db=tmp_path, tune_seconds=1e-9)
    report = compiled.tuning
    assert report is not None and report.stopped_by_time
    assert report.counts()["untuned"] == len(report.tasks) >= 1
    assert report.applied == []
    assert_agrees_with_ort(model, compiled)


# --- the database: applied before our rules, reused without tuning -------------------------


def snapshot(mod: tvm.IRModule) -> tvm.IRModule:
    """A copy of ``mod``'s function table (later passes replace functions in place)."""
    return tvm.IRModule(dict(mod.functions_items()))


def legalized(model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch) -> tvm.IRModule:
    """The module the tuning stage sees (after fusion and weight packing)."""
    seen: list[tvm.IRModule] = []
    apply = search.apply_database

    def spy(mod, target, directory):  # type: ignore[no-untyped-def]
        seen.append(snapshot(mod))
        return apply(mod, target, directory)

    monkeypatch.setattr(search, "apply_database", spy)
    backend.compile(model, "avx512", tune=0, tune_db=Path("/nonexistent/rewriter-tuning"))
    monkeypatch.setattr(search, "apply_database", apply)
    return seen[0]


def test_database_record_is_applied_and_reused_without_tuning(monkeypatch, tmp_path):
    """A MetaSchedule schedule put in the database by hand (sampled, not tuned): compiles
    with the database use it for that function, ours for the rest, and do not tune."""
    from tvm.s_tir import meta_schedule as ms

    model = two_pass(linear(16, 32, 64, softmax=True))  # the softmax: our kernel
    mod = legalized(model, monkeypatch)
    target = search.tuning_target(targets.resolve("avx512"))
    tasks = [
        task
        for task in ms.relax_integration.extract_tasks(mod, target)
        if not search.is_scheduled(task.dispatched[0]["main"]) and "matmul" in task.task_name
    ]
    assert len(tasks) == 1
    task = tasks[0]
    measure.import_tensor_intrinsics()
    context = ms.TuneContext(
        mod=task.dispatched[0],
        target=target,
        space_generator="post-order-apply",
        search_strategy="replay-trace",
        rand_state=SEED,
        num_threads=1,
    )
    context.pre_tuning(1, 1, context.generate_design_space(), None, None)
    (candidate,) = context.generate_measure_candidates()
    database = ms.database.JSONDatabase(work_dir=str(tmp_path))
    database.commit_tuning_record(
        ms.database.TuningRecord(
            candidate.sch.trace,
            database.commit_workload(task.dispatched[0]),
            [1e-6],
            target,
            candidate.args_info,
        )
    )
    expected = database.query_schedule(task.dispatched[0], target, task.task_name).mod["main"]

    applied_modules: list[tvm.IRModule] = []
    apply = search.apply_database

    def spy(mod, target, directory):  # type: ignore[no-untyped-def]
        result = apply(mod, target, directory)
        applied_modules.append(snapshot(result[0]))
        return result

    monkeypatch.setattr(search, "apply_database", spy)
    forbid_tuning(monkeypatch)
    for options in ({"tune_db": tmp_path}, {"tune": 16, "tune_db": tmp_path}):
        compiled = backend.compile(model, "avx512", **options)
        report = compiled.tuning
        assert report is not None and report.applied == [task.task_name]
        if "tune" in options:  # the task has a record: reused, nothing tuned
            by_name = {result.name: result for result in report.tasks}
            assert by_name[task.task_name].status == "reused"
            assert by_name[task.task_name].best_us == pytest.approx(1.0)
            assert report.counts()["tuned"] == 0
        assert_agrees_with_ort(model, compiled)
    by_name = {gv.name_hint: func for gv, func in applied_modules[-1].functions_items()}
    assert tvm_ffi.structural_equal(by_name[task.task_name].body, expected.body)
    before = {gv.name_hint: func for gv, func in mod.functions_items()}
    others = [name for name, func in by_name.items() if isinstance(func, tvm.tirx.PrimFunc)]
    others.remove(task.task_name)
    assert others  # our softmax kernel at least
    for name in others:  # untouched: our kernel as it was, the rest left to our rules
        assert tvm_ffi.structural_equal(by_name[name], before[name]), name

    # Where our schedule was timed faster side by side, the record is not applied.
    key = search.workload_key(task.dispatched[0]["main"])
    search.save_choice(tmp_path, key, {"task": task.task_name, "choice": "ours"})
    compiled = backend.compile(model, "avx512", tune_db=tmp_path)
    assert compiled.tuning is not None and compiled.tuning.applied == []
    by_name = {gv.name_hint: func for gv, func in applied_modules[-1].functions_items()}
    assert tvm_ffi.structural_equal(by_name[task.task_name], before[task.task_name])
    assert_agrees_with_ort(model, compiled)


# --- tuning for real (a tiny matmul, 2 trials) ----------------------------------------------


@pytest.fixture(scope="module")
def tuned(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[onnx.ModelProto, Path, backend.Compiled, list[str]]:
    """A tiny matmul tuned with 2 trials (measured quickly: 1 repeat of >= 1 ms)."""
    database = tmp_path_factory.mktemp("tuning")
    model = linear(16, 32, 64)
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(measure, "REPEATS", 1)
        patch.setattr(measure, "MIN_REPEAT_MS", 1)
        compiled = backend.compile(model, "avx512", tune=2, tune_db=database, progress=lines.append)
    return model, database, compiled, lines


def test_tuning_measures_records_and_agrees_with_ort(tuned, tmp_path):
    model, database, compiled, lines = tuned
    report = compiled.tuning
    assert report is not None and report.database == str(database)
    (task,) = [result for result in report.tasks if result.flop_share > 0]
    assert task.status == "tuned", task
    assert 1 <= task.trials <= 2
    assert task.ours_us is not None and task.best_us is not None  # timed side by side
    assert task.choice == ("tuned" if task.best_us < task.ours_us else "ours")
    assert report.applied == ([task.name] if task.choice == "tuned" else [])
    choices = json.loads((database / search.CHOICES_FILE).read_text())["workloads"]
    assert [entry["choice"] for entry in choices.values()] == [task.choice]
    assert search.has_database(database)
    assert "Trial #1" in (database / "logs" / "tuning.log").read_text()
    assert lines[0].startswith(f"tuning: {len(report.tasks)} tasks, 0 in the database")
    assert any(line.startswith(f"tuning 1/1 {task.name} [") for line in lines)
    assert lines[-1].startswith(f"tuning 1/1 {task.name}: best ")  # the side-by-side verdict
    assert_agrees_with_ort(model, compiled)
    assert_best_record_agrees_with_ort(model, database, tmp_path, task.name)


def test_second_compile_reuses_the_database_without_tuning(tuned, monkeypatch):
    model, database, first, _ = tuned
    forbid_tuning(monkeypatch)
    compiled = backend.compile(model, "avx512", tune=2, tune_db=database)
    report = compiled.tuning
    assert report is not None and first.tuning is not None
    (task,) = [result for result in report.tasks if result.flop_share > 0]
    assert task.status == "reused" and task.trials == 0
    (tuned_task,) = [result for result in first.tuning.tasks if result.flop_share > 0]
    assert (task.choice, task.ours_us, task.best_us) == (
        tuned_task.choice,
        tuned_task.ours_us,
        tuned_task.best_us,
    )
    assert report.applied == first.tuning.applied
    assert_agrees_with_ort(model, compiled)


def test_cli_tune_reports_reused_tasks(tuned, monkeypatch, tmp_path, capsys):
    model, database, first, _ = tuned
    assert first.tuning is not None
    forbid_tuning(monkeypatch)
    path, report = tmp_path / "linear.onnx", tmp_path / "report.json"
    onnx.save(model, str(path))
    argv = [str(path), "--passes", "two-pass-softmax", "-o", str(tmp_path / "out.onnx")]
    argv += [
        "--target",
        "avx512",
        "--tune",
        "2",
        "--tune-db",
        str(database),
        "--report-json",
        str(report),
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "tuning: 0 tasks tuned (0 trials" in printed and "1 reused" in printed
    compiled = json.loads(report.read_text())["compiled"]
    assert compiled["passed"] is True
    assert compiled["tuning"]["counts"]["reused"] == 1
    assert compiled["tuning"]["applied"] == first.tuning.applied


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tune", "4"], "--tune needs --target"),
        (["--tune-db", "MISSING"], "--tune-db needs --target"),
        (["--target", "avx512", "--tune", "-1"], "expected a number of trials >= 0"),
        (["--target", "cuda", "--tune", "4"], "GPU"),
        (["--target", "avx512", "--tune-time", "10"], "--tune-time needs --tune"),
        (["--target", "avx512", "--tune", "4", "--tune-time", "-5"], "positive number of seconds"),
        (["--target", "avx512", "--tune-db", "MISSING"], "no tuning database"),
    ],
)
def test_cli_bad_tuning_options_one_line_exit_2(options, message, tmp_path, capsys):
    path = tmp_path / "linear.onnx"
    onnx.save(linear(4, 8, 8), str(path))
    options = [str(tmp_path / "missing") if option == "MISSING" else option for option in options]
    code = cli.main(
        [str(path), "--passes", "two-pass-softmax", "-o", str(tmp_path / "o.onnx"), *options]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("rewrite: error: ") and message in err
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.slow(reason="tunes a 128x256x256 matmul with 8 trials (~1-2 min on 2 cores)")
def test_tuned_matmul_agrees_with_ort(tmp_path):
    model = linear(128, 256, 256)
    compiled = backend.compile(model, "avx512", tune=8, tune_db=tmp_path / "db")
    report = compiled.tuning
    assert report is not None
    (task,) = [result for result in report.tasks if result.flop_share > 0]
    assert task.status == "tuned" and task.trials >= 1
    assert report.applied == ([task.name] if task.choice == "tuned" else [])
    assert_agrees_with_ort(model, compiled)
    assert_best_record_agrees_with_ort(model, tmp_path / "db", tmp_path, task.name)
