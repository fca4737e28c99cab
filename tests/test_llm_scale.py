"""The worked example at LLM scale (examples/llama_1b.py): export, rewrite, quantize, width-prune.

The default suite runs the pipeline on a Llama of a few hundred kB with external data
(the same code: the dynamo export, each CLI step in its own process, the prune probe);
the TinyLlama-1.1B shape is marked slow and skipped where memory or disk is short.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from examples.llama_1b import (
    EFFICIENCY,
    SIZES,
    LlamaShape,
    Step,
    estimate,
    estimate_table,
    run,
    table,
)
from rewriter import analysis, io

logger = logging.getLogger(__name__)

# The 1.1B run: the export holds the float32 model (4.4 GB) and the exporter's copy of
# the graph; each CLI step maps the 4.4 GB of external data and writes its output.
ONE_B_MEMORY = 12 << 30
ONE_B_DISK = 16 << 30


def check_pipeline(shape: LlamaShape, folder: Path, steps: list[Step]) -> None:
    """What every size must show: each step ran, and each pass did its work on every layer."""
    by_name = {step.name: step for step in steps}
    assert list(by_name)[:4] == ["export", "two-pass-softmax", "quantize", "prune-width"]
    assert all(step.seconds > 0 and step.cpu_seconds > 0 and step.peak_rss > 0 for step in steps)
    assert (folder / "llama.onnx.data").is_file()  # the weights are external data

    softmax = by_name["two-pass-softmax"].report
    assert softmax["passes"][0]["stats"]["softmax_replaced"] == shape.layers
    assert softmax["verification"]["passed"]

    # 7 projections per layer and the LM head; LIM ranks the 2 blocks per layer (the
    # head's input and output widths differ: it stays at 8 bits), and the storage
    # target in bits per weight, scales included, is met.
    quantize = by_name["quantize"].report["passes"][0]["stats"]
    assert quantize["weights_quantized"] == 7 * shape.layers + 1
    assert quantize["int4_weights"] > 0 and quantize["avg_bits_x100"] <= 600

    width = by_name["prune-width"].report["passes"][0]["stats"]
    kept = round(0.75 * shape.intermediate)
    assert width["glu_pruned"] == shape.layers
    assert (width["channels_before"], width["channels_after"]) == (
        shape.layers * shape.intermediate,
        shape.layers * kept,
    )

    for step in steps[4:]:
        probe = step.report
        assert probe["layers"] == 7 * shape.layers  # the LM head is left dense
        assert probe["evaluations"] == probe["layers"] * probe["amounts"] == 7 * shape.layers * 30
        assert probe["evaluation_s"] > 0


def test_tiny_llama_pipeline(tmp_path: Path) -> None:
    shape = SIZES["tiny"]
    steps = run(shape, tmp_path, probes=((8, 1), (16, 1)))
    check_pipeline(shape, tmp_path, steps)
    # The residual stream of the export: one block per attention and per MLP, and the head.
    blocks = analysis.residual_blocks(io.load(tmp_path / "llama.onnx"))
    assert len(blocks) == 2 * shape.layers + 1
    assert [len(block.ops) for block in blocks] == [4, 3] * shape.layers + [1]


def _available_memory() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
def test_one_billion_llama_pipeline(tmp_path: Path) -> None:
    if not os.path.exists("/proc/meminfo") or _available_memory() < ONE_B_MEMORY:
        pytest.skip(f"the 1.1B run needs {ONE_B_MEMORY >> 30} GiB of available memory")
    if shutil.disk_usage(tmp_path).free < ONE_B_DISK:
        pytest.skip(f"the 1.1B run needs {ONE_B_DISK >> 30} GiB of free disk")
    shape = SIZES["1b"]
    assert 1.0e9 < shape.params() < 1.2e9
    steps = run(shape, tmp_path)
    # The README's table: pytest -m slow tests/test_llm_scale.py --log-cli-level=INFO
    logger.info("\n%s", table(steps))
    worker = [step.report for step in steps if step.report.get("threads") == 1]
    logger.info("\n%s", estimate_table(estimate(worker, efficiency=EFFICIENCY)))
    check_pipeline(shape, tmp_path, steps)
