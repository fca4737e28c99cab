"""The ``rewrite`` console script: Ctrl-C and SIGTERM handled from the first moment.

Importing the CLI takes about a second (onnx, onnx-ir, ml_dtypes), and a signal in that
time must end like one during the run: one line on stderr, exit 130 (SIGINT) or 143
(SIGTERM), no traceback. The package's ``__init__`` imports nothing heavy (its names
load on first use), nor does this module, so this runs before those imports: Python's
own SIGINT handler raises ``KeyboardInterrupt`` during them, and the SIGTERM handler
installed here does too; both end here. :func:`rewriter.cli.main` then handles both for
the run. Importing ``rewriter`` installs no signal handler: only the command line does.

>>> from rewriter import entry  # doctest: +SKIP
>>> entry.main(["--list-passes"])  # doctest: +SKIP
0
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from types import FrameType


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rewrite`` with ``argv`` (default ``sys.argv[1:]``); return its exit code."""
    terminated: list[int] = []

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        terminated.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        from rewriter.cli import main as rewrite

        return rewrite(argv)
    except KeyboardInterrupt:  # before the CLI took over: nothing was written
        how, signum = ("terminated", signal.SIGTERM) if terminated else ("interrupted", signal.SIGINT)
        print(f"rewrite: {how}; nothing written", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
