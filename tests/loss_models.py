"""Cross-entropy test models shared by the pass's tests and the backend's: the ONNX
conformance cases of the loss operators and a tiny language model exported by torch."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import onnx
import pytest


@functools.cache
def conformance_cases() -> dict[str, tuple[onnx.ModelProto, list]]:
    """The onnx package's node test cases of SoftmaxCrossEntropyLoss and
    NegativeLogLikelihoodLoss, by name: (model, data sets)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import onnx.backend.test.case.node as node_cases

        collected = node_cases.collect_testcases(None)
    ops = ("SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss")
    return {
        case.name: (case.model, case.data_sets)
        for case in collected
        if any(node.op_type in ops for node in case.model.graph.node)
    }


CASE_NAMES = sorted(conformance_cases())


def export_tiny_lm(tmp_path: Path, dynamo: bool, bias: bool) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A tiny LM (embedding, MLP, LM head) with its cross-entropy loss, exported by the
    TorchScript or the dynamo exporter; skips the test when the exporter fails."""
    torch = pytest.importorskip("torch")
    from torch import nn
    from torch.nn import functional as F

    class TinyLM(nn.Module):
        def __init__(self, vocab: int = 64, hidden: int = 16) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, hidden)
            self.mlp = nn.Linear(hidden, hidden)
            self.lm_head = nn.Linear(hidden, vocab, bias=bias)

        def forward(self, ids, labels):
            logits = self.lm_head(torch.tanh(self.mlp(self.embed(ids))))
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)

    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 9))
    labels = torch.randint(0, 64, (2, 9))
    labels[:, -1] = -100
    path = tmp_path / f"tiny_lm_{'dynamo' if dynamo else 'torchscript'}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(TinyLM(), (ids, labels), str(path), dynamo=dynamo, opset_version=18 if dynamo else 17)
        except Exception as exc:  # the exporter's own failure is not this pass's
            pytest.skip(f"torch.onnx.export(dynamo={dynamo}) failed: {type(exc).__name__}")
    return onnx.load(str(path)), {"ids": ids.numpy(), "labels": labels.numpy()}
