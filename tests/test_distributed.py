"""The Ray backend of the measuring passes: the same bits as the serial run.

The tests that need Ray (the ``distributed`` extra) share one local Ray of two CPUs,
started by the module's fixture through :class:`rewriter.distributed.Pool` (as the CLI's
``--workers 2`` starts it) and shut down in its teardown; they skip where Ray is not
installed. The serial path and the option checks run everywhere.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest

from rewriter import cli, distributed
from rewriter.errors import InputError
from rewriter.pass_base import PassContext
from rewriter.passes.pruning import prune
from rewriter.passes.quantize import QuantizeOptions, QuantizePass
from tests.helpers import to_proto
from tests.passes.pruning.test_prune import mlp_model
from tests.passes.quantize.test_quantize import residual_model

needs_ray = pytest.mark.skipif(not distributed.available(), reason="Ray is not installed (the distributed extra)")
# A Ray test that has not finished by then fails (SIGALRM) rather than hang the suite.
RAY_TEST_SECONDS = 240


def calibration(count: int, shape: tuple[int, ...], seed: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


class Doubler:
    """A worker for :func:`distributed.map_tasks`: built once, it counts its calls."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.calls = 0

    def __call__(self, task: int) -> tuple[int, int]:
        self.calls += 1
        return 2 * task + self.offset, self.calls


def test_serial_map_builds_one_worker_and_keeps_the_order() -> None:
    assert distributed.map_tasks(None, Doubler, (1,), [3, 1, 2]) == [(7, 1), (3, 2), (5, 3)]
    assert distributed.map_tasks(None, Doubler, (1,), []) == []


def test_no_workers_means_no_pool() -> None:
    assert PassContext().pool() is None


@pytest.mark.parametrize("workers", [0, -2, True])
def test_bad_worker_counts_are_input_errors(workers: int) -> None:
    with pytest.raises(InputError, match="--workers"):
        distributed.Pool(workers)


def test_without_ray_the_cli_says_how_to_install_it(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(distributed, "available", lambda: False)
    model = tmp_path / "m.onnx"
    onnx.save(to_proto(mlp_model()), model)
    code = cli.main([str(model), "--passes", "prune", "-o", str(tmp_path / "out.onnx"), "--workers", "2"])
    assert code == 2
    assert "rewriter[distributed]" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


@pytest.fixture(autouse=True)
def hard_timeout() -> Iterator[None]:
    """Fail a test still running after :data:`RAY_TEST_SECONDS` (a stuck Ray, say)."""

    def expire(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"test still running after {RAY_TEST_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(RAY_TEST_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def ray_pool() -> Iterator[distributed.Pool]:
    """A local Ray of two CPUs for the module, shut down at its end (it holds no actors:
    each test's pool joins this Ray and ends its own actors)."""
    if not distributed.available():
        pytest.skip("Ray is not installed (the distributed extra)")
    import ray

    pool = distributed.Pool(workers=2)
    try:
        assert pool.start() == 2
        yield pool
    finally:
        pool.close()
    assert not ray.is_initialized()


@needs_ray
def test_prune_curves_are_the_serial_bits(ray_pool: distributed.Pool) -> None:
    model = mlp_model()
    layers, _ = prune.prunable_layers(model)
    amounts = np.linspace(0.0, 0.9, 10)
    batches = calibration(3, (4, 8))
    options = prune.PruneOptions()
    serial = prune.measure_curves(model, layers, amounts, batches, options)
    with distributed.Pool(workers=2) as pool:
        spread = prune.measure_curves(model, layers, amounts, batches, options, pool=pool)
        # A second map reuses the pool's two actors (their processes are started once).
        again = prune.measure_curves(model, layers, amounts, batches, options, pool=pool)
        assert len(pool._actors) == 2
    assert np.array_equal(serial, spread) and np.array_equal(serial, again)
    # Each layer's curve is its own: a mix-up of the order would show.
    assert len({row.tobytes() for row in serial}) == len(layers) == 3


@needs_ray
@pytest.mark.slow
def test_prune_pass_with_workers_writes_the_serial_weights(ray_pool: distributed.Pool) -> None:
    """Through PassContext(workers=2), as the job does (the fixture's Ray is joined)."""
    batches = calibration(2, (4, 8))
    results = []
    for workers in (None, 2):
        model = mlp_model()
        rewrite = prune.PrunePass(prune.PruneOptions(sparsity=0.6, steps=16))
        rewrite.context = PassContext(calibration=batches, workers=workers)
        result = rewrite(model)
        rewrite.context.close()
        results.append((to_proto(result.model).SerializeToString(), result.tables))
    assert results[0] == results[1]


@needs_ray
@pytest.mark.slow
def test_quantize_lim_is_the_serial_importance(ray_pool: distributed.Pool) -> None:
    results = []
    for workers in (None, 2):
        rewrite = QuantizePass(QuantizeOptions(avg_bits=7.0, importance="lim"))
        rewrite.context = PassContext(calibration=calibration(3, (2, 4, 32)), workers=workers)
        result = rewrite(residual_model(second_scale=0.01))
        rewrite.context.close()
        results.append(result)
    serial, spread = results
    assert [row["importance"] for row in serial.tables["layers"]] == [row["importance"] for row in spread.tables["layers"]]
    assert to_proto(serial.model).SerializeToString() == to_proto(spread.model).SerializeToString()
    assert any("Ray workers" in note for note in spread.notes)
    assert not any("Ray workers" in note for note in serial.notes)


@needs_ray
@pytest.mark.slow
def test_cli_workers_writes_the_serial_model(ray_pool: distributed.Pool, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(to_proto(mlp_model()), model)
    np.savez(tmp_path / "cal.npz", **calibration(1, (4, 8), seed=5)[0])
    outputs = []
    for name, extra in (("serial", []), ("ray", ["--workers", "2"])):
        out = tmp_path / f"{name}.onnx"
        spec = "prune(sparsity=0.5,steps=8)"
        args = [str(model), "--passes", spec, "--calibration", str(tmp_path / "cal.npz"), "-o", str(out), "-q"]
        assert cli.main(args + extra) == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
