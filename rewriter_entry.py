"""The ``rewrite`` console script: Ctrl-C and SIGTERM handled from the first moment.

``import rewriter`` takes about a second (onnx, onnx-ir, ml_dtypes), and a signal in that
time must end like one during the run: one line on stderr, exit 130 (SIGINT) or 143
(SIGTERM), no traceback. This module is outside the package and imports nothing heavy,
so it runs before ``rewriter/__init__.py``: Python's own SIGINT handler raises
``KeyboardInterrupt`` during the imports, and the SIGTERM handler installed here does
too; both end here. :func:`rewriter.cli.main` then handles both for the run. Importing
``rewriter`` installs no signal handler: only the command line does.

>>> import rewriter_entry  # doctest: +SKIP
>>> rewriter_entry.main(["--list-passes"])  # doctest: +SKIP
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
