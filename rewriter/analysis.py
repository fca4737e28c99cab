"""Graph analyses shared by the passes: weight-carrying ops and transformer blocks.

``weight_ops`` finds the MatMul/Gemm/Conv nodes whose weight is an initializer.
``residual_blocks`` finds the residual-stream segments of a transformer: the values
every path from the model's main input to its output must cross (the dominator chain
of the output in the data-flow graph, computed with networkx), and the weight ops
between consecutive such values. For a BERT encoder these are the LayerNorm outputs
after embeddings, attention and MLP; for a pre-norm decoder the residual Adds.
"""

from __future__ import annotations

import bisect
import dataclasses

import networkx as nx
import onnx_ir as ir

WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1}
_SOURCE = "__source__"


@dataclasses.dataclass(frozen=True)
class WeightOp:
    """A node whose weight operand is an initializer."""

    node: ir.Node
    weight: ir.Value

    @property
    def name(self) -> str:
        return self.node.name or self.weight.name or ""

    @property
    def params(self) -> int:
        shape = self.weight.shape
        assert shape is not None
        count = 1
        for dim in shape.numpy():
            count *= int(dim)
        return count


def weight_ops(model: ir.Model) -> list[WeightOp]:
    """MatMul/Gemm/Conv nodes of the main graph whose weight is a (float) initializer, in order.

    >>> [op.name for op in weight_ops(model)]  # doctest: +SKIP
    ['/encoder/layer.0/attention/self/query/MatMul', ...]
    """
    found = []
    initializers = model.graph.initializers
    for node in model.graph:
        index = WEIGHT_INPUT.get(node.op_type)
        if index is None or node.domain not in ("", "ai.onnx") or len(node.inputs) <= index:
            continue
        weight = node.inputs[index]
        if weight is None or weight.name is None or initializers.get(weight.name) is not weight:
            continue
        if weight.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            continue
        found.append(WeightOp(node, weight))
    return found


# Ops whose output depends on the input's shape only, not its values.
SHAPE_ONLY = {"Shape", "Size"}


def dataflow_graph(model: ir.Model) -> nx.DiGraph:
    """The main graph as a networkx DiGraph of nodes, edges following values.

    Values flow through data edges only: the output of ``Shape``/``Size`` carries no
    data of its input, so those edges are left out (shape arithmetic would otherwise
    tie every layer to the model's input).
    """
    graph = nx.DiGraph()
    for node in model.graph:
        graph.add_node(node)
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer.op_type not in SHAPE_ONLY:
                graph.add_edge(producer, node)
    return graph


@dataclasses.dataclass(frozen=True)
class Block:
    """A residual-stream segment: the stream value entering it, the one leaving it, and its weight ops."""

    index: int
    entry: ir.Value
    exit: ir.Value
    ops: tuple[WeightOp, ...]


def residual_blocks(model: ir.Model, output: ir.Value | None = None) -> list[Block]:
    """Split the model into residual-stream segments (see the module docstring).

    The main input is the graph input whose dominator chain to ``output`` (default: the
    first graph output) splits the weight ops into the most segments (ties: the longest
    chain); side inputs such as attention masks or position ids reach every layer and
    would otherwise hide the stream. (The longest chain alone is not enough: a causal
    mask built from the attention mask is a chain of several nodes before it joins the
    last layer, longer than the token ids' chain through a 2-layer decoder.) Returns []
    when fewer than two stream values exist (no stream to split).
    """
    output = output or model.graph.outputs[0]
    producer = output.producer()
    if producer is None:
        return []
    flow = dataflow_graph(model)
    order = {node: position for position, node in enumerate(model.graph)}
    ops = weight_ops(model)  # in graph order: each block's ops are a slice, found by bisection
    positions = [order[op.node] for op in ops]
    best: list[Block] = []
    best_length = 0
    for graph_input in model.graph.inputs:
        chain = _dominator_chain(flow, graph_input, producer)
        stream = [node.outputs[0] for node in chain if node.outputs]
        if len(stream) < 2:
            continue
        blocks: list[Block] = []
        for entry, exit_ in zip(stream, stream[1:], strict=False):
            start, stop = order[_producer(entry)], order[_producer(exit_)]
            inside = tuple(ops[bisect.bisect_right(positions, start) : bisect.bisect_right(positions, stop)])
            if inside:
                blocks.append(Block(len(blocks), entry, exit_, inside))
        if (len(blocks), len(stream)) > (len(best), best_length):
            best, best_length = blocks, len(stream)
    return best


def _producer(value: ir.Value) -> ir.Node:
    node = value.producer()
    assert node is not None, f"value {value.name} has no producer"
    return node


def _dominator_chain(flow: nx.DiGraph, graph_input: ir.Value, target: ir.Node) -> list[ir.Node]:
    """Nodes on every path from ``graph_input``'s consumers to ``target``, in order."""
    graph = flow.copy()
    graph.add_node(_SOURCE)
    for consumer in graph_input.consumers():
        if consumer in graph:
            graph.add_edge(_SOURCE, consumer)
    if not nx.has_path(graph, _SOURCE, target):
        return []
    reachable = nx.descendants(graph, _SOURCE) | {_SOURCE}
    dominators = nx.immediate_dominators(graph.subgraph(reachable), _SOURCE)
    chain = []
    node = target
    while node != _SOURCE:
        chain.append(node)
        node = dominators[node]
    chain.reverse()
    # Keep the nodes with a single-valued stream: ops with one output (the values
    # that actually carry the residual stream), not shape-only helpers.
    return [node for node in chain if len(node.outputs) == 1]
