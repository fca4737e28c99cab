"""The thread pool of loaded libraries (:mod:`rewriter.backends.tvm.thread_pool`).

Each check runs in a child process: the pool's threads are fixed when it starts, once per
process, and the child sets them (``TVM_NUM_THREADS=2``) and the cache it builds the pool
into. The pool splits a parallel loop into the same shares as TVM's launcher (one per
thread), so its outputs equal those of the same code on TVM's pool exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# A matmul whose parallel loop is far over parallel_cost.PARALLEL_MIN_NS, with a bias and
# ReLU after it: [256, 512] x [512, 512].
SCRIPT = textwrap.dedent(
    """
    import ctypes, os, sys, threading
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from rewriter.backends import tvm as backend
    from rewriter.backends.tvm import thread_pool

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((512, 512)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(512).astype(np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    compiled = backend.compile(model, "avx512")
    x = rng.standard_normal((256, 512)).astype(np.float32)
    expected = compiled.run({"x": x})["y"]  # in memory: TVM's pool
    assert not compiled.thread_pool
    loaded = backend.load(compiled.export(sys.argv[1]))
    mode = sys.argv[2]
    if mode == "tvm":
        assert not loaded.thread_pool
        np.testing.assert_array_equal(loaded.run({"x": x})["y"], expected)
        print("ok")
        sys.exit()
    # Two threads, or as many CPUs as this process may use, if fewer.
    assert loaded.thread_pool and thread_pool.threads() == min(2, len(os.sched_getaffinity(0)))
    launch = ctypes.c_void_p.in_dll(ctypes.CDLL(sys.argv[1]), "__TVMBackendParallelLaunch")
    ours = ctypes.cast(thread_pool.pool().rewriter_parallel_launch, ctypes.c_void_p).value
    assert launch.value == ours
    for _ in range(20):
        np.testing.assert_array_equal(loaded.run({"x": x})["y"], expected)
    # Four Python threads, one session each, at once: a launch made while another
    # thread's runs is done on its caller.
    failures = []

    def runs():
        session = loaded.session()
        for _ in range(20):
            if not np.array_equal(session.run({"x": x})["y"], expected):
                failures.append("differs")

    workers = [threading.Thread(target=runs) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not failures, failures
    # A forked child has none of the workers: it runs every loop itself.
    child = os.fork()
    if child == 0:
        os._exit(0 if np.array_equal(loaded.run({"x": x})["y"], expected) else 1)
    assert os.waitpid(child, 0)[1] == 0
    print("ok")
    """
)


def _child(tmp_path, mode: str) -> str:
    env = dict(
        os.environ,
        TVM_NUM_THREADS="2",
        TVM_THREAD_POOL_SPIN_COUNT="0",
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        REWRITER_THREAD_POOL=mode,
    )
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "model.so"), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_loaded_library_runs_on_the_pool_and_equals_tvms_pool(tmp_path):
    assert _child(tmp_path, "ours").strip().endswith("ok")
    # Built once into the cache, whole.
    built = list((tmp_path / "cache" / "rewriter").glob("thread_pool-*.so"))
    assert len(built) == 1, built


def test_rewriter_thread_pool_tvm_keeps_tvms_launcher(tmp_path):
    assert _child(tmp_path, "tvm").strip().endswith("ok")
    assert not (tmp_path / "cache" / "rewriter").exists()
