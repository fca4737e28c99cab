"""Tests of ``two-pass-softmax`` on the torch.fx front: the call forms, the custom ops, export."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from rewriter import fx as rfx
from rewriter import verify
from rewriter.fx.verify import to_numpy
from rewriter.passes.two_pass_softmax import math as tpm

OUR_OPS = {
    torch.ops.rewriter.two_pass_softmax.default,
    torch.ops.rewriter.two_pass_log_softmax.default,
}
SOFTMAX_TARGETS = {
    torch.softmax,
    torch.log_softmax,
    F.softmax,
    F.log_softmax,
    torch.special.softmax,
    torch.special.log_softmax,
    torch.ops.aten.softmax.int,
    torch.ops.aten._softmax.default,
    torch.ops.aten.log_softmax.int,
    torch.ops.aten._log_softmax.default,
    "softmax",
    "log_softmax",
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _softmax_calls(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes still computing a softmax the usual way (functions, methods or modules)."""
    return [
        node
        for node in gm.graph.nodes
        if (node.op in ("call_function", "call_method") and node.target in SOFTMAX_TARGETS)
        or (
            node.op == "call_module"
            and isinstance(gm.get_submodule(node.target), (nn.Softmax, nn.LogSoftmax))
        )
    ]


def _our_ops(gm: fx.GraphModule) -> list[fx.Node]:
    return [
        node for node in gm.graph.nodes if node.op == "call_function" and node.target in OUR_OPS
    ]


class Call(nn.Module):
    """A module applying one function to its input (traced as a single call)."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


# name -> (module, which statistic counts it)
CALL_FORMS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "torch.softmax": (lambda: Call(lambda x: torch.softmax(x, -1)), "softmax_replaced"),
    "F.softmax(dim=)": (lambda: Call(lambda x: F.softmax(x, dim=1)), "softmax_replaced"),
    "F.softmax(dtype=)": (
        lambda: Call(lambda x: F.softmax(x, -1, dtype=torch.float16)),
        "softmax_replaced",
    ),
    "F.softmax(implicit dim)": (lambda: Call(lambda x: F.softmax(x)), "softmax_replaced"),
    "Tensor.softmax": (lambda: Call(lambda x: x.softmax(0)), "softmax_replaced"),
    "Tensor.softmax(dim=)": (lambda: Call(lambda x: x.softmax(dim=-2)), "softmax_replaced"),
    "torch.special.softmax": (
        lambda: Call(lambda x: torch.special.softmax(x, 2)),
        "softmax_replaced",
    ),
    "nn.Softmax": (lambda: nn.Softmax(dim=-1), "softmax_replaced"),
    "nn.Softmax(implicit dim)": (lambda: nn.Softmax(), "softmax_replaced"),
    "torch.log_softmax": (lambda: Call(lambda x: torch.log_softmax(x, 1)), "log_softmax_replaced"),
    "F.log_softmax": (lambda: Call(lambda x: F.log_softmax(x, dim=-1)), "log_softmax_replaced"),
    "Tensor.log_softmax": (lambda: Call(lambda x: x.log_softmax(-1)), "log_softmax_replaced"),
    "nn.LogSoftmax": (lambda: nn.LogSoftmax(dim=0), "log_softmax_replaced"),
}


# -- structure ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Implicit dimension choice:UserWarning")  # the legacy forms
@pytest.mark.parametrize("form", sorted(CALL_FORMS))
def test_each_call_form_is_replaced(form: str) -> None:
    make, stat = CALL_FORMS[form]
    x = torch.randn(2, 3, 5)
    gm, report = rfx.rewrite(make(), "two-pass-softmax", (x,))
    expected = {"softmax_replaced": 0, "log_softmax_replaced": 0, "skipped": 0} | {stat: 1}
    assert report.passes[0].stats == expected
    assert report.traced_with == "symbolic_trace"
    assert _softmax_calls(gm) == []
    assert len(_our_ops(gm)) == 1
    assert not any(isinstance(m, (nn.Softmax, nn.LogSoftmax)) for m in gm.modules())
    gm.graph.lint()
    assert report.verification is not None and report.verification.passed


@pytest.mark.parametrize("decomposed", [False, True], ids=["aten.softmax.int", "aten._softmax"])
def test_aten_forms_from_torch_export(decomposed: bool) -> None:
    module = Call(lambda x: torch.softmax(x, -1) + torch.log_softmax(x, 1))
    x = torch.randn(2, 4, 6)
    program = torch.export.export(module, (x,))
    if decomposed:
        program = program.run_decompositions()
    exported = program.module()
    assert len(_softmax_calls(exported)) == 2
    gm, report = rfx.rewrite(exported, "two-pass-softmax", (x,))
    assert report.passes[0].stats == {
        "softmax_replaced": 1,
        "log_softmax_replaced": 1,
        "skipped": 0,
    }
    assert report.traced_with == "graph_module"
    assert _softmax_calls(gm) == [] and len(_our_ops(gm)) == 2
    assert len(_softmax_calls(exported)) == 2  # the given GraphModule is not modified
    assert report.verification is not None and report.verification.passed


def test_aten_half_to_float_casts_first() -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.ops.aten._softmax.default, (x, -1, True)))
    gm = fx.GraphModule(nn.Module(), graph)
    x16 = torch.randn(3, 7).half()
    # torch has no CPU kernel for half_to_float: compare with the float softmax instead.
    rewritten, report = rfx.rewrite(gm, "two-pass-softmax", (x16,), check=False)
    assert report.passes[0].stats["softmax_replaced"] == 1
    y = rewritten(x16)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.softmax(x16.float(), -1), rtol=1e-6, atol=1e-7)


def test_log_softmax_option_false_leaves_log_softmax() -> None:
    module = Call(lambda x: torch.softmax(x, -1) * F.log_softmax(x, -1))
    gm, report = rfx.rewrite(module, "two-pass-softmax(log_softmax=false)", (torch.randn(2, 5),))
    # The same keys as the ONNX pass with the same option.
    assert report.passes[0].stats == {"softmax_replaced": 1, "skipped": 0}
    assert [node.target for node in _softmax_calls(gm)] == [F.log_softmax]


# -- negative ----------------------------------------------------------------------------


def test_module_without_softmax_is_unchanged() -> None:
    module = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    before = fx.symbolic_trace(module).code
    gm, report = rfx.rewrite(module, "two-pass-softmax", (torch.randn(2, 4),))
    assert report.passes[0].stats == {
        "softmax_replaced": 0,
        "log_softmax_replaced": 0,
        "skipped": 0,
    }
    assert not report.passes[0].modified
    assert gm.code == before


def test_integer_softmax_is_left_alone_and_reported() -> None:
    # torch has no integer softmax kernel, so this module cannot run: no verification.
    module = Call(lambda x: x.softmax(-1))
    gm, report = rfx.rewrite(
        module, "two-pass-softmax", (torch.arange(6).reshape(2, 3),), check=False
    )
    assert report.passes[0].stats == {
        "softmax_replaced": 0,
        "log_softmax_replaced": 0,
        "skipped": 1,
    }
    assert report.passes[0].notes == [
        "Softmax 'softmax' left as is: input type torch.int64 is not a float type"
    ]
    assert [node.target for node in _softmax_calls(gm)] == ["softmax"]


def test_integer_softmax_with_float_dtype_is_replaced() -> None:
    module = Call(lambda x: F.softmax(x, -1, dtype=torch.float32))
    gm, report = rfx.rewrite(module, "two-pass-softmax", (torch.arange(6).reshape(2, 3),))
    assert report.passes[0].stats["softmax_replaced"] == 1
    assert report.verification is not None and report.verification.passed


def test_float64_softmax_is_left_alone_and_reported() -> None:
    # The polynomial's 7.5e-8 relative error is exact for float32 and below, not float64.
    module = Call(lambda x: x.softmax(-1) + F.softmax(x.float(), -1, dtype=torch.float64))
    gm, report = rfx.rewrite(module, "two-pass-softmax", (torch.randn(2, 3, dtype=torch.float64),))
    assert report.passes[0].stats == {
        "softmax_replaced": 0,
        "log_softmax_replaced": 0,
        "skipped": 2,
    }
    assert "float64 is computed to 7.5e-08 relative error only" in report.passes[0].notes[0]
    assert len(_softmax_calls(gm)) == 2


def test_dim_computed_at_run_time_is_left_alone_and_reported() -> None:
    module = Call(lambda x: x.softmax(x.dim() - 1) + F.softmax(x, -1))
    gm, report = rfx.rewrite(module, "two-pass-softmax", (torch.randn(2, 3),))
    assert report.passes[0].stats == {
        "softmax_replaced": 1,
        "log_softmax_replaced": 0,
        "skipped": 1,
    }
    assert report.passes[0].notes == ["Softmax 'softmax' left as is: dim is computed at run time"]
    assert report.verification is not None and report.verification.passed


@pytest.mark.filterwarnings("ignore:Implicit dimension choice:UserWarning")
def test_implicit_dim_without_inputs_is_left_alone() -> None:
    gm, report = rfx.rewrite(nn.Softmax(), "two-pass-softmax")
    assert report.passes[0].stats["skipped"] == 1
    assert "needs the input's rank" in report.passes[0].notes[0]
    assert report.verification is None and report.notes == ["not verified: no example_inputs given"]


# -- idempotence and validity --------------------------------------------------------------


def test_second_run_changes_nothing() -> None:
    module = Call(lambda x: torch.softmax(x, 0) + F.log_softmax(x, -1))
    x = torch.randn(3, 4)
    once, _ = rfx.rewrite(module, "two-pass-softmax", (x,))
    twice, report = rfx.rewrite(once, "two-pass-softmax", (x,))
    assert report.passes[0].stats == {
        "softmax_replaced": 0,
        "log_softmax_replaced": 0,
        "skipped": 0,
    }
    assert not report.passes[0].modified
    assert twice.code == once.code
    twice.graph.lint()


# -- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_seeded_outputs_agree_with_torch(log: bool, dim: int) -> None:
    x = torch.randn(4, 33, 17) * 8
    op = torch.ops.rewriter.two_pass_log_softmax if log else torch.ops.rewriter.two_pass_softmax
    reference = (torch.log_softmax if log else torch.softmax)(x, dim)
    comparison = verify.compare("y", reference.numpy(), op(x, dim).numpy())
    assert verify.check_tolerance(
        comparison, reference.numpy(), verify.DEFAULT_TOLERANCE["float32"]
    )


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_float64_op_matches_the_numpy_reference(log: bool) -> None:
    # The same float64 algorithm in both: only libm rounding may differ (~1 ulp).
    x = torch.randn(8, 64, dtype=torch.float64) * 20
    op = torch.ops.rewriter.two_pass_log_softmax if log else torch.ops.rewriter.two_pass_softmax
    np.testing.assert_allclose(
        op(x, -1).numpy(), tpm.reference_softmax(x.numpy(), log=log), rtol=1e-13, atol=1e-15
    )


def _edge_rows(dtype: torch.dtype) -> torch.Tensor:
    inf, nan, big = float("inf"), float("nan"), torch.finfo(dtype).max
    rows = [
        [1.0, 2.0, 3.0, 4.0],
        [-inf, 0.0, 1.0, -inf],  # masked positions
        [-inf, -inf, -inf, -inf],  # a fully masked row: NaN, as torch
        [inf, 0.0, 1.0, 2.0],
        [nan, 0.0, 1.0, 2.0],
        [big, big, 0.0, -big],
        [-big, -big, -big, -big],
        [big / 2, -big / 2, 0.0, 1.0],
    ]
    return (
        torch.tensor(rows, dtype=torch.float64)
        .clamp(-big, big)
        .nan_to_num(nan, inf, -inf)
        .to(dtype)
    )


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["float32", "float16", "bfloat16"]
)
def test_edge_cases_follow_torch_semantics(dtype: torch.dtype, log: bool) -> None:
    x = _edge_rows(dtype)
    op = torch.ops.rewriter.two_pass_log_softmax if log else torch.ops.rewriter.two_pass_softmax
    y = op(x, -1)
    reference = (torch.log_softmax if log else torch.softmax)(x, -1)
    assert y.dtype == dtype
    ref_np, y_np = to_numpy(reference), to_numpy(y)
    # NaN and infinities must sit where torch puts them; finite values within the
    # dtype's exact-rewrite tolerance.
    comparison = verify.compare("y", ref_np, y_np)
    assert comparison.nan_mismatch == 0
    name = str(dtype).removeprefix("torch.")
    assert verify.check_tolerance(comparison, ref_np, verify.DEFAULT_TOLERANCE[name]), comparison


def test_scalar_and_empty_inputs() -> None:
    assert torch.ops.rewriter.two_pass_softmax(torch.tensor(3.0), 0).item() == pytest.approx(
        1.0, abs=1e-7
    )
    assert torch.ops.rewriter.two_pass_log_softmax(torch.empty(0, 4), 1).shape == (0, 4)
    with pytest.raises(RuntimeError, match="expected a float tensor"):
        torch.ops.rewriter.two_pass_softmax(torch.arange(3), 0)


# -- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_gradcheck(log: bool) -> None:
    # float64 in, so the float64 algorithm's output is smooth enough for finite differences.
    op = torch.ops.rewriter.two_pass_log_softmax if log else torch.ops.rewriter.two_pass_softmax
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: op(t, 0), (x,))


class Classifier(nn.Module):
    """Attention-like scores, a softmax over keys and a log-softmax head."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(8, 8)
        # No key bias: its gradient is zero in exact arithmetic (softmax ignores a
        # constant added to a row), so both sides would only compare rounding noise.
        self.key = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 5)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = F.softmax(self.query(x) @ self.key(x).transpose(-1, -2) / 8**0.5, dim=-1)
        return F.log_softmax(self.head(self.drop(weights @ x)), dim=-1)


def _gradients(module: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad()
    x = x.clone().requires_grad_(True)
    torch.manual_seed(1)  # the same dropout masks in both runs
    F.nll_loss(module(x).flatten(0, 1), target).backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return grads | {"input": x.grad}


def test_rewritten_model_trains_with_the_same_gradients() -> None:
    model = Classifier().train()
    x, target = torch.randn(2, 6, 8), torch.randint(0, 5, (12,))
    gm, report = rfx.rewrite(model, "two-pass-softmax", (x,))
    assert report.passes[0].stats == {
        "softmax_replaced": 1,
        "log_softmax_replaced": 1,
        "skipped": 0,
    }
    expected = _gradients(model, x, target)
    actual = _gradients(gm, x, target)  # gm shares model's parameters
    for name, grad in expected.items():
        # Relative to each gradient's scale (see verify.Tolerance): float32 rounding only.
        assert (actual[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
    torch.optim.SGD(gm.parameters(), lr=0.1).step()


# -- torch.export and ONNX -------------------------------------------------------------------


def test_rewritten_module_exports_with_torch_export() -> None:
    x = torch.randn(2, 6, 8)
    gm, _ = rfx.rewrite(Classifier().eval(), "two-pass-softmax", (x,))
    program = torch.export.export(gm, (x,))
    targets = {node.target for node in program.graph.nodes if node.op == "call_function"}
    assert targets >= OUR_OPS
    torch.testing.assert_close(program.module()(x), gm(x), rtol=0, atol=0)


class MixedDims(nn.Module):
    """Softmax over the last axis and another, a log-softmax and a float16 softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.lin(x)
        return torch.softmax(h, 1) + F.log_softmax(h, -1), h.softmax(dim=-1), F.softmax(h.half(), 0)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_runs_in_onnxruntime(dynamo: bool, tmp_path) -> None:
    x = torch.randn(2, 3, 4)
    gm, _ = rfx.rewrite(MixedDims().eval(), "two-pass-softmax", (x,))
    path = rfx.export_onnx(gm, (x,), tmp_path / "model.onnx", dynamo=dynamo)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = [node.op_type for node in proto.graph.node]
    assert "Softmax" not in ops and "LogSoftmax" not in ops
    assert ops.count("TwoPassSoftmax") == 3 and ops.count("TwoPassLogSoftmax") == 1
    assert ops.count("Transpose") == 4  # around the two softmaxes not along the last axis
    assert sorted(f.name for f in proto.functions) == ["TwoPassLogSoftmax", "TwoPassSoftmax"]
    session = verify.session(path)
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    for got, expected in zip(outputs, gm(x), strict=True):
        expected = expected.detach().numpy()
        assert got.dtype == expected.dtype
        comparison = verify.compare("y", expected, got)
        assert verify.check_tolerance(
            comparison, expected, verify.DEFAULT_TOLERANCE[str(expected.dtype)]
        )


# -- a real model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert() -> tuple[nn.Module, torch.Tensor, int]:
    """A 2-layer BERT from a tiny config, eager attention (an explicit softmax per layer)."""
    pytest.importorskip("transformers")
    from examples.bert import random_bert

    model = random_bert(hidden=32, layers=2, heads=2, intermediate=64, vocab=100, seed=0)
    return model, torch.randint(0, 100, (2, 8)), 2


def test_tiny_bert_attention_softmaxes_are_replaced(tiny_bert) -> None:
    model, ids, layers = tiny_bert
    gm, report = rfx.rewrite(model, "two-pass-softmax", (ids,))
    # transformers' BERT does not symbolic-trace; the front falls back to torch.export.
    assert report.traced_with == "torch.export"
    assert "traced with torch.export instead" in report.notes[0]
    stats = report.passes[0].stats
    assert stats == {"softmax_replaced": layers, "log_softmax_replaced": 0, "skipped": 0}
    assert report.verification is not None and report.verification.passed
    names = {o.name for o in report.verification.outputs}
    assert names == {"['last_hidden_state']", "['pooler_output']"}


@pytest.mark.slow
def test_tiny_bert_exports_to_onnx(tiny_bert, tmp_path) -> None:
    model, ids, layers = tiny_bert
    gm, _ = rfx.rewrite(model, "two-pass-softmax", (ids,))
    path = rfx.export_onnx(gm, (ids,), tmp_path / "bert.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [node.op_type for node in proto.graph.node].count("TwoPassSoftmax") == layers
    session = verify.session(path)
    (hidden, *_) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    expected = model(ids).last_hidden_state.detach().numpy()
    comparison = verify.compare("last_hidden_state", expected, hidden)
    assert verify.check_tolerance(comparison, expected, verify.DEFAULT_TOLERANCE["float32"])
