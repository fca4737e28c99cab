"""Spreading a pass's independent evaluations over Ray workers (the ``distributed`` extra).

A pass that measures the model (``prune``'s distortion curves, ``quantize``'s LIM
importance) has many independent evaluations that each need the same loaded model. It
describes them as a *worker class*: ``Worker(*setup)`` loads what it needs once (an ONNX
Runtime session), and ``worker(task)`` evaluates one task. :func:`map_tasks` runs them:

* without a :class:`Pool` (the default), in this process, one worker, in order;
* with one, on Ray actors: each actor builds the worker once from ``setup`` (sent once
  through Ray's object store, so every node of a cluster sees it) and then evaluates
  tasks as they come (:class:`ray.util.ActorPool`: an idle actor takes the next task);
  the results come back in the order of ``tasks``.

Each evaluation computes the same thing whichever process runs it, so the results are
bit-identical to the serial run (ONNX Runtime's CPU kernels give the same bits at any
thread count; ``tests/test_distributed.py`` checks the passes end to end).

A pool is opened from the options of the run (:class:`rewriter.pass_base.PassContext`
``workers`` and ``ray_address``; ``--workers N`` / ``--ray-address ADDR`` on the CLI):
``workers`` actors of one CPU each (an ONNX Runtime session of one thread), on a local
Ray started for the run, or on the cluster at ``ray_address`` (every node needs this
package installed, with the same version).

>>> with Pool(workers=2) as pool:  # doctest: +SKIP
...     curves = map_tasks(pool, CurveWorker, (proto, weights, batches), layer_names)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from rewriter.errors import InputError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Threads of each worker's ONNX Runtime sessions: a worker is one Ray CPU.
WORKER_THREADS = 1
INSTALL_HINT = "pip install 'rewriter[distributed]'"
# The raylet's setting of its workers' niceness (read from the environment at ray.init).
NICENESS = "RAY_worker_niceness"


def available() -> bool:
    """True when Ray (the ``distributed`` extra) is installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


class Pool:
    """Ray actors for one run: a local Ray with ``workers`` CPUs, or the cluster at ``address``.

    ``workers``: actors per :func:`map_tasks` call (default with an ``address``: the
    cluster's CPUs). Ray is started (or joined) on first use and shut down by
    :meth:`close` if this pool started it; a Ray already initialized in this process is
    used as it is.

    >>> with Pool(workers=2) as pool:  # doctest: +SKIP
    ...     map_tasks(pool, Square, (), [1, 2, 3])
    [1, 4, 9]
    """

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        if workers is not None and (isinstance(workers, bool) or workers < 1):
            raise InputError(f"--workers {workers}: expected a number of workers >= 1")
        if workers is None and address is None:
            raise InputError("a Ray pool needs --workers N or --ray-address ADDR")
        if not available():
            raise InputError(f"--workers/--ray-address need Ray: {INSTALL_HINT}")
        self.workers = workers
        self.address = address
        self._started = False
        self._ready = False
        self._actors: list[Any] = []

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> int:
        """Start or join Ray now (else on first use); the number of actors a map uses."""
        import ray

        if not self._ready:
            if ray.is_initialized():
                logger.info("using the Ray already initialized in this process")
            elif self.address is not None:
                ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
                self._started = True
            else:
                # Ray runs its workers at niceness 15 by default, for background work; here
                # they are the run's foreground work, as the serial run would be.
                saved = os.environ.get(NICENESS)
                os.environ[NICENESS] = "0"
                try:
                    ray.init(
                        num_cpus=self.workers,
                        # Every process of a local Ray on this machine's loopback address.
                        _node_ip_address="127.0.0.1",
                        include_dashboard=False,
                        logging_level=logging.WARNING,
                        log_to_driver=False,
                    )
                finally:
                    if saved is None:
                        os.environ.pop(NICENESS)
                    else:
                        os.environ[NICENESS] = saved
                self._started = True
            self._ready = True
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if self.workers is not None and self.workers > cpus:
            # An actor takes one CPU: more than the cluster has would wait for ever.
            logger.warning("--workers %d: the Ray cluster has %d CPUs; using %d workers", self.workers, cpus, cpus)
        return min(self.workers, cpus) if self.workers is not None else cpus

    def map(self, worker: Callable[..., Callable[[T], R]], setup: Sequence[Any], tasks: Sequence[T]) -> list[R]:
        """``[worker(*setup)(task) for task in tasks]``, spread over the actors."""
        import ray
        from ray.util import ActorPool

        count = min(self.start(), len(tasks))
        if not count:
            return []
        start = time.perf_counter()
        actors = self._hosts(count)
        shared = [ray.put(value) for value in setup]  # once, whatever the number of actors
        ray.get([actor.setup.remote(worker, *shared) for actor in actors])
        results = list(ActorPool(actors).map(lambda actor, task: actor.run.remote(task), list(tasks)))
        logger.info(
            "%d tasks of %s on %d Ray workers in %.1f s",
            len(tasks), getattr(worker, "__name__", worker), count, time.perf_counter() - start,
        )
        return results

    def start_workers(self) -> int:
        """Start the worker processes now (else the first map does) and wait until they are
        up; the number of workers."""
        import ray

        count = self.start()
        ray.get([actor.ready.remote() for actor in self._hosts(count)])
        return count

    def _hosts(self, count: int) -> list[Any]:
        """``count`` actors: those of earlier maps (their processes live as long as the
        pool, so a second pass's map reuses them), and new ones."""
        import ray

        host: Any = ray.remote(num_cpus=WORKER_THREADS)(_Host)
        self._actors += [host.remote() for _ in range(count - len(self._actors))]
        return self._actors[:count]

    def close(self) -> None:
        """End the actors, and shut Ray down if this pool started it."""
        if self._actors:
            import ray

            for actor in self._actors:
                ray.kill(actor)
            self._actors = []
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
        self._ready = False


class _Host:
    """A Ray actor holding one worker: built once per map (``setup``), then called per task."""

    def __init__(self) -> None:
        self.worker: Callable[[Any], Any] | None = None

    def setup(self, worker: Callable[..., Callable[[Any], Any]], *setup: Any) -> None:
        self.worker = None  # the previous map's worker goes first
        self.worker = worker(*setup)

    def ready(self) -> bool:
        return True

    def run(self, task: Any) -> Any:
        assert self.worker is not None
        return self.worker(task)


def map_tasks(
    pool: Pool | None,
    worker: Callable[..., Callable[[T], R]],
    setup: Sequence[Any],
    tasks: Sequence[T],
) -> list[R]:
    """Evaluate ``tasks`` with ``worker(*setup)``: in this process, or on ``pool``'s actors.

    ``worker`` must be importable by module and name (a class at a module's top level),
    and ``setup`` and the tasks' results picklable.

    >>> map_tasks(None, Square, (), [1, 2, 3])  # doctest: +SKIP
    [1, 4, 9]
    """
    if pool is None or not tasks:
        evaluate = worker(*setup)
        return [evaluate(task) for task in tasks]
    return pool.map(worker, setup, tasks)
