"""The model zoo of ``benchmarks/zoo.py``: the list, the builders, and both exporters.

Default suite (about 25 s on two cores): the list's shape, every model builds (and the
quick ones run in torch), and a ViT exports with both exporters into graphs that
ONNX Runtime runs at a batch other than the traced one, agreeing with torch. The slow
suite does the same for one model of every family.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from benchmarks import zoo_export, zoo_models, zoo_profile
from examples.torchvision_shim import install as install_torchvision_shim

install_torchvision_shim()  # before transformers, which imports torchvision if installed
pytest.importorskip("transformers")
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
# One model per family, the quickest to export of each.
PER_FAMILY = {
    "text-encoder": "distilbert",
    "decoder": "gemma",
    "encoder-decoder": "t5_encoder",
    "vision-transformer": "clip_vision",
    "swin": "swin",
    "segmentation": "segformer",
    "cnn": "resnet18",
    "video": "r3d_18",
    "speech": "whisper_encoder",
    "recurrent": "gru",
}
# ONNX Runtime against torch eager on the same float32 model: reordered float sums,
# ~1e-6 of the output's scale over these 2-layer models and 20-layer CNNs (measured:
# 2e-7 to 6e-6); 1e-4 catches a wrong graph (errors of order 1).
EXPORT_RTOL = 1e-4


def _needs(model: zoo_models.ZooModel) -> None:
    uses_torchvision = any(spec.name == "images" for spec in model.inputs)
    if uses_torchvision and not HAS_TORCHVISION:
        pytest.skip("torchvision is not installed")


def test_zoo_covers_the_families() -> None:
    names = [model.name for model in zoo_models.ZOO]
    assert len(names) == len(set(names)) >= 15
    assert set(PER_FAMILY) == {model.family for model in zoo_models.ZOO}
    assert all(zoo_models.MODELS[name].family == family for family, name in PER_FAMILY.items())
    assert [m.name for m in zoo_models.select(["speech", "bert"])] == [
        "bert",
        "wav2vec2",
        "whisper_encoder",
        "wav2vec2_conformer",
    ]
    with pytest.raises(KeyError, match="unknown models"):
        zoo_models.select(["resnet1000"])


def test_feeds_follow_the_input_specs() -> None:
    bart = zoo_models.feeds(zoo_models.MODELS["bart"], 3)
    assert {name: value.shape for name, value in bart.items()} == {
        "input_ids": (3, 128),
        "attention_mask": (3, 128),
        "decoder_input_ids": (3, 32),
    }
    assert bart["input_ids"].max() < zoo_models.build.VOCAB and bart["attention_mask"].all()
    again = zoo_models.feeds(zoo_models.MODELS["bart"], 3)
    assert all(np.array_equal(bart[name], again[name]) for name in bart)  # seeded


@pytest.mark.parametrize("name", [model.name for model in zoo_models.ZOO])
def test_every_model_builds(name: str) -> None:
    import torch

    model = zoo_models.MODELS[name]
    _needs(model)
    module = model.make()
    assert not module.training
    if model.family in ("cnn", "segmentation", "swin", "speech", "video") or name == "tv_vit_b_16":
        return  # seconds of eager compute each; their exports run them in the slow suite
    with torch.no_grad():
        output = module(*[torch.from_numpy(v) for v in zoo_models.feeds(model, 2).values()])
    assert output.shape[0] == 2 and torch.isfinite(output).all() and output.std() > 1e-3


def test_the_survey_is_off_the_default_run() -> None:
    survey = [model.name for model in zoo_models.SURVEY]
    assert len(survey) == len(set(survey)) and not set(survey) & {m.name for m in zoo_models.ZOO}
    assert [m.name for m in zoo_models.select(["survey"])] == survey
    assert [m.name for m in zoo_models.select(["mpnet", "bert"])] == ["bert", "mpnet"]
    assert not set(survey) & {m.name for m in zoo_models.select(None)}


@pytest.mark.slow  # 63 models built, seconds each
@pytest.mark.parametrize("name", [model.name for model in zoo_models.SURVEY])
def test_every_survey_model_builds(name: str) -> None:
    model = zoo_models.MODELS[name]
    _needs(model)
    assert not model.make().training


def _check_export(name: str, exporter: str, cache: Path) -> None:
    """Export, and run the export in ORT at batch 3 (traced at 2) against torch."""
    import onnxruntime as ort
    import torch

    model = zoo_models.MODELS[name]
    _needs(model)
    result = zoo_export.exported(model, exporter, cache)
    assert result.ok, result.error
    assert not result.note, result.note  # dynamic shapes exported, no static fallback
    feeds = zoo_models.feeds(model, 3)
    session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    got = session.run([model.output], feeds)[0]
    with torch.no_grad():
        want = model.make()(*[torch.from_numpy(v) for v in feeds.values()]).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= EXPORT_RTOL * np.abs(want).max()
    cached = zoo_export.exported(model, exporter, cache)  # the second call reads the cache
    assert cached.path == result.path and cached.seconds == result.seconds


@pytest.mark.parametrize("exporter", zoo_export.EXPORTERS)
def test_exports_with_dynamic_batch(exporter: str, tmp_path: Path) -> None:
    _check_export("clip_vision", exporter, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", zoo_export.EXPORTERS)
@pytest.mark.parametrize("family", sorted(PER_FAMILY))
def test_every_family_exports(family: str, exporter: str, tmp_path: Path) -> None:
    _check_export(PER_FAMILY[family], exporter, tmp_path)


def test_a_failing_export_is_a_result(tmp_path: Path) -> None:
    def broken() -> object:
        raise RuntimeError("no such layer\nsecond line")

    model = zoo_models.ZooModel("broken", "cnn", (), "logits", broken)
    result = zoo_export.export(model, "dynamo", tmp_path / "broken.onnx")
    assert not result.ok and result.error == "RuntimeError: no such layer"


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("fused_conv2d1_add1_relu1", "conv"),
        ("winograd_input1", "conv"),
        ("fused_winograd_output_add1_add2_relu1", "conv"),
        ("fused_matmul_add9_packed", "matmul"),
        ("fused_layer_norm1", "norm"),
        ("fused_power_mean_add_rsqrt_multiply", "reduce"),
        ("fused_strided_slice_maximum", "layout"),
        ("max_pool2d", "pool"),
        ("rewriter_two_pass_softmax", "softmax"),
        ("rewriter_softmax_attention", "attention"),
        ("vm.builtin.alloc_tensor", "vm"),
        ("FusedConv", "conv"),
        ("SkipLayerNormalization", "norm"),
        ("ReduceMean", "reduce"),
        ("BiasGelu", "elementwise"),
        ("rewriter_lstm", "recurrent"),
        ("LSTM", "recurrent"),
    ],
)
def test_op_families(name: str, family: str) -> None:
    assert zoo_profile.family(name) == family


def test_the_compile_worker_says_which_rule_scheduled_each_primfunc(tmp_path: Path) -> None:
    # The zoo's PrimFunc tables read the compile's own record, snapshotted after our
    # scheduling pass; they were empty while the instrument looked for a pass name that
    # no longer ran.
    from onnx import TensorProto, helper, numpy_helper, save

    from benchmarks import zoo_workers

    weight = numpy_helper.from_array(np.ones((64, 32), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 32])],
        [weight],
    )
    path = tmp_path / "m.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    job = {"onnx": str(path), "target": "avx512", "dims": None, "lib": str(tmp_path / "m.so")}
    result = zoo_workers.compile_library(job)
    assert result["status"] == "compiled", result
    rows = {row["name"]: row for row in result["primfuncs"]}
    matmul = next(row for name, row in rows.items() if "matmul" in name)
    assert matmul["scheduled_by"] == "matmul" and matmul["ours"] and matmul["vector"], matmul


def test_the_gpu_zoo_reports_failures_per_batch_and_needs_a_gpu(capsys, monkeypatch):
    """benchmarks/cuda_zoo.py: a batch that fails is a row naming the batch and the error
    beside the measured ones, and without a CUDA device the script says so and exits."""
    import subprocess
    import sys

    from benchmarks import cuda_zoo

    rows = [
        {
            "model": "bert",
            "batch": 1,
            "ours_ms": 0.35,
            "vs_stock_tvm": 0.98,
            "vs_torch": 0.13,
            "max_rel_err": 2.6e-7,
            "cosine": 1.0,
        },
        {"model": "bert", "batch": 8, "error": "AssertionError: consumers not inlined"},
    ]
    cuda_zoo.print_table(rows)
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("| bert | 1 | 0.350 | 0.98 | 0.13 |")
    assert table[3] == "| bert | 8 | AssertionError: consumers not inlined | | | | |"
    assert cuda_zoo._row_line(rows[1]) == "bert b8: AssertionError: consumers not inlined"

    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("a CUDA device is here: the script would run")
    script = Path(cuda_zoo.__file__)
    done = subprocess.run(
        [sys.executable, str(script), "--models", "bert"], capture_output=True, text=True
    )
    assert done.returncode != 0 and "no CUDA device" in done.stderr
