"""`make demo`: rewrite the bundled MiniLM sentence encoder with the exact two-pass
softmax, verify it on real sentences, compile it with TVM for this CPU (our two-pass
kernel inside), check the library against ONNX Runtime, and print the report.

    python examples/demo.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.minilm import prepare  # noqa: E402
from rewriter.cli import main  # noqa: E402


def cpu_target() -> str:
    """The richest x86 preset this CPU runs: avx512, else avx2, else generic llvm."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "llvm"
    words = set(flags.split())
    # The avx512 preset is x86-64-v4 plus VNNI and BF16 (backends/tvm/targets.py).
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16"} <= words:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= words else "llvm"


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
        "--target", cpu_target(),
        "--lib", str(out / "minilm.so"),
    ]
    print("$ rewrite " + " ".join(argv), flush=True)
    return main(argv)


if __name__ == "__main__":
    sys.exit(run())
