"""MetaSchedule tuning on TVM's RPC devices (``--tune-rpc HOST:PORT --tune-key KEY``).

A TVM RPC tracker and one RPC server registered under a key are started on the loopback
address by the module's fixture (``tvm.rpc.tracker.Tracker``, ``tvm.rpc.server.Server``,
each in its own process) and terminated in its teardown. The tuned matmul is the one
of ``test_tuning.py`` (16 x 32 x 64, 2 trials), checked against ONNX Runtime at the
compiled tolerance.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import onnx
import pytest

from rewriter import cli
from rewriter.backends import tvm as backend
from rewriter.backends.tvm import tuning
from rewriter.backends.tvm.tuning import measure
from rewriter.errors import InputError
from tests.backends.tvm.test_tuning import assert_agrees_with_ort, linear

KEY = "rewriter-test"
LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def tracker() -> Iterator[tuning.Remote]:
    """A tracker with one server of :data:`KEY`, both on the loopback address."""
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    started = Tracker(host=LOOPBACK, port=9190, port_end=9290, silent=True)
    server = None
    try:
        server = Server(
            host=LOOPBACK, port=9300, port_end=9400, tracker_addr=(LOOPBACK, started.port), key=KEY, silent=True
        )
        remote = tuning.Remote(LOOPBACK, started.port, KEY)
        deadline = time.monotonic() + 60
        while remote.config().count_num_servers() < 1:  # the server registers in the background
            assert time.monotonic() < deadline, "the RPC server did not register with the tracker"
            time.sleep(0.2)
        yield remote
    finally:
        if server is not None:
            server.terminate()
        started.terminate()


def test_parse_checks_the_address_and_the_key() -> None:
    assert tuning.Remote.parse("[::1]:9190", "k") == tuning.Remote("::1", 9190, "k")
    for address in ("9190", "host:", "host:port", "host:70000", ":9190"):
        with pytest.raises(InputError, match="HOST:PORT"):
            tuning.Remote.parse(address, "k")
    with pytest.raises(InputError, match="--tune-key"):
        tuning.Remote.parse("host:9190", None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--target", "avx512", "--tune", "2", "--tune-rpc", "localhost:9190"], "needs --tune-key"),
        (["--target", "avx512", "--tune", "2", "--tune-key", "k"], "--tune-key needs --tune-rpc"),
        (["--target", "avx512", "--tune-rpc", "localhost:9190", "--tune-key", "k"], "--tune-rpc needs --tune"),
        (["--tune-rpc", "localhost:9190", "--tune-key", "k"], "--tune-rpc needs --target"),
        (["--target", "avx512", "--tune", "2", "--tune-rpc", "nowhere", "--tune-key", "k"], "HOST:PORT"),
    ],
)
def test_cli_bad_rpc_options_exit_2(options: list[str], message: str, tmp_path, capsys) -> None:
    path = tmp_path / "linear.onnx"
    onnx.save(linear(4, 8, 8), str(path))
    code = cli.main([str(path), "--passes", "two-pass-softmax", "-o", str(tmp_path / "o.onnx"), *options])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("rewrite: error: ") and message in err
    assert not (tmp_path / "o.onnx").exists()


def test_a_key_without_devices_is_an_input_error(tracker: tuning.Remote, tmp_path) -> None:
    missing = tuning.Remote(tracker.host, tracker.port, "no-such-device")
    with pytest.raises(InputError, match="no-such-device"):
        backend.compile(linear(16, 32, 64), "avx512", tune=2, tune_db=tmp_path, tune_rpc=missing)


@pytest.mark.slow(reason="tunes a 16x32x64 matmul with 2 trials measured over RPC (~1 min on 2 cores)")
def test_tuning_measures_on_the_rpc_device(tracker: tuning.Remote, tmp_path, monkeypatch) -> None:
    from tvm.s_tir.meta_schedule import runner

    monkeypatch.setattr(measure, "REPEATS", 1)
    monkeypatch.setattr(measure, "MIN_REPEAT_MS", 1)

    def no_local_runner(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a local runner was built: the candidates must run on the RPC device")

    monkeypatch.setattr(runner, "LocalRunner", no_local_runner)
    model = linear(16, 32, 64)
    lines: list[str] = []
    compiled = backend.compile(model, "avx512", tune=2, tune_db=tmp_path, tune_rpc=tracker, progress=lines.append)
    report = compiled.tuning
    assert report is not None and report.remote == f"{LOOPBACK}:{tracker.port} key {KEY}"
    (task,) = [result for result in report.tasks if result.flop_share > 0]
    assert task.status == "tuned" and 1 <= task.trials <= 2, task
    assert task.ours_us is not None and task.best_us is not None  # both timed on the device
    assert any("on the RPC devices 'rewriter-test'" in line for line in lines)
    assert_agrees_with_ort(model, compiled)
