"""The fuse-cross-entropy pass: structure, negatives, idempotence, validity, numbers,
the ONNX conformance cases and a tiny LM exported with its loss."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir
import pytest

import rewriter.passes.fuse_cross_entropy.onnx as fce
from rewriter.pass_base import DOMAIN
from tests.helpers import model_from_text, op_types, run, to_proto
from tests.loss_models import CASE_NAMES, conformance_cases, export_tiny_lm

# Exact pass: the body's max-shifted logsumexp in float32 against ORT's LogSoftmax/SCE
# kernels (and numpy's float32 expected outputs) differs by float32 rounding of a sum
# over up to ~20 terms: a few ulps, well inside 1e-5 relative (atol for losses near 0).
RTOL = 1e-5
ATOL = 1e-6


def rewrite(model: ir.Model, **options) -> fce.RewriteResult:
    return fce.FuseCrossEntropyPass(fce.FuseCrossEntropyOptions(**options))(model)


def feeds_for(n: int = 6, c: int = 5, *, ignore: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n).astype(np.int64)
    if ignore is not None:
        labels[::3] = ignore
    return {
        "x": (rng.standard_normal((n, c)) * 3).astype(np.float32),
        "y": labels,
        "w": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }


def loss_model(body: str, *, opset: int = 18, inputs: str = "float[6, 5] x, int64[6] y") -> ir.Model:
    return model_from_text(
        f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g ({inputs}) => (float loss) {{
            {body}
        }}
        """
    )


def assert_same_loss(model: ir.Model, feeds: dict[str, np.ndarray], **options) -> fce.RewriteResult:
    """Rewrite ``model`` and check the result: checker, ORT numbers, op types."""
    proto = to_proto(model)
    names = {i.name for i in proto.graph.input}
    feeds = {k: v for k, v in feeds.items() if k in names}
    expected = run(proto, feeds)
    result = rewrite(model, **options)
    rewritten = to_proto(result.model)
    onnx.checker.check_model(rewritten, full_check=True)
    got = run(rewritten, feeds)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=RTOL, atol=ATOL, err_msg=key)
    return result


# --------------------------------------------------------------------------------------
# Structure and numbers of each recognized form
# --------------------------------------------------------------------------------------

LOSS_FORMS = {
    "sce": "loss = SoftmaxCrossEntropyLoss <reduction = \"mean\"> (x, y)",
    "sce_weights_ii": "loss = SoftmaxCrossEntropyLoss <reduction = \"sum\", ignore_index = 2> (x, y, w)",
    "log_softmax_nll": "lp = LogSoftmax <axis = 1> (x)\n loss = NegativeLogLikelihoodLoss (lp, y)",
    "log_softmax_nll_weights": "lp = LogSoftmax (x)\n loss = NegativeLogLikelihoodLoss <reduction = \"sum\", ignore_index = 2> (lp, y, w)",
    "log_of_softmax_nll": "p = Softmax (x)\n lp = Log (p)\n loss = NegativeLogLikelihoodLoss (lp, y)",
    "gather_reduce_mean": """
        lp = LogSoftmax (x)
        ax = Constant <value = int64[1] {1}> ()
        idx = Unsqueeze (y, ax)
        picked = GatherElements <axis = 1> (lp, idx)
        nll = Neg (picked)
        loss = ReduceMean <keepdims = 0> (nll)""",
    "gather_squeeze_reduce_sum": """
        p = Softmax <axis = -1> (x)
        lp = Log (p)
        ax = Constant <value = int64[1] {1}> ()
        idx = Unsqueeze (y, ax)
        picked = GatherElements <axis = -1> (lp, idx)
        flat = Squeeze (picked, ax)
        nll = Neg (flat)
        loss = ReduceSum <keepdims = 0> (nll)""",
}
MASKED = """
        lp = LogSoftmax (x)
        ii = Constant <value = int64 {{2}}> ()
        zero_i = Constant <value = int64 {{0}}> ()
        zero_f = Constant <value = float {{0}}> ()
        eq = Equal (y, ii)
        valid = Not (eq)
        safe = Where (valid, y, zero_i)
        ax = Constant <value = int64[1] {{1}}> ()
        idx = Unsqueeze (safe, ax)
        picked = GatherElements <axis = 1> (lp, idx)
        flat = Squeeze (picked, ax)
        nll = Neg (flat)
        masked = Where (valid, nll, zero_f)
        {tail}"""
LOSS_FORMS["masked_sum"] = MASKED.format(tail="loss = ReduceSum <keepdims = 0> (masked)")
LOSS_FORMS["masked_mean"] = MASKED.format(
    tail="""total = ReduceSum <keepdims = 0> (masked)
        validf = Cast <to = 1> (valid)
        count = ReduceSum <keepdims = 0> (validf)
        loss = Div (total, count)"""
)
EXPECTED_ATTRIBUTES = {
    "sce": {"reduction": "mean"},
    "sce_weights_ii": {"reduction": "sum", "ignore_index": 2},
    "log_softmax_nll": {"reduction": "mean"},
    "log_softmax_nll_weights": {"reduction": "sum", "ignore_index": 2},
    "log_of_softmax_nll": {"reduction": "mean"},
    "gather_reduce_mean": {"reduction": "mean"},
    "gather_squeeze_reduce_sum": {"reduction": "sum"},
    "masked_sum": {"reduction": "sum", "ignore_index": 2},
    "masked_mean": {"reduction": "mean", "ignore_index": 2},
}


def reference(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``proto`` in onnx.reference, which needs omitted optional inputs of a function
    call written as "" (onnx-ir's serializer drops trailing ones)."""
    padded = onnx.ModelProto()
    padded.CopyFrom(proto)
    functions = {(f.domain, f.name): len(f.input) for f in padded.functions}
    for node in padded.graph.node:
        missing = functions.get((node.domain, node.op_type), 0) - len(node.input)
        node.input.extend([""] * max(missing, 0))
    return onnx.reference.ReferenceEvaluator(padded).run(None, feeds)


def _attributes(node: ir.Node) -> dict[str, object]:
    return {name: attr.value for name, attr in node.attributes.items()}


@pytest.mark.parametrize("form", sorted(LOSS_FORMS))
def test_each_form_becomes_one_fused_node(form):
    model = loss_model(LOSS_FORMS[form], inputs="float[6, 5] x, int64[6] y, float[5] w")
    original = to_proto(model)
    feeds = feeds_for(ignore=2)
    result = assert_same_loss(model, feeds)
    assert result.stats == {"cross_entropy_fused": 1, "linear_cross_entropy_fused": 0, "skipped": 0}
    assert op_types(result.model) == ["FusedCrossEntropy"]
    node = result.model.graph[0]
    assert node.domain == DOMAIN
    assert _attributes(node) == EXPECTED_ATTRIBUTES[form]
    assert (DOMAIN, "FusedCrossEntropy", "") in result.model.functions
    if "ignore_index" in EXPECTED_ATTRIBUTES[form]:
        # onnx.reference runs the body when every referenced attribute is set.
        used = {k: v for k, v in feeds.items() if k in {i.name for i in original.graph.input}}
        got = reference(to_proto(result.model), used)[0]
        np.testing.assert_allclose(got, run(original, used)["loss"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_log_prob_output_is_kept(reduction):
    loss_type = "float[4, 2]" if reduction == "none" else "float"
    model = model_from_text(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4, 3, 2] x, int64[4, 2] y) => ({loss_type} loss, float[4, 3, 2] lp) {{
            loss, lp = SoftmaxCrossEntropyLoss <reduction = "{reduction}"> (x, y)
        }}
        """
    )
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((4, 3, 2)).astype(np.float32), "y": rng.integers(0, 3, (4, 2))}
    result = assert_same_loss(model, feeds)
    assert op_types(result.model) == ["FusedCrossEntropy"]
    assert len(result.model.graph[0].outputs) == 2


# --------------------------------------------------------------------------------------
# The LM head
# --------------------------------------------------------------------------------------

HEADS = {
    "matmul_reshape": (
        "float[2, 3, 4] h, float[4, 7] W, int64[6] y",
        """logits = MatMul (h, W)
           shape = Constant <value = int64[2] {-1, 7}> ()
           flat = Reshape (logits, shape)
           loss = SoftmaxCrossEntropyLoss <ignore_index = -100> (flat, y)""",
        0,
    ),
    "bias_first_add": (
        "float[6, 4] h, float[4, 7] W, float[7] b, int64[6] y",
        """mm = MatMul (h, W)
           logits = Add (b, mm)
           lp = LogSoftmax (logits)
           loss = NegativeLogLikelihoodLoss <reduction = "sum"> (lp, y)""",
        0,
    ),
    "gemm_transposed": (
        "float[6, 4] h, float[7, 4] W, float[7] b, int64[6] y",
        """logits = Gemm <transB = 1> (h, W, b)
           loss = SoftmaxCrossEntropyLoss (logits, y)""",
        1,
    ),
}


def head_feeds(signature: str, body: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    hidden = (2, 3, 4) if "[2, 3, 4] h" in signature else (6, 4)
    weight = (7, 4) if "[7, 4] W" in signature else (4, 7)
    labels = rng.integers(0, 7, 6)
    if "-100" in body:
        labels[1] = -100
    return {
        "h": rng.standard_normal(hidden).astype(np.float32),
        "W": rng.standard_normal(weight).astype(np.float32),
        "b": rng.standard_normal(7).astype(np.float32),
        "y": labels,
    }


@pytest.mark.parametrize("head", sorted(HEADS))
def test_lm_head_is_fused(head):
    signature, body, transposed = HEADS[head]
    model = loss_model(body, inputs=signature)
    result = assert_same_loss(model, head_feeds(signature, body))
    assert result.stats == {"cross_entropy_fused": 0, "linear_cross_entropy_fused": 1, "skipped": 0}
    assert op_types(result.model) == ["FusedLinearCrossEntropy"]
    node = result.model.graph[0]
    assert node.attributes["transpose_weight"].value == transposed
    assert [v.name if v is not None else None for v in node.inputs][:3] == ["h", "W", "y"]


def test_linear_option_off_fuses_the_loss_only():
    signature, body, _ = HEADS["gemm_transposed"]
    result = assert_same_loss(loss_model(body, inputs=signature), head_feeds(signature, body), linear=False)
    assert op_types(result.model) == ["Gemm", "FusedCrossEntropy"]
    assert result.stats["cross_entropy_fused"] == 1


def test_logits_that_are_also_an_output_keep_the_head():
    # Models that return their logits with the loss (Hugging Face's do) need the logits.
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[6, 4] h, float[4, 7] W, int64[6] y) => (float loss, float[6, 7] logits) {
            logits = MatMul (h, W)
            loss = SoftmaxCrossEntropyLoss (logits, y)
        }
        """
    )
    signature = "float[6, 4] h, float[4, 7] W, int64[6] y"
    result = assert_same_loss(model, head_feeds(signature, ""))
    assert op_types(result.model) == ["MatMul", "FusedCrossEntropy"]
    assert result.stats == {"cross_entropy_fused": 1, "linear_cross_entropy_fused": 0, "skipped": 0}


def test_head_on_3d_logits_is_not_fused_into_the_linear_op():
    # (B, T, V) logits straight into the loss: class axis 1 is T, not the vocabulary.
    model = loss_model(
        "logits = MatMul (h, W)\n loss = SoftmaxCrossEntropyLoss (logits, y)",
        inputs="float[2, 3, 4] h, float[4, 7] W, int64[2, 7] y",
    )
    rng = np.random.default_rng(1)
    feeds = {"h": rng.standard_normal((2, 3, 4)).astype(np.float32), "W": rng.standard_normal((4, 7)).astype(np.float32), "y": rng.integers(0, 3, (2, 7))}
    result = assert_same_loss(model, feeds)
    assert op_types(result.model) == ["MatMul", "FusedCrossEntropy"]


# --------------------------------------------------------------------------------------
# Negatives, idempotence, preconditions
# --------------------------------------------------------------------------------------


def test_log_softmax_over_the_wrong_axis_is_left_and_explained():
    model = loss_model("lp = LogSoftmax <axis = 0> (x)\n loss = NegativeLogLikelihoodLoss (lp, y)")
    result = rewrite(model)
    assert not result.modified
    assert op_types(result.model) == ["LogSoftmax", "NegativeLogLikelihoodLoss"]
    assert result.stats == {"cross_entropy_fused": 0, "linear_cross_entropy_fused": 0, "skipped": 1}
    assert "class axis 1" in result.notes[0]


def test_nll_of_plain_log_probabilities_is_no_candidate():
    model = loss_model("loss = NegativeLogLikelihoodLoss (x, y)")
    result = rewrite(model)
    assert not result.modified and result.notes == []


@pytest.mark.parametrize(
    "extra", ["", "e = Exp (lp)", "lp_t = Transpose (lp)"], ids=["output", "output+exp", "output+transpose"]
)
def test_shared_log_softmax_is_fused_and_its_uses_read_the_fused_log_prob(extra):
    outputs = "float loss, float[6, 5] lp" + (", float[6, 5] e" if "Exp" in extra else ", float[5, 6] lp_t" if extra else "")
    model = model_from_text(
        f"""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[6, 5] x, int64[6] y) => ({outputs}) {{
            lp = LogSoftmax (x)
            loss = NegativeLogLikelihoodLoss (lp, y)
            {extra}
        }}
        """
    )
    feeds = feeds_for()
    expected = run(model, feeds)
    result = rewrite(model)
    assert result.stats["cross_entropy_fused"] == 1
    assert op_types(result.model)[0] == "FusedCrossEntropy"
    assert "LogSoftmax" not in op_types(result.model)
    assert [value.name for value in result.model.graph.outputs] == list(expected)
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    got = run(result.model, feeds)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=RTOL, atol=ATOL, err_msg=key)
    assert not rewrite(result.model).modified


def test_shared_probabilities_are_not_fused():
    # The fused op gives log-probabilities, not the probabilities Log(Softmax) shares.
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[6, 5] x, int64[6] y) => (float loss, float[6, 5] p) {
            p = Softmax <axis = 1> (x)
            lp = Log (p)
            loss = NegativeLogLikelihoodLoss (lp, y)
        }
        """
    )
    result = rewrite(model)
    assert not result.modified
    assert op_types(result.model) == ["Softmax", "Log", "NegativeLogLikelihoodLoss"]


def test_reduce_keeping_dims_is_not_fused():
    body = LOSS_FORMS["gather_reduce_mean"].replace("keepdims = 0", "keepdims = 1")
    model = model_from_text(
        f"""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[6, 5] x, int64[6] y) => (float[1, 1] loss) {{ {body} }}
        """
    )
    result = rewrite(model)
    assert not result.modified
    assert "FusedCrossEntropy" not in op_types(result.model)


def test_idempotent():
    signature, body, _ = HEADS["matmul_reshape"]
    model = loss_model(body, inputs=signature)
    assert rewrite(model).modified
    again = rewrite(model)
    assert not again.modified
    assert again.stats == {"cross_entropy_fused": 0, "linear_cross_entropy_fused": 0, "skipped": 0}


def test_requires_opset_13():
    from onnx_ir.passes import PreconditionError

    model = loss_model("lp = LogSoftmax <axis = 1> (x)\n loss = ReduceMean <keepdims = 0> (lp)", opset=12)
    with pytest.raises(PreconditionError, match="opset >= 13"):
        rewrite(model)


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
def test_function_bodies_check_at_each_opset(opset):
    for op_type in ("FusedCrossEntropy", "FusedLinearCrossEntropy"):
        proto = fce.function_proto(op_type, opset)
        assert [a for a in proto.attribute] == (
            ["reduction", "ignore_index", "transpose_weight"] if "Linear" in op_type else ["reduction", "ignore_index"]
        )
    model = loss_model(LOSS_FORMS["sce_weights_ii"], opset=opset, inputs="float[6, 5] x, int64[6] y, float[5] w")
    assert_same_loss(model, feeds_for(ignore=2))


# --------------------------------------------------------------------------------------
# ONNX conformance cases
# --------------------------------------------------------------------------------------




def test_conformance_cases_were_found():
    names = CASE_NAMES
    assert sum(name.startswith("test_sce") for name in names) >= 68  # 34 cases and their expansions
    assert sum(name.startswith("test_nllloss") for name in names) >= 18


def _expected_stats(name: str) -> int:
    """How many losses the pass fuses in a conformance case."""
    if name.startswith("test_nllloss"):
        return 0  # NLL of given log-probabilities: no softmax to fuse
    return 1  # the expansion's log-probabilities too (a graph output through Identity)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_conformance_expected_outputs_after_rewrite(name):
    proto, data_sets = conformance_cases()[name]
    result = rewrite(ir.serde.deserialize_model(proto))
    assert result.stats["cross_entropy_fused"] == _expected_stats(name)
    rewritten = to_proto(result.model)
    onnx.checker.check_model(rewritten, full_check=True)
    attributes = [a.name for n in proto.graph.node for a in n.attribute]
    for inputs, outputs in data_sets:
        feeds = {info.name: value for info, value in zip(proto.graph.input, inputs, strict=True)}
        got = run(rewritten, feeds)
        for info, expected in zip(proto.graph.output, outputs, strict=True):
            np.testing.assert_allclose(got[info.name], expected, rtol=RTOL, atol=ATOL, err_msg=name)
        if result.modified and "ignore_index" in attributes:
            for value, expected in zip(reference(rewritten, feeds), outputs, strict=True):
                np.testing.assert_allclose(value, expected, rtol=RTOL, atol=ATOL, err_msg=f"{name} (onnx.reference)")


@pytest.mark.parametrize("name", [n for n in CASE_NAMES if n.startswith("test_nllloss")])
def test_conformance_nll_behind_log_softmax(name):
    """The NLL cases with a LogSoftmax(axis=1) put in front: fused, same as ORT's original."""
    proto, data_sets = conformance_cases()[name]
    model = ir.serde.deserialize_model(proto)
    node = model.graph[0]
    raw = model.graph.inputs[0]
    log_softmax = ir.node("LogSoftmax", [raw], attributes={"axis": 1})
    model.graph.insert_before(node, log_softmax)
    node.replace_input_with(0, log_softmax.outputs[0])
    original = to_proto(model)
    inputs = data_sets[0][0]
    feeds = {info.name: value for info, value in zip(proto.graph.input, inputs, strict=True)}
    expected = run(original, feeds)
    result = rewrite(model)
    assert result.stats["cross_entropy_fused"] == 1
    got = run(to_proto(result.model), feeds)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=RTOL, atol=ATOL, err_msg=name)


# --------------------------------------------------------------------------------------
# A tiny LM exported with its loss
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamo,bias", [(False, True), (True, False)])
def test_exported_tiny_lm_loss_is_fused(tmp_path, dynamo, bias):
    proto, arrays = export_tiny_lm(tmp_path, dynamo, bias)
    feeds = {info.name: value for info, value in zip(proto.graph.input, arrays.values(), strict=True)}
    expected = run(proto, feeds)
    result = rewrite(ir.serde.deserialize_model(proto))
    assert result.stats == {"cross_entropy_fused": 0, "linear_cross_entropy_fused": 1, "skipped": 0}
    assert "SoftmaxCrossEntropyLoss" not in op_types(result.model)
    rewritten = to_proto(result.model)
    onnx.checker.check_model(rewritten, full_check=True)
    got = run(rewritten, feeds)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=RTOL, err_msg=key)


@pytest.mark.slow  # imports transformers and exports a Llama with torch.export: ~30 s on 2 cores
def test_exported_tiny_llama_training_loss_is_fused(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests import real_models

    path = tmp_path / "tiny_llama.onnx"
    try:
        loss, ids, labels = real_models.llama_training_loss(path, vocab=128)
    except Exception as exc:
        pytest.skip(f"torch.onnx.export(dynamo=True) failed: {type(exc).__name__}")
    proto = onnx.load(str(path))
    feeds = {info.name: value for info, value in zip(proto.graph.input, (ids.numpy(), labels.numpy()), strict=True)}
    expected = run(proto, feeds)
    result = rewrite(ir.serde.deserialize_model(proto))
    assert result.stats == {"cross_entropy_fused": 0, "linear_cross_entropy_fused": 1, "skipped": 0}
    rewritten = to_proto(result.model)
    onnx.checker.check_model(rewritten, full_check=True)
    got = run(rewritten, feeds)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=RTOL, err_msg=key)
    with torch.no_grad():
        np.testing.assert_allclose(next(iter(got.values())), loss(ids, labels).numpy(), rtol=RTOL)
