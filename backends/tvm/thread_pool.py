"""The thread pool that a loaded library's parallel loops run on, in place of TVM's.

Every parallel loop of a CPU kernel is a call to ``TVMBackendParallelLaunch``, through
the library's function pointer ``__TVMBackendParallelLaunch`` (which TVM's loader fills
in). TVM's launcher splits the loop into one static share per thread and waits until
every worker has run its share. A worker that sleeps between launches (as the
benchmarks require: ``TVM_THREAD_POOL_SPIN_COUNT=0``, and any pool whose idle threads
must not take CPU from others) takes tens of microseconds to wake, on a virtual machine
more: on the 2-vCPU KVM guest of ``benchmarks/zoo.py`` an empty parallel loop took
11-43 us against 1.2 us with a spinning worker, and ResNet-18 runs ~45 parallel loops
per call.

This pool, a few lines of C (:data:`SOURCE`) compiled once per machine and user into
the cache (:func:`pool`), does two things differently:

1. **The caller never waits for a worker that has not started.** The loop's shares are
   claimed from one atomic counter; the calling thread claims them too, and returns as
   soon as every share is done. A worker that wakes late finds none left.
2. **Within a call of the model, workers wait by spinning; between calls they sleep.**
   :meth:`rewriter.backends.tvm.Session.run` raises the pool's *hot* count for the
   duration of the call (:func:`hot`), and wakes the workers at its start, so their
   wake-up overlaps the call's first kernels, and each later launch finds them awake.
   When the call returns they go back to sleep, after ``TVM_THREAD_POOL_SPIN_COUNT``
   yields, as TVM's workers do (its default: 300000). An idle library takes no CPU.

It runs ``TVM_NUM_THREADS`` threads (else one per physical core, as TVM), capped at the
CPUs this process may use. A parallel loop inside another (nested), or one launched
while another thread's launch is running, runs on its calling thread; so does every
loop of a child forked after the pool started (it has none of the workers). Libraries
that use ``TVMBackendParallelBarrier`` (none of ours do) keep TVM's launcher, and
``REWRITER_THREAD_POOL=tvm`` keeps it everywhere; so does a machine without a C
compiler (logged). Only libraries loaded from a file (:func:`rewriter.backends.tvm.load`)
are switched: the module of an in-memory build has no symbol table to reach.

An error inside a share (a failed check in a kernel) fails the launch, as with TVM's
pool, but its message stays on the thread that ran the share.

Measured (``benchmarks/zoo.py`` inputs, 2 threads, batch 1, against ONNX Runtime on the
same inputs, both pools' idle threads sleeping): ResNet-18 1.01-1.02 -> 0.82-0.83x,
BERT 0.80-0.81 -> 0.65-0.67x (the README has every model). Against ONNX Runtime with
its own default, spinning threads, each timed alone: 0.87x and 0.91x.

>>> install("model.so")  # doctest: +SKIP
True
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The environment variable that keeps TVM's launcher (value ``tvm``).
ENV = "REWRITER_THREAD_POOL"
# TVM's default spin count (yields before an idle worker sleeps), when the variable is unset.
TVM_SPIN_COUNT = 300000

SOURCE = r"""
#define _GNU_SOURCE
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#define PAUSE() __builtin_ia32_pause()
#else
#define PAUSE() ((void)0)
#endif

typedef struct { void* sync_handle; int32_t num_task; } GroupEnv;
typedef int (*Lambda)(int task, GroupEnv* env, void* data);

static int threads = 1, spin_count;
/* The current job: generation (32 bits) | shares (16) | next share to claim (16). */
static _Atomic uint64_t state;
static _Atomic uint32_t generation;
/* The futex word the workers sleep on: bumped by every launch and every hot(+1). */
static _Atomic uint32_t signal_word;
static _Atomic int active, sleepers, failed, hot, busy;
static Lambda job;
static void* job_data;
static _Thread_local int inside;
static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;
static int started;

static void wake(void) {
  atomic_fetch_add(&signal_word, 1);
  if (atomic_load(&sleepers) > 0)
    syscall(SYS_futex, &signal_word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* Run shares of job `gen` until none is left (or a newer job replaced it). */
static void claim(uint32_t gen) {
  for (;;) {
    uint64_t s = atomic_load(&state);
    uint32_t shares = (uint32_t)(s >> 16) & 0xffff, next = (uint32_t)s & 0xffff;
    if ((uint32_t)(s >> 32) != gen || next >= shares) return;
    if (!atomic_compare_exchange_weak(&state, &s, s + 1)) continue;
    GroupEnv env = {NULL, (int32_t)shares};
    inside = 1;
    if (job((int)next, &env, job_data) != 0) atomic_store(&failed, 1);
    inside = 0;
  }
}

static void* worker(void* unused) {
  (void)unused;
  uint32_t seen = atomic_load(&generation);
  int spins = spin_count;
  for (;;) {
    uint32_t signal = atomic_load(&signal_word);
    uint32_t gen = atomic_load(&generation);
    if (gen != seen) {
      seen = gen;
      atomic_fetch_add(&active, 1);
      claim(gen);
      atomic_fetch_sub(&active, 1);
      spins = spin_count;
      continue;
    }
    if (atomic_load(&hot) > 0) {  /* a call of the model is running: the next launch is near */
      for (int i = 0; i < 16; i++) PAUSE();
      sched_yield();  /* a thread waiting for this CPU (more threads than CPUs) gets it */
      continue;
    }
    if (spins > 0) {
      spins--;
      sched_yield();
      continue;
    }
    atomic_fetch_add(&sleepers, 1);
    if (atomic_load(&signal_word) == signal)
      syscall(SYS_futex, &signal_word, FUTEX_WAIT_PRIVATE, signal, NULL, NULL, 0);
    atomic_fetch_sub(&sleepers, 1);
  }
  return NULL;
}

/* A child forked from this process has none of its workers: it runs every loop itself. */
static void forked_child(void) {
  threads = 1;
  atomic_store(&active, 0);
  atomic_store(&busy, 0);
  atomic_store(&sleepers, 0);
  atomic_store(&hot, 0);
}

int rewriter_pool_start(int n_threads, int spins) {
  pthread_mutex_lock(&start_lock);
  if (!started) {
    started = 1;
    pthread_atfork(NULL, NULL, forked_child);
    spin_count = spins;
    threads = 1;
    for (int t = 1; t < n_threads && t < 0xffff; t++) {
      pthread_t id;
      pthread_attr_t attr;
      pthread_attr_init(&attr);
      pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
      int failed_to_start = pthread_create(&id, &attr, worker, NULL);
      pthread_attr_destroy(&attr);
      if (failed_to_start) break;
      threads++;
    }
  }
  pthread_mutex_unlock(&start_lock);
  return threads;
}

int rewriter_parallel_launch(Lambda f, void* data, int num_task) {
  (void)num_task;
  int idle = 0;
  if (inside || threads <= 1 || !atomic_compare_exchange_strong(&busy, &idle, 1)) {
    GroupEnv env = {NULL, 1};  /* nested, one thread, or another caller's launch running */
    return f(0, &env, data);
  }
  job = f;
  job_data = data;
  atomic_store(&failed, 0);
  uint32_t gen = atomic_load(&generation) + 1;
  atomic_store(&state, ((uint64_t)gen << 32) | ((uint64_t)threads << 16));
  atomic_store(&generation, gen);
  wake();
  claim(gen);
  while (atomic_load(&active) != 0) PAUSE();
  int result = atomic_load(&failed) ? -1 : 0;
  atomic_store(&busy, 0);
  return result;
}

void rewriter_pool_hot(int delta) {
  if (atomic_fetch_add(&hot, delta) + delta > 0 && delta > 0) wake();
}
"""

_lock = threading.Lock()


def cache_dir() -> Path:
    """Where the compiled pool is kept: ``$XDG_CACHE_HOME/rewriter`` (``~/.cache/rewriter``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "rewriter"


def threads() -> int:
    """The pool's threads: ``TVM_NUM_THREADS``, else one per physical core (as TVM), at
    most the CPUs this process may run on."""
    from rewriter.backends.tvm.tuning.search import num_cores

    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    return max(1, min(num_cores(), allowed))


def spin_count() -> int:
    """Yields before an idle worker sleeps: ``TVM_THREAD_POOL_SPIN_COUNT``, TVM's meaning."""
    configured = os.environ.get("TVM_THREAD_POOL_SPIN_COUNT", "")
    return int(configured) if configured.isdigit() else TVM_SPIN_COUNT


@functools.cache
def pool() -> Any:
    """The started pool (a ``ctypes.CDLL``), or None where ``REWRITER_THREAD_POOL=tvm``
    or it cannot be built (no C compiler: logged)."""
    if os.environ.get(ENV, "").lower() == "tvm":
        return None
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    library = cache_dir() / f"thread_pool-{digest}.so"
    try:
        if not library.is_file():
            _build(library)
        loaded = ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError) as exc:
        logger.info("parallel loops stay on TVM's thread pool: %s", exc)
        return None
    loaded.rewriter_pool_start.argtypes = [ctypes.c_int, ctypes.c_int]
    loaded.rewriter_pool_hot.argtypes = [ctypes.c_int]
    loaded.rewriter_pool_hot.restype = None
    loaded.rewriter_pool_start(threads(), spin_count())
    return loaded


def _build(library: Path) -> None:
    """Compile :data:`SOURCE` into ``library`` (written whole or not at all)."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on the PATH")
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as work:
        source = Path(work) / "thread_pool.c"
        source.write_text(SOURCE)
        built = Path(work) / library.name
        command = [compiler, "-std=gnu11", "-O2", "-shared", "-fPIC", "-pthread"]
        done = subprocess.run(
            [*command, "-o", str(built), str(source)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["failed"]
            raise OSError(f"{compiler} could not build the thread pool: {lines[0]}")
        os.replace(built, library)


def install(path: str | os.PathLike[str]) -> bool:
    """Point the parallel loops of the library at ``path`` (loaded by TVM already) at the
    pool; False where they stay on TVM's (see the module docstring)."""
    import _ctypes

    started = pool()
    if started is None:
        return False
    with _lock:
        library = ctypes.CDLL(os.path.realpath(path))  # TVM's mapping (dlopen finds it)
        try:
            launch = _pointer(library, "__TVMBackendParallelLaunch")
            if launch is None:  # no parallel loop in the library
                return False
            if _pointer(library, "__TVMBackendParallelBarrier") is not None:
                return False  # barriers inside a loop assume TVM's one share per thread
            launch.value = ctypes.cast(started.rewriter_parallel_launch, ctypes.c_void_p).value
            return True
        finally:
            _ctypes.dlclose(library._handle)  # TVM's reference keeps it loaded, not ours


def _pointer(library: ctypes.CDLL, name: str) -> ctypes.c_void_p | None:
    """The function pointer ``name`` that ``library`` exports, or None."""
    try:
        return ctypes.c_void_p.in_dll(library, name)
    except ValueError:
        return None


def hot(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` (a call of a library on the pool) with the pool's workers spinning,
    not sleeping, while it runs."""
    started = pool()
    if started is None:
        return function
    raise_hot = started.rewriter_pool_hot

    def call(*args: Any) -> Any:
        raise_hot(1)
        try:
            return function(*args)
        finally:
            raise_hot(-1)

    return call
