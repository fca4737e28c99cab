"""Writing a run's outputs all together or not at all.

Each output is written into a hidden stage folder beside its destination
(``.NAME.rewriter-stage-<pid>-<random>``: same folder, same file system, so a rename
puts it in place). :meth:`Outputs.commit` renames every staged file into place in one
short step, companions (an ``.onnx.data`` file, an ``.so.json``) before the file they
belong to; if a rename fails, the files already placed are put back (a file they
replaced is restored from a hard link kept in the stage folder, where the file system
allows one). Leaving the block removes the stage folders.

Ctrl-C: while the block runs, SIGINT is recorded, and raises ``KeyboardInterrupt``
at once except inside the commit and the clean-up, which it never cuts in half. An
interrupt recorded at any time (even one that C code swallowed) stops the run before
the commit, or undoes the commit, so an interrupted run never ends as a success.

A stage folder left by a killed run (SIGKILL, power loss) is removed by the next run
that writes into the same folder, once its process is gone and it has not changed
for :data:`STALE_AFTER_SECONDS`.

>>> with Outputs() as outputs:  # doctest: +SKIP
...     staged = outputs.add("out.onnx", companions=["out.onnx.data"])
...     write(model, staged)
...     outputs.commit()
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType, TracebackType

from rewriter.errors import InputError
from rewriter.paths import PathLike, check_output_location

logger = logging.getLogger(__name__)

STAGE_MARK = ".rewriter-stage-"
_STAGE_NAME = re.compile(r"^\..*" + re.escape(STAGE_MARK) + r"(\d+)-[A-Za-z0-9_]+$")
# A stage folder of a dead process is removed only when nothing in it changed for
# this long: a process in another pid namespace sharing the folder looks dead to us,
# but while it writes, its files keep changing.
STALE_AFTER_SECONDS = 10.0
# The stage folder's name repeats the output's; long names are cut to stay under
# the usual 255-byte limit of a file name.
_NAME_IN_STAGE = 100


@dataclasses.dataclass
class _Staged:
    destination: Path
    staged: Path
    companions: list[tuple[Path, Path]]  # (destination, staged)


class Outputs:
    """A run's outputs, staged beside their destinations and committed together."""

    def __init__(self) -> None:
        self._stages: dict[str, Path] = {}  # real path of a folder -> its stage folder
        self._outputs: list[_Staged] = []
        self._placed: list[tuple[Path, Path | None]] = []  # (destination, backup)
        self._interrupted = False
        self._deferred = False
        self._previous_handler: object = None
        self.committed = False

    def add(self, destination: PathLike, *, role: str = "the output", companions: Iterable[PathLike] = ()) -> Path:
        """Check ``destination`` and return the path to write it to until the commit.

        ``companions`` are files written beside the staged file under their own names
        (``out.onnx.data`` beside ``out.onnx``); those that exist at the commit are
        placed with it. Raises :class:`InputError` if the destination cannot be written.
        """
        target = check_output_location(destination, role)
        stage = self._stage_folder(target.parent, target.name)
        staged = stage / target.name
        pairs = [(Path(companion), stage / Path(companion).name) for companion in companions]
        self._outputs.append(_Staged(target, staged, pairs))
        return staged

    def commit(self) -> None:
        """Rename every staged file into place; all of them, or none (then raise)."""
        if self._interrupted:
            raise KeyboardInterrupt
        with self._deferring():
            try:
                for destination, staged in self._renames():
                    backup = self._backup(destination)
                    os.replace(staged, destination)
                    self._placed.append((destination, backup))
            except BaseException:
                self._roll_back()
                raise
            self.committed = True
            if self._interrupted:
                self._roll_back()
        if self._interrupted:
            raise KeyboardInterrupt

    def __enter__(self) -> Outputs:
        if threading.current_thread() is threading.main_thread():
            current = signal.getsignal(signal.SIGINT)
            # Python's default, or another Python handler (one a library or an earlier run
            # left behind): ours records Ctrl-C for the write and gives it back after. An
            # ignored SIGINT (SIG_IGN) or one that kills (SIG_DFL) is left as it is.
            if callable(current):
                self._previous_handler = current
                signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with self._deferring():
            for stage in self._stages.values():
                shutil.rmtree(stage, ignore_errors=True)
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)  # type: ignore[arg-type]
        if self._interrupted and not isinstance(error, KeyboardInterrupt):
            # Recorded during the clean-up, after a commit that had already checked.
            written = self.committed and bool(self._placed)
            raise KeyboardInterrupt("the outputs were written" if written else "") from error

    def _on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        self._interrupted = True
        if not self._deferred:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def _deferring(self) -> Iterator[None]:
        deferred, self._deferred = self._deferred, True
        try:
            yield
        finally:
            self._deferred = deferred

    def _stage_folder(self, folder: Path, name: str) -> Path:
        key = os.path.realpath(folder)
        if key not in self._stages:
            remove_stale_stages(folder)
            prefix = f".{name[:_NAME_IN_STAGE]}{STAGE_MARK}{os.getpid()}-"
            try:
                self._stages[key] = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
            except OSError as exc:
                raise InputError(f"{folder}: cannot write in the output folder ({exc.strerror})") from exc
        return self._stages[key]

    def _renames(self) -> list[tuple[Path, Path]]:
        """(destination, staged) in commit order: companions before the file they belong to."""
        order: list[tuple[Path, Path]] = []
        for output in self._outputs:
            order.extend((dest, staged) for dest, staged in output.companions if staged.exists())
            order.append((output.destination, output.staged))
        return order

    def _backup(self, destination: Path) -> Path | None:
        """A hard link to the file ``destination`` holds now (None: none, or not possible)."""
        if not os.path.lexists(destination):
            return None
        stage = self._stages[os.path.realpath(destination.parent)]
        backup = stage / f".backup-{len(self._placed)}"
        try:
            os.link(destination, backup, follow_symlinks=False)
        except OSError:
            logger.warning("%s: no backup possible; a failed commit cannot restore it", destination)
            return None
        return backup

    def _roll_back(self) -> None:
        while self._placed:
            destination, backup = self._placed.pop()
            try:
                if backup is not None:
                    os.replace(backup, destination)
                else:
                    destination.unlink()
            except OSError as exc:
                logger.warning("%s: could not undo the write (%s)", destination, exc)
        self.committed = False


def remove_stale_stages(folder: PathLike) -> list[Path]:
    """Remove the stage folders in ``folder`` left by dead runs; return those removed.

    Only folders named as ours are candidates, and only when their process is gone and
    nothing in them changed for :data:`STALE_AFTER_SECONDS`.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _STAGE_NAME.match(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        if _alive(int(match.group(1))) or _recently_changed(Path(entry.path)):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        logger.info("removed %s, left by a run that ended without cleaning up", entry.path)
        removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id we wrote: leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as exc:
        return exc.errno != errno.ESRCH  # EPERM: alive, someone else's
    except OverflowError:
        return True
    return True


def _recently_changed(stage: Path) -> bool:
    now = time.time()
    try:
        times = [stage.lstat().st_mtime] + [entry.lstat().st_mtime for entry in stage.iterdir()]
    except OSError:
        return True
    return now - max(times) < STALE_AFTER_SECONDS
