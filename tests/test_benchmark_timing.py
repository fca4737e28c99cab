"""``benchmarks/timing.py``: the passive-thread environment every benchmark that times
several runtimes in one process uses (no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from benchmarks import timing

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_quiet_env_makes_idle_threads_sleep_and_sets_thread_counts():
    env = timing.quiet_env(2, {"PATH": "/bin", "OMP_WAIT_POLICY": "ACTIVE"})
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["TVM_THREAD_POOL_SPIN_COUNT"] == "0"
    assert env["TVM_NUM_THREADS"] == env["OMP_NUM_THREADS"] == "2" and env["PATH"] == "/bin"
    assert "TVM_NUM_THREADS" not in timing.quiet_env(None, {})


def test_quiet_threads_runs_the_script_again_with_the_passive_environment(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys
            sys.path.insert(0, {str(BENCHMARKS)!r})
            import timing
            print("start", sys.argv[1:], flush=True)
            timing.quiet_threads()
            print(os.environ["OMP_WAIT_POLICY"], os.environ["TVM_THREAD_POOL_SPIN_COUNT"], sys.argv[1:])
            """
        )
    )
    env = {
        key: value
        for key, value in timing.quiet_env(None).items()
        if key not in timing.QUIET_THREADS
    }
    done = subprocess.run(
        [sys.executable, str(script), "--rounds", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    # Started twice (the second time in the quiet environment), timed once.
    assert done.stdout.splitlines() == [
        "start ['--rounds', '3']",
        "start ['--rounds', '3']",
        "PASSIVE 0 ['--rounds', '3']",
    ]


def test_ort_options_do_not_spin():
    options = timing.ort_options(3)
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
