"""Errors the tool reports to users, each mapped to a CLI exit code.

``InputError`` (exit 2) is bad input: a file, a pass name, an option or data the
user gave. ``VerificationError`` (exit 3) is an exact rewrite whose output
differs from the original by more than the stated tolerance.
"""

from __future__ import annotations


class RewriterError(Exception):
    """Base class of the errors shown to users as one line."""

    exit_code = 1


class InputError(RewriterError):
    """The user's input is unusable: missing or corrupt model, unknown pass, bad option."""

    exit_code = 2


class VerificationError(RewriterError):
    """An exact pipeline changed the model's outputs beyond the tolerance."""

    exit_code = 3


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters plus "..." when longer: user input echoed in a message.

    >>> shorten("x" * 100, 5)
    'xxxxx...'
    """
    return text if len(text) <= limit else text[:limit] + "..."


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name where it has none): a library's
    error in a one-line message.

    >>> first_line(ValueError("bad shape\\n  at node 3")), first_line(KeyError())
    ('bad shape', 'KeyError')
    """
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
