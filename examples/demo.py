"""`make demo`: rewrite the bundled MiniLM sentence encoder with the exact two-pass
softmax, verify it on real sentences, and print the report.

    python examples/demo.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.minilm import prepare  # noqa: E402
from rewriter.cli import main  # noqa: E402


def run() -> int:
    data, out = ROOT / "examples" / "data", ROOT / "out"
    out.mkdir(exist_ok=True)
    print("exporting all-MiniLM-L6-v2 to ONNX (first run only) ...", flush=True)
    model, inputs = prepare(data)
    argv = [
        str(model),
        "--passes", "two-pass-softmax",
        "-o", str(out / "minilm.two-pass.onnx"),
        "--inputs", str(inputs),
        "--report-json", str(out / "minilm.report.json"),
    ]
    print("$ rewrite " + " ".join(argv), flush=True)
    return main(argv)


if __name__ == "__main__":
    sys.exit(run())
