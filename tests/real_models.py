"""Real-model test data: small random-weight transformers exported to ONNX, and the
CNNs shipped with the ``onnx`` package.

Nothing is downloaded: every transformer is built from a ``transformers`` config
object with ``torch.manual_seed`` fixed, and exported with either torch exporter.
Each builder returns a :class:`RealModel`: the file, example inputs in their valid
ranges (token ids below the vocabulary size, 0/1 masks and token types), the time
the export took and which exporter made it.

What the exporters emit for softmax (torch 2.13, transformers 5.x, onnxscript 0.7),
read from the exported graphs:

* TorchScript exporter (``dynamo=False``, opset 17, IR 8, no functions): always one
  ``Softmax(axis=-1)`` node per attention layer, never decomposed.
  - ``attn_implementation="eager"``: ``Softmax(Add(Mul(MatMul(q, k), 1/sqrt(d)), mask))``
    where the additive mask is ``Where(mask, 0, finfo(float32).min)``
    (``-3.4028235e38``), computed once and shared by all layers. No Cast sits next
    to the Softmax.
  - ``"sdpa"``: the exporter's own ``scaled_dot_product_attention`` symbolic. Its
    additive mask is ``Where(bool_mask, 0, -inf)`` (a real ``-inf``), and the
    Softmax is followed by ``Where(IsNaN(p), 0, p)`` to zero fully masked rows.
  - ``model.half()`` with eager attention gives a float16 Softmax (no Cast around
    it) that ONNX Runtime CPU runs. With sdpa the fp16 export is invalid: the sdpa
    symbolic builds its ``-inf`` mask in float32, and ONNX Runtime rejects the
    model (``LayerNormalization`` bound to float and float16), so only eager is used.
* Dynamo exporter (``dynamo=True``, opset 18, IR 10, weights as external data in
  ``<name>.onnx.data``): the onnxscript torchlib lowering, optimized, with
  functions inlined (the exported models have no model-local functions; the tests
  count Softmax inside functions anyway).
  - eager: a ``Softmax(axis=-1)`` per layer, the mask ``Where(m, 0, finfo.min)``.
  - sdpa: torchlib decomposes ``scaled_dot_product_attention`` into
    ``MatMul``/``Add``/``Softmax``, again with a ``finfo.min`` (not ``-inf``) mask
    and the ``Where(IsNaN(p), 0, p)`` guard after the Softmax.
  - Llama (eager): ``Softmax(Add(Mul(MatMul(q, k), scale), causal_mask))``; the
    causal and padding masks combine into one ``Where(..., 0, finfo.min)``. The
    ``softmax(..., dtype=float32).to(dtype)`` of the modeling code is a no-op in
    float32, so no Cast surrounds the Softmax.
  - Llama after ``model.half()``: the modeling code's ``softmax(x, dtype=float32)``
    is lowered as ``Cast(Softmax(x_fp16), to=float)`` (the upcast comes after the
    Softmax, not before), then ``.to(float16)`` adds a Cast back, and the optimizer
    removes the Cast pair: the Softmax runs in float16 with no Cast around it.
  - Dynamic batch and sequence dimensions export fine for BERT and Llama; each
    builder still falls back to static shapes (and says why in ``RealModel.note``)
    if a future torch or transformers breaks them.
* TorchScript with ``export_modules_as_functions``: the chosen modules become
  model-local functions (domain = the Python module name) called from the graph;
  their Softmax/LogSoftmax nodes exist only inside the function bodies, whose values
  carry no types. (This option fails on transformers 5 modules, so
  :func:`encoder_with_functions_torchscript` uses a small encoder of its own.)
* ``onnx`` package "light" CNNs (opset 9, IR 3): the classifier ends in
  ``Softmax`` with the opset-9 default ``axis=1``, on a 2-D input except in
  squeezenet (``[1, 1000, 1, 1]``, which Softmax-9 coerces to 2-D at axis 1);
  densenet121 has none. Their weights are ``ConstantOfShape`` fills of 0.02, so every class gets
  the same logit and the softmax output is exactly uniform;
  :func:`light_cnn_with_random_bias` gives a variant whose softmax is not.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from examples import bert as bert_export

logger = logging.getLogger(__name__)

SEED = 0
BATCH = 2
SEQUENCE = 16
VOCAB = 1000
# Weights drawn with std 0.2 instead of the configs' 0.02: attention scores then have
# a spread of a few units, so the softmax rows are peaked as in trained models rather
# than near-uniform, which would hide errors.
INIT_RANGE = 0.2
LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


@dataclasses.dataclass(frozen=True)
class RealModel:
    """An exported model with example inputs.

    ``dims`` gives the value each symbolic input dimension takes in ``inputs``
    (for ``--dim``); ``note`` says what differs from the intended export.
    """

    name: str
    path: Path
    inputs: dict[str, np.ndarray]
    exporter: str
    seconds: float
    dims: dict[str, int] = dataclasses.field(default_factory=dict)
    note: str = ""


def count_ops(model: onnx.ModelProto, op_type: str, domain: str = "") -> int:
    """Nodes ``domain::op_type`` in the graph, its subgraphs and its model-local functions.

    >>> count_ops(onnx.load("bert.onnx"), "Softmax")  # doctest: +SKIP
    2
    """
    domains = ("", "ai.onnx") if domain in ("", "ai.onnx") else (domain,)
    return sum(node.op_type == op_type and node.domain in domains for node in _all_nodes(model))


def _all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    nodes: list[onnx.NodeProto] = []
    pending = [list(model.graph.node)] + [list(function.node) for function in model.functions]
    while pending:
        for node in pending.pop():
            nodes.append(node)
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    pending.append(list(attribute.g.node))
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    pending.extend(list(graph.node) for graph in attribute.graphs)
    return nodes


def _token_inputs(*, with_token_types: bool) -> dict[str, np.ndarray]:
    """Token ids in ``[0, VOCAB)``, a padding mask (row 1 ends in 6 pads), token types 0/1."""
    rng = np.random.default_rng(SEED)
    inputs = {"input_ids": rng.integers(0, VOCAB, (BATCH, SEQUENCE), dtype=np.int64)}
    mask = np.ones((BATCH, SEQUENCE), dtype=np.int64)
    mask[1, SEQUENCE - 6 :] = 0
    inputs["attention_mask"] = mask
    if with_token_types:
        types = np.zeros((BATCH, SEQUENCE), dtype=np.int64)
        types[:, SEQUENCE // 2 :] = 1
        inputs["token_type_ids"] = types
    return inputs


def _bert(attn_implementation: str) -> torch.nn.Module:
    """The raw ``BertModel`` (2 layers, hidden 64, vocab 1000), seeded."""
    return bert_export.random_bert(
        hidden=64,
        layers=2,
        heads=2,
        intermediate=128,
        vocab=VOCAB,
        seed=SEED,
        attn_implementation=attn_implementation,
        max_position_embeddings=128,
        initializer_range=INIT_RANGE,
    )


def bert_torchscript(
    directory: Path, *, attn_implementation: str = "eager", half: bool = False
) -> RealModel:
    """BERT (2 layers, hidden 64) by the TorchScript exporter, opset 17, dynamic batch/sequence.

    ``half`` converts the model with ``model.half()`` before export (eager only, see
    the module docstring).

    >>> bert_torchscript(Path("/tmp")).inputs["input_ids"].shape  # doctest: +SKIP
    (2, 16)
    """
    model = _bert(attn_implementation)
    if half:
        model = model.half()
    inputs = _token_inputs(with_token_types=True)
    suffix = "_fp16" if half else ""
    path = directory / f"bert_{attn_implementation}_torchscript{suffix}.onnx"
    start = time.perf_counter()
    bert_export.export_bert(model, path, inputs, dynamic_outputs=True)
    return RealModel(
        name=path.stem,
        path=path,
        inputs=inputs,
        exporter="torchscript",
        seconds=time.perf_counter() - start,
        dims={"batch": BATCH, "sequence": SEQUENCE},
    )


def _export_torchscript(
    model: torch.nn.Module,
    inputs: dict[str, np.ndarray],
    path: Path,
    *,
    outputs: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    dims: dict[str, int],
    **options: Any,
) -> RealModel:
    """Export with the TorchScript exporter (opset 17), inputs in ``inputs``' order."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated and transformers emits TracerWarnings.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            tuple(torch.from_numpy(value) for value in inputs.values()),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=list(inputs),
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            **options,
        )
    return RealModel(
        name=path.stem,
        path=path,
        inputs=inputs,
        exporter="torchscript",
        seconds=time.perf_counter() - start,
        dims=dims,
    )


def bert_dynamo(
    directory: Path, *, attn_implementation: str = "eager", opset: int = 18
) -> RealModel:
    """BERT by the dynamo exporter (opset 18, or ``opset``: at 23 sdpa is the ONNX
    ``Attention`` operator), dynamic batch/sequence if they export."""
    model = bert_export.outputs_module(_bert(attn_implementation))
    inputs = _token_inputs(with_token_types=True)
    suffix = f"_opset{opset}" if opset != 18 else ""
    path = directory / f"bert_{attn_implementation}_dynamo{suffix}.onnx"
    return _export_dynamo(model, inputs, path, opset=opset)


class _LlamaLogits(torch.nn.Module):
    def __init__(self, llama: torch.nn.Module) -> None:
        super().__init__()
        self.llama = llama

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.llama(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits


def llama_dynamo(
    directory: Path, *, attn_implementation: str = "eager", half: bool = False, opset: int = 18
) -> RealModel:
    """A Llama-shaped causal LM (2 layers, hidden 64, 4 query / 2 key-value heads) by the
    dynamo exporter, without a KV cache; the output is the logits.

    ``half`` converts the model with ``model.half()`` before export; ``opset`` 23 writes
    the ``Attention``, ``RotaryEmbedding`` and ``RMSNormalization`` operators.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        initializer_range=INIT_RANGE,
        use_cache=False,
        attn_implementation=attn_implementation,
    )
    model = _LlamaLogits(LlamaForCausalLM(config)).eval()
    if half:
        model = model.half()
    inputs = _token_inputs(with_token_types=False)
    suffix = ("_fp16" if half else "") + (f"_opset{opset}" if opset != 18 else "")
    path = directory / f"llama_{attn_implementation}_dynamo{suffix}.onnx"
    return _export_dynamo(model, inputs, path, opset=opset)


def _export_dynamo(
    model: torch.nn.Module, inputs: dict[str, np.ndarray], path: Path, *, opset: int = 18
) -> RealModel:
    """Export with dynamic batch/sequence; on failure, export static shapes and say why."""
    from torch.export import Dim

    kwargs = {name: torch.from_numpy(value) for name, value in inputs.items()}
    batch, sequence = Dim("batch"), Dim("sequence", max=128)
    dynamic_shapes: dict[str, Any] | None = {name: {0: batch, 1: sequence} for name in inputs}
    start = time.perf_counter()
    note = ""
    try:
        _dynamo_export(model, kwargs, path, dynamic_shapes, opset)
    except Exception as exc:  # torch.export raises many types on unsupported dynamism
        note = f"dynamic shapes failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); static export"
        logger.warning("%s: %s", path.name, note)
        dynamic_shapes = None
        _dynamo_export(model, kwargs, path, dynamic_shapes, opset)
    return RealModel(
        name=path.stem,
        path=path,
        inputs=inputs,
        exporter="dynamo",
        seconds=time.perf_counter() - start,
        dims={"batch": BATCH, "sequence": SEQUENCE} if dynamic_shapes else {},
        note=note,
    )


def _dynamo_export(
    model: torch.nn.Module,
    kwargs: dict[str, torch.Tensor],
    path: Path,
    dynamic_shapes: dict[str, Any] | None,
    opset: int = 18,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # external_data defaults to True: the weights go to ``<name>.onnx.data``.
        torch.onnx.export(
            model,
            (),
            str(path),
            kwargs=kwargs,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )


class _CausalLMLoss(torch.nn.Module):
    """The causal-LM loss only (returning the logits too would keep them alive)."""

    def __init__(self, llama: torch.nn.Module) -> None:
        super().__init__()
        self.llama = llama

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.llama(input_ids=ids, labels=labels, use_cache=False).loss


def llama_training_loss(
    path: Path, *, vocab: int
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A one-layer Llama (hidden 32) whose output is its training loss, exported to ``path``
    by the dynamo exporter (static shapes, batch 2 x 8 tokens, the first two labels -100).

    Returns the module and its inputs (ids, labels); raises what the exporter raises.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = _CausalLMLoss(LlamaForCausalLM(config).eval())
    ids = torch.randint(0, vocab, (2, 8))
    labels = ids.clone()
    labels[:, :2] = -100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, labels), str(path), dynamo=True, opset_version=18)
    return model, ids, labels


class _ViTProbabilities(torch.nn.Module):
    def __init__(self, vit: torch.nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.vit(pixel_values=pixel_values).logits
        return torch.softmax(logits, dim=-1), torch.log_softmax(logits, dim=-1)


def vit_torchscript(directory: Path) -> RealModel:
    """ViT (32x32 images, 8x8 patches, 10 classes) ending in softmax and log-softmax over
    the logits, by the TorchScript exporter (opset 17, dynamic batch).

    Two attention Softmax nodes, the output Softmax and one LogSoftmax.
    """
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(SEED)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        num_labels=10,
        initializer_range=INIT_RANGE,
        attn_implementation="eager",
    )
    model = _ViTProbabilities(ViTForImageClassification(config)).eval()
    rng = np.random.default_rng(SEED)
    inputs = {"pixel_values": rng.standard_normal((BATCH, 3, 32, 32)).astype(np.float32)}
    path = directory / "vit_torchscript.onnx"
    names = ("pixel_values", "probabilities", "log_probabilities")
    return _export_torchscript(
        model,
        inputs,
        path,
        outputs=["probabilities", "log_probabilities"],
        dynamic_axes={name: {0: "batch"} for name in names},
        dims={"batch": BATCH},
    )


class _SelfAttention(torch.nn.Module):
    """Single-head self-attention with an additive mask (exported as an ONNX function)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.scale = width**-0.5

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) * self.scale + mask
        return x + torch.softmax(scores, dim=-1) @ v


class _LogSoftmaxHead(torch.nn.Module):
    """Token classifier ending in log-softmax (exported as an ONNX function)."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.linear(x), dim=-1)


class _FunctionEncoder(torch.nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_SelfAttention(width), _SelfAttention(width)])
        self.head = _LogSoftmaxHead(width, classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return self.head(x)


def encoder_with_functions_torchscript(directory: Path) -> RealModel:
    """A 2-block attention encoder whose attention and head modules the TorchScript
    exporter writes as model-local functions (``export_modules_as_functions``).

    The Softmax and the LogSoftmax live only inside the function bodies, which carry
    no type annotations (``export_modules_as_functions`` fails on transformers 5
    modules, hence a small encoder of our own). The mask is additive with ``-inf``
    on the last 2 keys of sequence 1.
    """
    torch.manual_seed(SEED)
    model = _FunctionEncoder().eval()
    rng = np.random.default_rng(SEED)
    mask = np.zeros((BATCH, 8, 8), dtype=np.float32)
    mask[1, :, -2:] = -np.inf
    inputs = {"x": rng.standard_normal((BATCH, 8, 16)).astype(np.float32), "mask": mask}
    path = directory / "encoder_with_functions_torchscript.onnx"
    return _export_torchscript(
        model,
        inputs,
        path,
        outputs=["log_probabilities"],
        dynamic_axes={name: {0: "batch"} for name in ("x", "mask", "log_probabilities")},
        dims={"batch": BATCH},
        export_modules_as_functions={_SelfAttention, _LogSoftmaxHead},
    )


def light_cnn_names() -> list[str]:
    """The CNNs of ``onnx/backend/test/data/light``, e.g. ``light_resnet50``."""
    return sorted(path.stem for path in LIGHT_DIR.glob("light_*.onnx"))


def light_cnn(name: str) -> RealModel:
    """A shipped light CNN as is (the file stays in the onnx package; it is only read)."""
    path = LIGHT_DIR / f"{name}.onnx"
    return RealModel(
        name=name,
        path=path,
        inputs=_image_inputs(onnx.load(str(path))),
        exporter="onnx-package",
        seconds=0.0,
    )


def light_cnn_with_random_bias(directory: Path, name: str) -> RealModel:
    """A light CNN whose classifier bias is replaced by seeded N(0, 2) values.

    The shipped weights are constant, so all logits are equal and the softmax output
    is exactly uniform: any softmax implementation agrees with any other there.
    Randomizing the bias of the layer that feeds the Softmax (the last Conv or Gemm
    before it, through Relu, pooling and reshapes) makes the logits differ.
    """
    source = light_cnn(name)
    start = time.perf_counter()
    model = onnx.load(str(source.path))
    producers = {output: node for node in model.graph.node for output in node.output}
    softmax = next(node for node in model.graph.node if node.op_type == "Softmax")
    layer = producers[softmax.input[0]]
    while layer.op_type not in ("Conv", "Gemm"):
        layer = producers[layer.input[0]]
    bias_node = producers[layer.input[2]]
    assert bias_node.op_type == "ConstantOfShape", bias_node.op_type
    shape = numpy_helper.to_array(
        next(init for init in model.graph.initializer if init.name == bias_node.input[0])
    )
    rng = np.random.default_rng(SEED)
    bias = (2.0 * rng.standard_normal(shape)).astype(np.float32)
    # A Constant node, not an initializer: IR 3 requires every initializer to be a
    # graph input too.
    constant = onnx.helper.make_node(
        "Constant", [], [layer.input[2]], value=numpy_helper.from_array(bias, layer.input[2])
    )
    index = list(model.graph.node).index(bias_node)
    model.graph.node.remove(bias_node)
    model.graph.node.insert(index, constant)
    path = directory / f"{name}_random_bias.onnx"
    onnx.save(model, str(path))
    return dataclasses.replace(
        source,
        name=path.stem,
        path=path,
        seconds=time.perf_counter() - start,
        exporter="onnx-package+bias",
    )


def _image_inputs(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Standard-normal images for the float inputs that are not initializers."""
    initializers = {init.name for init in model.graph.initializer}
    rng = np.random.default_rng(SEED)
    inputs = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        shape = [dim.dim_value for dim in value.type.tensor_type.shape.dim]
        inputs[value.name] = rng.standard_normal(shape).astype(np.float32)
    return inputs


# --------------------------------------------------------------------------------------
# Attention forms beyond BERT and Llama (issue 15): small random-weight models
# --------------------------------------------------------------------------------------


class _Output(torch.nn.Module):
    """``model``'s output ``field`` (the output itself for None), called with the inputs
    by keyword (``names``) or positionally."""

    def __init__(self, model: torch.nn.Module, field: str | None, names: list[str]) -> None:
        super().__init__()
        self.model, self.field, self.names = model, field, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.field is None:
            return self.model(*args)
        return getattr(self.model(**dict(zip(self.names, args, strict=True))), self.field)


def _attention_export(
    directory: Path,
    name: str,
    model: torch.nn.Module,
    inputs: dict[str, np.ndarray],
    exporter: str,
    *,
    field: str | None,
    dynamic: dict[int, str],
) -> RealModel:
    """Export ``model`` (its output ``field``) with ``exporter``; ``dynamic`` names the
    symbolic axes of every input (and the output's batch axis)."""
    wrapped = _Output(model.eval(), field, list(inputs))
    first = next(iter(inputs.values()))
    dims = {axis_name: first.shape[axis] for axis, axis_name in dynamic.items()}
    path = directory / f"{name}_{exporter}.onnx"
    if exporter == "torchscript":
        axes = {key: dict(dynamic) for key in inputs} | {"output": {0: "batch"}}
        with torch.enable_grad():  # nn.MultiheadAttention's fast path does not export
            return _export_torchscript(
                wrapped, inputs, path, outputs=["output"], dynamic_axes=axes, dims=dims
            )
    from torch.export import Dim

    named = {axis_name: Dim(axis_name, min=2, max=512) for axis_name in set(dynamic.values())}
    shapes = tuple({axis: named[axis_name] for axis, axis_name in dynamic.items()} for _ in inputs)
    start = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            tuple(torch.from_numpy(value) for value in inputs.values()),
            str(path),
            dynamo=True,
            opset_version=18,
            input_names=list(inputs),
            output_names=["output"],
            dynamic_shapes=(shapes,),  # forward(*args): one tuple for the varargs
            verbose=False,
        )
    return RealModel(path.stem, path, inputs, "dynamo", time.perf_counter() - start, dims)


def _images(size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return {"pixel_values": rng.standard_normal((BATCH, 3, size, size)).astype(np.float32)}


def deberta_v2(directory: Path, exporter: str) -> RealModel:
    """DeBERTa-v2 (2 layers, hidden 64, 2 heads): disentangled attention, c2p and p2c
    relative-position terms added to the scores, heads merged into the batch."""
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(SEED)
    config = DebertaV2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        relative_attention=True,
        position_buckets=32,
        pos_att_type=["p2c", "c2p"],
        initializer_range=INIT_RANGE,
        attn_implementation="eager",
    )
    inputs = _token_inputs(with_token_types=False)
    model = DebertaV2Model(config)
    return _attention_export(
        directory, "deberta_v2", model, inputs, exporter, field="last_hidden_state",
        dynamic={0: "batch", 1: "sequence"},
    )


def albert(directory: Path, exporter: str) -> RealModel:
    """ALBERT (3 layers sharing one layer's weights, hidden 96): the dynamo export reads
    each shared weight through a Transpose, the TorchScript export through Identity. (The
    exporter's optimizer folds the Transpose of a weight under 8192 elements into a copy
    per layer; 96 x 96 keeps it, as in full-size models.)"""
    from transformers import AlbertConfig, AlbertModel

    torch.manual_seed(SEED)
    config = AlbertConfig(
        vocab_size=VOCAB,
        embedding_size=32,
        hidden_size=96,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=192,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    inputs = _token_inputs(with_token_types=False)
    return _attention_export(
        directory, "albert", AlbertModel(config), inputs, exporter, field="last_hidden_state",
        dynamic={0: "batch", 1: "sequence"},
    )


def wav2vec2(directory: Path, exporter: str) -> RealModel:
    """wav2vec2 (a feature encoder of 3 convolutions, kernels 10, 3, 2 with strides 5, 2, 2:
    30 samples at the least; 2 layers, hidden 32), on [batch, samples] audio."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(SEED)
    config = Wav2Vec2Config(
        conv_dim=(16, 16, 16), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), hidden_size=32,
        num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, attn_implementation="eager",
    )
    rng = np.random.default_rng(SEED)
    inputs = {"input_values": rng.standard_normal((BATCH, 400)).astype(np.float32)}
    return _attention_export(
        directory, "wav2vec2", Wav2Vec2Model(config), inputs, exporter, field="last_hidden_state",
        dynamic={0: "batch", 1: "samples"},
    )


def swin(directory: Path, exporter: str) -> RealModel:
    """transformers' Swin (32x32 images, patches of 2, windows of 4x4, one stage of 2
    blocks: the second shifted); its relative-position tables drawn N(0, 1), as trained
    ones are not zero."""
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(SEED)
    config = SwinConfig(
        image_size=32, patch_size=2, embed_dim=32, depths=[2], num_heads=[2], window_size=4,
        attn_implementation="eager",
    )
    model = SwinModel(config)
    for name, parameter in model.named_parameters():
        if "relative_position_bias_table" in name:
            torch.nn.init.normal_(parameter)
    return _attention_export(
        directory, "swin", model, _images(32), exporter, field="last_hidden_state",
        dynamic={0: "batch"},
    )


def segformer(directory: Path, exporter: str) -> RealModel:
    """transformers' SegFormer (64x64 images, 2 stages): the first stage's keys and values
    come from a sequence reduced 4x4 (256 queries, 16 keys)."""
    from transformers import SegformerConfig, SegformerModel

    torch.manual_seed(SEED)
    config = SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[4, 1], hidden_sizes=[16, 32],
        num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2],
        attn_implementation="eager",
    )
    return _attention_export(
        directory, "segformer", SegformerModel(config), _images(64), exporter,
        field="last_hidden_state", dynamic={0: "batch"},
    )


def torchvision_vit(directory: Path, exporter: str) -> RealModel:
    """torchvision's ViT (32x32 images, patches of 8, 2 layers of nn.MultiheadAttention),
    its zero-initialised head drawn N(0, 0.02): with it every output would be 0."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(SEED)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128,
        num_classes=10,
    )
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return _attention_export(
        directory, "tv_vit", model, _images(32), exporter, field=None, dynamic={0: "batch"}
    )


def torchvision_swin(directory: Path, exporter: str) -> RealModel:
    """torchvision's Swin (32x32 images, patches of 4, windows of 4x4, one stage of 2
    blocks: the second shifted, its -100 window mask added per window)."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(SEED)
    model = SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4],
        num_classes=10,
    )
    return _attention_export(
        directory, "tv_swin", model, _images(32), exporter, field=None, dynamic={0: "batch"}
    )


class _MultiheadSelfAttention(torch.nn.Module):
    """torchvision's encoder block: LayerNorm, nn.MultiheadAttention (batch first), residual."""

    def __init__(self, width: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.attention = torch.nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return x + self.attention(y, y, y, need_weights=False)[0]


def multihead_attention(directory: Path, exporter: str) -> RealModel:
    """One ``nn.MultiheadAttention`` self-attention block (width 32, 2 heads, 8 tokens)."""
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    inputs = {"x": rng.standard_normal((BATCH, 8, 32)).astype(np.float32)}
    return _attention_export(
        directory, "mha", _MultiheadSelfAttention(), inputs, exporter, field=None,
        dynamic={0: "batch", 1: "sequence"},
    )


ATTENTION_BUILDERS: dict[str, Callable[[Path, str], RealModel]] = {
    "albert": albert,
    "wav2vec2": wav2vec2,
    "deberta_v2": deberta_v2,
    "swin": swin,
    "segformer": segformer,
    "tv_vit": torchvision_vit,
    "tv_swin": torchvision_swin,
    "mha": multihead_attention,
}


# name -> builder(directory); the fixtures in conftest.py build these once a session.
BUILDERS: dict[str, Callable[[Path], RealModel]] = {
    "bert_eager_torchscript": lambda d: bert_torchscript(d, attn_implementation="eager"),
    "bert_sdpa_torchscript": lambda d: bert_torchscript(d, attn_implementation="sdpa"),
    "bert_eager_torchscript_fp16": lambda d: bert_torchscript(d, half=True),
    "bert_eager_dynamo": lambda d: bert_dynamo(d, attn_implementation="eager"),
    "bert_sdpa_dynamo": lambda d: bert_dynamo(d, attn_implementation="sdpa"),
    "llama_eager_dynamo": lambda d: llama_dynamo(d, attn_implementation="eager"),
    "llama_sdpa_dynamo": lambda d: llama_dynamo(d, attn_implementation="sdpa"),
    "bert_sdpa_dynamo_opset23": lambda d: bert_dynamo(d, attn_implementation="sdpa", opset=23),
    "llama_sdpa_dynamo_opset23": lambda d: llama_dynamo(d, attn_implementation="sdpa", opset=23),
    "llama_eager_dynamo_fp16": lambda d: llama_dynamo(d, half=True),
    "vit_torchscript": vit_torchscript,
    "encoder_with_functions_torchscript": encoder_with_functions_torchscript,
}
for _name, _builder in ATTENTION_BUILDERS.items():
    for _exporter in ("torchscript", "dynamo"):
        BUILDERS[f"{_name}_{_exporter}"] = (
            lambda d, builder=_builder, exporter=_exporter: builder(d, exporter)
        )
RANDOM_BIAS_SUFFIX = "_random_bias"


def build(name: str, directory: Path) -> RealModel:
    """Build the model called ``name``: a key of :data:`BUILDERS`, a light CNN name
    (``light_resnet50``) or a light CNN name with ``_random_bias`` appended.

    >>> build("light_squeezenet", Path("/tmp")).inputs["data_0"].shape  # doctest: +SKIP
    (1, 3, 224, 224)
    """
    if name in BUILDERS:
        return BUILDERS[name](directory)
    if name.endswith(RANDOM_BIAS_SUFFIX):
        return light_cnn_with_random_bias(directory, name.removesuffix(RANDOM_BIAS_SUFFIX))
    if name in light_cnn_names():
        return light_cnn(name)
    raise KeyError(f"no real model called {name!r}")
