"""A transformers BERT as an ONNX file: the one export helper of the examples, benchmarks and tests.

Every BERT this repository exports goes through :func:`export_bert`: the model behind
keyword inputs (transformers 5 reordered ``forward``'s positional arguments, so a
positional trace would mis-bind them), returning ``(last_hidden_state, pooler_output)``,
written by the TorchScript exporter (opset 17 by default) with dynamic batch and
sequence axes, atomically. :func:`random_bert` builds a seeded random one.

>>> model = random_bert(hidden=32, layers=2, heads=2, intermediate=64, vocab=100)  # doctest: +SKIP
>>> ids = np.zeros((1, 8), np.int64)
>>> export_bert(model, "bert.onnx", {"input_ids": ids, "attention_mask": ids + 1})  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from examples.torchvision_shim import install as install_torchvision_shim

# transformers imports torchvision when it is installed (the dev extra has it for the
# detector tests), and that wheel's ops do not load on the CPU torch: define them first.
install_torchvision_shim()

OUTPUTS = ("last_hidden_state", "pooler_output")


def random_bert(
    *,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    vocab: int = 30522,
    seed: int = 0,
    attn_implementation: str = "eager",
    **config: Any,
) -> Any:
    """A ``transformers.BertModel`` with random weights (seeded), in eval mode.

    ``config`` holds further ``BertConfig`` fields (``initializer_range``, ...).
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    bert_config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        attn_implementation=attn_implementation,
        **config,
    )
    return transformers.BertModel(bert_config).eval()


def outputs_module(bert: Any) -> Any:
    """``bert`` taking ``(input_ids, attention_mask[, token_type_ids])`` positionally and
    returning ``(last_hidden_state, pooler_output)``."""
    import torch

    class BertOutputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None = None,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return out.last_hidden_state, out.pooler_output

    return BertOutputs().eval()


def export_bert(
    bert: Any,
    path: str | Path,
    inputs: dict[str, np.ndarray],
    *,
    opset: int = 17,
    dynamic_outputs: bool = False,
    no_grad: bool = False,
) -> Path:
    """Export ``bert`` (a ``BertModel``) to ``path`` with ``inputs`` as the example batch.

    The graph's inputs are ``inputs``' names in order (``input_ids``, ``attention_mask``
    and optionally ``token_type_ids``), all with axes ``batch`` and ``sequence``;
    ``dynamic_outputs`` names the outputs' axes too. ``no_grad`` traces under
    ``torch.no_grad()``. Written to a staging file and moved into place.
    """
    import torch

    path = Path(path)
    staging = path.with_name(f".{path.name}.partial")
    dynamic = {name: {0: "batch", 1: "sequence"} for name in inputs}
    if dynamic_outputs:
        dynamic |= {"last_hidden_state": {0: "batch", 1: "sequence"}, "pooler_output": {0: "batch"}}
    args = tuple(torch.from_numpy(value) for value in inputs.values())
    with warnings.catch_warnings(), torch.set_grad_enabled(not no_grad):
        # The TorchScript exporter is deprecated and transformers emits TracerWarnings.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            outputs_module(bert),
            args,
            str(staging),
            input_names=list(inputs),
            output_names=list(OUTPUTS),
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )
    staging.replace(path)
    return path
