"""Which files a run reads and which it writes, checked against each other before any work.

A run reads the model, every external-data file the model references, and the files
given with ``--inputs``, ``--calibration`` and ``--pipeline``. It writes the output
model and its ``.data`` file, the library and its ``.so.json``, the report and the
plots. No write may land on a read, whatever the spelling (``..``, a symlink, a hard
link), and no two writes may land on the same file. The one exception is ``--force``:
the output model may replace the input model, never anything else.

External-data locations are resolved by :func:`resolve_inside` one component at a time,
so a location that leaves the model's folder is refused before anything outside it is
looked at.

>>> check_overlaps([("the input model", "m.onnx")], [("--report-json", "m.onnx")])  # doctest: +SKIP
Traceback (most recent call last):
InputError: m.onnx: --report-json would overwrite the input model (m.onnx)
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from rewriter.errors import InputError

# The roles whose overlap --force allows: the output model replacing the input model.
OUTPUT_MODEL = "the output model"
INPUT_MODEL = "the input model"
OUTPUT_DATA = "the output's external-data file"

PathLike = str | os.PathLike[str]

# Symlinks followed while resolving one location, as the kernel's limit (ELOOP).
MAX_SYMLINKS = 40


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file: the same real path, or the same inode when both exist.

    >>> same_file("m.onnx", "./sub/../m.onnx")
    True
    """
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        first, second = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def check_overlaps(
    reads: Iterable[tuple[str, PathLike]],
    writes: Iterable[tuple[str, PathLike]],
    *,
    force: bool = False,
) -> None:
    """Refuse (:class:`InputError`) any write that lands on a read or on another write.

    ``reads`` and ``writes`` are ``(role, path)`` pairs, a role naming the file in the
    message ("the input model", "--report-json"). With ``force`` the output model may
    replace the input model.
    """
    reads, writes = list(reads), list(writes)
    for write_role, write_path in writes:
        for read_role, read_path in reads:
            if not same_file(write_path, read_path):
                continue
            if force and (write_role, read_role) == (OUTPUT_MODEL, INPUT_MODEL):
                continue
            if write_role == OUTPUT_DATA:
                hint = "; choose another output name"
            elif (write_role, read_role) == (OUTPUT_MODEL, INPUT_MODEL):
                hint = " (use --force to allow)"
            else:
                hint = ""
            raise InputError(f"{write_path}: {write_role} would overwrite {read_role} ({read_path}){hint}")
    for index, (first, first_path) in enumerate(writes):
        for second, second_path in writes[index + 1 :]:
            if same_file(first_path, second_path):
                raise InputError(f"{second_path}: {first} and {second} would be the same file")


def check_output_location(path: PathLike, role: str) -> Path:
    """Check that ``path`` can become a file: a file name in an existing folder, not a folder.

    Returns it as a :class:`Path`. A name ending in a separator (``-o newdir/``) is a
    folder, refused: :class:`Path` would drop the separator and write a file ``newdir``.
    """
    text = os.fspath(path)
    if not text or text.endswith(os.sep) or (os.altsep and text.endswith(os.altsep)):
        raise InputError(f"{text!r}: {role} must be a file name, not a folder")
    target = Path(text)
    if target.is_dir():
        raise InputError(f"{target}: {role} is a folder; give a file name")
    if os.path.lexists(target) and not target.is_file():
        raise InputError(f"{target}: {role} exists and is not a regular file")
    folder = target.parent
    if not folder.is_dir():
        raise InputError(f"{folder}: output folder of {role} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{folder}: output folder of {role} is not writable")
    return target


def resolve_inside(folder: PathLike, location: str) -> Path:
    """The real path of ``location`` relative to ``folder``; :class:`InputError` if it leaves it.

    Absolute locations are refused outright. Otherwise each component is resolved in
    turn and each symlink read (never followed blindly), so nothing outside ``folder``
    is ever stat-ed or opened: ``..`` above the folder and symlinks out of it are
    refused as soon as they are seen.

    >>> resolve_inside("models", "weights/w.bin")  # doctest: +SKIP
    PosixPath('/abs/models/weights/w.bin')
    """
    root = os.path.realpath(folder)
    if os.path.isabs(location) or (os.altsep and location.startswith(os.altsep)):
        raise InputError(f"'{location}' is an absolute path")
    current = root
    pending = _components(location)
    followed = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if current == root:
                raise InputError(f"'{location}' points outside the model's folder")
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        try:
            info = os.lstat(candidate)
        except OSError:  # does not exist (yet): the rest is taken as written
            current = candidate
            continue
        if not stat.S_ISLNK(info.st_mode):
            current = candidate
            continue
        followed += 1
        if followed > MAX_SYMLINKS:
            raise InputError(f"'{location}': too many levels of symbolic links")
        target = os.readlink(candidate)
        if os.path.isabs(target):
            if not target.startswith(root + os.sep):
                raise InputError(f"'{location}' is a symbolic link out of the model's folder")
            current, target = root, target[len(root) + 1 :]
        pending = _components(target) + pending
    return Path(current)


def _components(path: str) -> list[str]:
    parts = path.replace(os.altsep, os.sep) if os.altsep else path
    return parts.split(os.sep)


def is_utf8(path: PathLike) -> bool:
    """Whether ``path`` is valid UTF-8: a Linux file name is bytes, and Python holds one that
    is not UTF-8 as a str with surrogates, which C++ bindings (onnx.checker, ONNX Runtime)
    refuse as an argument.

    >>> is_utf8("m.onnx"), is_utf8(os.fsdecode(b"m\\xff.onnx"))
    (True, False)
    """
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@contextlib.contextmanager
def utf8_folder(folder: PathLike) -> Iterator[str]:
    """``folder`` as a UTF-8 path while the block runs: itself, or, where it is not UTF-8,
    the same folder through an open descriptor (``/proc/self/fd/N``, Linux).

    >>> with utf8_folder("models") as text:  # doctest: +SKIP
    ...     options.add_session_config_entry(EXTERNAL_DATA_FOLDER, text)
    """
    if is_utf8(folder):
        yield os.fspath(folder)
        return
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{descriptor}"
    finally:
        os.close(descriptor)
