"""Tests of the torch.fx front itself (``rewriter.fx``): names, tracing, reports, verification.

The two-pass-softmax fx pass serves as the pass under test; its own tests are in
tests/passes/two_pass_softmax/.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from rewriter import fx as rfx
from rewriter.errors import InputError, VerificationError
from rewriter.passes.two_pass_softmax import TwoPassSoftmaxOptions
from rewriter.passes.two_pass_softmax.fx import TwoPassSoftmaxFxPass


def test_pass_names_and_options_come_from_the_onnx_registry() -> None:
    (fx_pass,) = rfx.parse_fx_pipeline(["two-pass-softmax(log_softmax=no)"])
    assert fx_pass.options == TwoPassSoftmaxOptions(log_softmax=False)
    with pytest.raises(
        InputError, match=r"'no-such-pass' is unknown \(fx passes: .*two-pass-softmax"
    ):
        rfx.parse_fx_pipeline("no-such-pass")
    with pytest.raises(InputError, match="has no option 'bits'"):
        rfx.parse_fx_pipeline("two-pass-softmax(bits=8)")
    with pytest.raises(InputError, match="expects bool"):
        rfx.parse_fx_pipeline("two-pass-softmax(log_softmax=maybe)")


def test_untraceable_module_without_inputs_is_an_input_error() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.softmax(-1) if x.sum() > 0 else x

    with pytest.raises(InputError, match="pass example_inputs to trace with torch.export"):
        rfx.rewrite(Branchy(), "two-pass-softmax")


def test_inputs_the_original_module_cannot_take_are_an_input_error() -> None:
    # Before: the module's own IndexError / NotImplementedError came out of the API.
    class Scores(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x @ x.transpose(-1, -2), dim=-1)

    with pytest.raises(InputError, match=r"original module fails on example_inputs \(IndexError"):
        rfx.rewrite(Scores(), ["two-pass-softmax"], example_inputs=(torch.randn(3),))
    integers = torch.ones(2, 4, 8, dtype=torch.int64)
    with pytest.raises(InputError, match="original module fails on example_inputs"):
        rfx.rewrite(Scores(), ["two-pass-softmax"], example_inputs=(integers,))


def test_report_json_has_the_onnx_report_shape() -> None:
    _, report = rfx.rewrite(nn.Softmax(-1), "two-pass-softmax", (torch.randn(2, 3),))
    document = json.loads(json.dumps(report.to_json()))
    assert set(document["passes"][0]) >= {"name", "exact", "stats", "notes", "seconds", "modified"}
    assert set(document["verification"]) >= {"outputs", "inputs", "tolerance", "enforced", "passed"}
    assert document["verification"]["inputs"] == {"args[0]": [2, 3]}
    assert document["verification"]["tolerance"] == {"rtol": 1e-5, "atol": 1e-6}


class BreakSoftmax(TwoPassSoftmaxFxPass):
    """An 'exact' pass that is not: verification must catch it."""

    def call(self, gm: fx.GraphModule) -> rfx.FxPassResult:
        for node in list(gm.graph.nodes):
            if node.target is F.softmax:
                with gm.graph.inserting_before(node):
                    node.replace_all_uses_with(gm.graph.call_function(torch.relu, node.args[:1]))
                gm.graph.erase_node(node)
        return rfx.FxPassResult(gm, True, {"softmax_replaced": 1})


def test_verification_error_when_an_exact_pass_changes_outputs() -> None:
    with pytest.raises(VerificationError, match="exact fx rewrite changed output"):
        rfx.rewrite(nn.Softmax(-1), [BreakSoftmax()], (torch.randn(2, 3),))


class ScalesItsInput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        return torch.softmax(x, -1)


class UpdatesItsParameter(nn.Module):
    """A forward that updates its own parameter and buffer (a running statistic, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(5))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.scale.mul_(2.0)
            self.calls += 1
        return torch.softmax(x * self.scale, -1)


@pytest.mark.parametrize("module", [ScalesItsInput(), UpdatesItsParameter()], ids=type)
def test_each_run_gets_its_own_inputs_and_the_modules_state(module: nn.Module) -> None:
    # Before: both modules ran on the same tensors, one after the other, so the second
    # saw the first's updates (a false VerificationError), and the caller's tensor and
    # the module's parameter were left changed.
    x = torch.randn(2, 5)
    before_x = x.clone()
    before_state = {name: value.clone() for name, value in module.state_dict().items()}
    _, report = rfx.rewrite(module, ["two-pass-softmax"], example_inputs=(x,))
    assert report.verification is not None and report.verification.passed
    assert report.verification.outputs[0].max_abs_err < 1e-6
    assert torch.equal(x, before_x)
    for name, value in module.state_dict().items():
        assert torch.equal(value, before_state[name]), name


class SpectrumOfSoftmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft(torch.softmax(x, -1))


def test_complex_outputs_are_checked_at_their_components_tolerance() -> None:
    # Before: complex outputs had to match bit for bit ("exceed the tolerance None"),
    # and their imaginary parts were dropped with a ComplexWarning.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", np.exceptions.ComplexWarning)
        _, report = rfx.rewrite(SpectrumOfSoftmax(), ["two-pass-softmax"], example_inputs=(torch.randn(4, 16),))
    assert report.verification is not None and report.verification.passed
    (output,) = report.verification.outputs
    assert output.dtype == "complex64" and output.tolerance == {"rtol": 1e-5, "atol": 1e-6}
    assert 0 < output.max_abs_err < 1e-6
