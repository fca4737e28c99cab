"""``two-pass-softmax`` on real exports: transformers exported by both torch exporters,
and the CNNs shipped with the ``onnx`` package (see ``real_models.py``).

For every model: every Softmax/LogSoftmax is replaced (graph and functions), the
output passes the full checker, runs in ONNX Runtime and agrees with the original,
and a second run changes nothing. Then the CLI end to end, and verification with
generated inputs.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from rewriter import verify
from rewriter.job import Report, rewrite_file
from rewriter.pass_base import DOMAIN
from tests.real_models import (
    BATCH,
    RANDOM_BIAS_SUFFIX,
    SEQUENCE,
    VOCAB,
    RealModel,
    count_ops,
    light_cnn_names,
)

REPO = Path(__file__).resolve().parents[1]
PASS = "two-pass-softmax"

# An exact pass in float32 must agree to 1e-5 of each output's scale: the rewrite
# only reorders float operations (a few ulp, 1.2e-7 each, per layer; these models
# have at most 2 layers), and its float64 body is closer to the true softmax than
# ONNX Runtime's float32 kernel. Same bound as verify.DEFAULT_TOLERANCE["float32"].
FLOAT32_RTOL = 1e-5
# float16 models round every intermediate to an ulp of 9.8e-4; a one-ulp change in an
# attention weight moves the next layer by about that much, so the bound is
# verify.DEFAULT_TOLERANCE["float16"] (4e-3 of the output scale).
FLOAT16_RTOL = verify.DEFAULT_TOLERANCE["float16"].rtol
RTOL = {"float32": FLOAT32_RTOL, "float16": FLOAT16_RTOL}

# Models every default run covers: both torch exporters, a decoder, a vision model
# with LogSoftmax, a float16 model, and the shipped CNNs.
EXPORTS = [
    "bert_eager_torchscript",
    "bert_sdpa_torchscript",
    "bert_eager_torchscript_fp16",
    "llama_eager_dynamo",
    "vit_torchscript",
    # Softmax and LogSoftmax only inside model-local functions: fails until the pass
    # rewrites inside functions (their bodies carry no types, so it skips them).
    "encoder_with_functions_torchscript",
    # slow: each is another 5-22 s of dynamo export (on 2 idle cores; 2-3 times that on
    # a busy machine) for a Softmax form the default set already has from
    # llama_eager_dynamo: Softmax(Add(scores, Where(mask, 0, finfo.min))), axis -1,
    # opset 18, external data. sdpa only adds an IsNaN guard after the Softmax; the
    # fp16 Llama export (~22 s) runs its Softmax in float16.
    pytest.param("bert_eager_dynamo", marks=pytest.mark.slow),
    pytest.param("bert_sdpa_dynamo", marks=pytest.mark.slow),
    pytest.param("llama_sdpa_dynamo", marks=pytest.mark.slow),
    pytest.param("llama_eager_dynamo_fp16", marks=pytest.mark.slow),
]
LIGHT_CNNS = light_cnn_names()
# The shipped CNNs' softmax is exactly uniform (constant weights); these variants
# randomize the classifier bias so the numbers mean something (densenet121 has no
# Softmax). squeezenet's Softmax(axis=1) takes a 4-D input: the opset-9 Flatten path.
LIGHT_RANDOM_BIAS = [
    name + RANDOM_BIAS_SUFFIX
    for name in (
        "light_inception_v1",
        "light_inception_v2",
        "light_resnet50",
        "light_shufflenet",
        "light_squeezenet",
    )
] + [
    # slow: their fully connected weights (60-140 M parameters of ConstantOfShape) take
    # ONNX Runtime ~1-2 s per session to fold, 4 sessions per model, and their Gemm head
    # is the same as the default variants'.
    pytest.param(name + RANDOM_BIAS_SUFFIX, marks=pytest.mark.slow)
    for name in ("light_bvlc_alexnet", "light_vgg19", "light_zfnet512")
]
ALL_MODELS = EXPORTS + LIGHT_CNNS + LIGHT_RANDOM_BIAS


@dataclasses.dataclass(frozen=True)
class Rewritten:
    model: RealModel
    output: Path
    report: Report


@pytest.fixture(scope="module")
def rewritten(
    real_model: Callable[[str], RealModel], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Rewritten]:
    """Rewrite each real model once (with verification on its example inputs)."""
    out_dir = tmp_path_factory.mktemp("rewritten")
    cache: dict[str, Rewritten] = {}

    def get(name: str) -> Rewritten:
        if name not in cache:
            model = real_model(name)
            output = out_dir / f"{name}.onnx"
            report = rewrite_file(model.path, output, PASS, inputs=model.inputs)
            cache[name] = Rewritten(model, output, report)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_softmax_is_replaced(name: str, rewritten: Callable[[str], Rewritten]) -> None:
    result = rewritten(name)
    original = onnx.load(str(result.model.path))
    softmax, log_softmax = count_ops(original, "Softmax"), count_ops(original, "LogSoftmax")

    (record,) = result.report.passes
    assert record.stats == {
        "softmax_replaced": softmax,
        "log_softmax_replaced": log_softmax,
        "skipped": 0,
    }, record.notes
    assert record.notes == []

    output = onnx.load(str(result.output))
    assert count_ops(output, "Softmax") == 0
    assert count_ops(output, "LogSoftmax") == 0
    assert count_ops(output, "TwoPassSoftmax", DOMAIN) == softmax
    assert count_ops(output, "TwoPassLogSoftmax", DOMAIN) == log_softmax
    functions = {(function.domain, function.name) for function in output.functions}
    if softmax:
        assert (DOMAIN, "TwoPassSoftmax") in functions
    if log_softmax:
        assert (DOMAIN, "TwoPassLogSoftmax") in functions


@pytest.mark.parametrize("name", ALL_MODELS)
def test_softmax_left_is_reported(name: str, rewritten: Callable[[str], Rewritten]) -> None:
    """The pass ensures no Softmax is left unless it says why: whatever it could not
    rewrite (anywhere, functions included) is counted in ``skipped`` with a note."""
    result = rewritten(name)
    output = onnx.load(str(result.output))
    left = count_ops(output, "Softmax") + count_ops(output, "LogSoftmax")
    (record,) = result.report.passes
    assert record.stats["skipped"] == left
    assert len(record.notes) == left


def test_light_cnn_without_softmax_is_left_alone(rewritten: Callable[[str], Rewritten]) -> None:
    """densenet121 ends in its fc layer: nothing to rewrite, so no domain and no IR bump."""
    result = rewritten("light_densenet121")
    assert result.report.passes[0].modified is False
    output = onnx.load(str(result.output))
    assert DOMAIN not in {opset.domain for opset in output.opset_import}
    assert output.ir_version == onnx.load(str(result.model.path)).ir_version
    assert not output.functions


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_passes_full_check(name: str, rewritten: Callable[[str], Rewritten]) -> None:
    onnx.checker.check_model(onnx.load(str(rewritten(name).output)), full_check=True)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_matches_original(name: str, rewritten: Callable[[str], Rewritten]) -> None:
    result = rewritten(name)
    verification = result.report.verification
    assert verification is not None and verification.enforced
    assert verification.passed
    for output in verification.outputs:
        assert output.nan_mismatch == 0, output.name
        assert output.max_rel_err <= RTOL[output.dtype], (output.name, output.max_rel_err)

    # The same check again, without rewriter.verify: plain ONNX Runtime sessions.
    reference = _run(result.model.path, result.model.inputs)
    candidate = _run(result.output, result.model.inputs)
    assert list(candidate) == list(reference)
    for (name_out, ref), out in zip(reference.items(), candidate.values(), strict=True):
        assert out.shape == ref.shape and out.dtype == ref.dtype, name_out
        assert _max_rel_err(ref, out) <= RTOL[str(ref.dtype)], name_out


@pytest.mark.parametrize("name", ALL_MODELS)
def test_second_run_changes_nothing(
    name: str, rewritten: Callable[[str], Rewritten], tmp_path: Path
) -> None:
    first = rewritten(name).output
    report = rewrite_file(first, tmp_path / "again.onnx", PASS, check=False)
    (record,) = report.passes
    assert record.stats == {"softmax_replaced": 0, "log_softmax_replaced": 0, "skipped": 0}
    assert record.modified is False
    before, after = onnx.load(str(first)), onnx.load(str(tmp_path / "again.onnx"))
    assert [f.name for f in after.functions] == [f.name for f in before.functions]
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in before.graph.node]


def test_dynamo_external_data_is_kept(rewritten: Callable[[str], Rewritten]) -> None:
    """The dynamo exporter writes the weights to ``<name>.onnx.data``; the rewrite keeps
    every one of them external, in ``<output>.data`` beside the output."""
    result = rewritten("llama_eager_dynamo")
    source_external = _external_initializers(result.model.path)
    assert source_external, "the dynamo export no longer writes external data"
    assert Path(str(result.output) + ".data").is_file()
    assert _external_initializers(result.output) >= source_external


@pytest.mark.parametrize(
    "name", ["bert_sdpa_torchscript", "bert_eager_torchscript", "llama_eager_dynamo"]
)
def test_fully_padded_row(
    name: str, real_model: Callable[[str], RealModel], tmp_path: Path
) -> None:
    """A sequence of padding only: with sdpa every score of its attention rows is -inf
    (Softmax gives NaN, which the export's IsNaN guard zeroes); with eager they are all
    finfo.min (a uniform row). The rewrite must reproduce both."""
    model = real_model(name)
    inputs = {key: value.copy() for key, value in model.inputs.items()}
    inputs["attention_mask"][1] = 0
    report = rewrite_file(model.path, tmp_path / "out.onnx", PASS, inputs=inputs)
    assert report.verification is not None and report.verification.passed
    for output in report.verification.outputs:
        assert output.max_rel_err <= FLOAT32_RTOL, (output.name, output.max_rel_err)


def test_cli_end_to_end(real_model: Callable[[str], RealModel], tmp_path: Path) -> None:
    model = real_model("bert_eager_torchscript")
    assert _dim_params(model.path) == {"batch", "sequence"}
    out, report_path = tmp_path / "bert_two_pass.onnx", tmp_path / "report.json"
    command = [
        sys.executable, "-m", "rewriter.cli", str(model.path),
        "--passes", PASS, "-o", str(out), "--report-json", str(report_path),
        "--dim", f"batch={BATCH}", "--dim", f"sequence={SEQUENCE}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    report = json.loads(report_path.read_text())
    assert report["input"] == str(model.path)
    assert report["output"] == str(out)
    assert report["passes"][0]["name"] == PASS
    assert report["passes"][0]["stats"] == {
        "softmax_replaced": 2,
        "log_softmax_replaced": 0,
        "skipped": 0,
    }
    assert report["passes"][0]["seconds"] >= 0
    verification = report["verification"]
    assert verification["inputs"]["input_ids"] == [BATCH, SEQUENCE]
    assert {o["name"] for o in verification["outputs"]} == {"last_hidden_state", "pooler_output"}
    for output in verification["outputs"]:
        assert {"name", "max_abs_err", "max_rel_err", "cosine"} <= set(output)
        assert output["max_rel_err"] <= FLOAT32_RTOL
        assert output["cosine"] > 1 - 1e-9
    assert verification["passed"] is True
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


@pytest.mark.parametrize(
    "name",
    [
        "bert_eager_torchscript",
        "llama_eager_dynamo",
        pytest.param("bert_eager_dynamo", marks=pytest.mark.slow),  # slow: see EXPORTS
    ],
)
def test_generated_inputs_are_valid_token_ids(
    name: str, real_model: Callable[[str], RealModel], tmp_path: Path
) -> None:
    """Without --inputs, token ids must index the embedding table: out-of-range ids
    make ONNX Runtime's Gather fail, and ids limited to 0/1 would test little."""
    model = real_model(name)
    inputs = verify.make_inputs(model.path)
    assert set(inputs) == set(model.inputs)
    ids = inputs["input_ids"]
    assert ids.shape == (BATCH, SEQUENCE) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < VOCAB
    assert ids.max() >= 2, "token ids were not traced to the embedding table"
    if "token_type_ids" in inputs:
        assert set(np.unique(inputs["token_type_ids"])) <= {0, 1}
    assert set(np.unique(inputs["attention_mask"])) == {1}

    report = rewrite_file(model.path, tmp_path / "out.onnx", PASS)
    assert report.verification is not None and report.verification.passed


def _run(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    feeds = {info.name: inputs[info.name] for info in session.get_inputs()}
    return dict(zip(names, session.run(names, feeds), strict=True))


def _max_rel_err(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |candidate - reference| over the finite entries, over max |reference|;
    non-finite entries must match exactly."""
    ref, out = reference.astype(np.float64), candidate.astype(np.float64)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(ref[~finite], out[~finite])
    scale = np.abs(ref[finite]).max()
    return float(np.abs(out - ref)[finite].max() / scale)


def _external_initializers(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {
        init.name
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
    }


def _dim_params(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {
        dim.dim_param
        for value in model.graph.input
        for dim in value.type.tensor_type.shape.dim
        if dim.dim_param
    }
