"""cross_entropy(linear(h, W, b), y) -> fused_linear_cross_entropy(h, W, y, b), on torch.fx.

The fx twin of ``fuse-cross-entropy``, with the ONNX pass's name and ``Options``. Exact:
:func:`rewrite_fx` finds ``F.cross_entropy``, ``nn.CrossEntropyLoss`` and
``nll_loss(log_softmax(x, 1))`` in a ``torch.fx.GraphModule`` and replaces them, fed by an
``nn.Linear`` / ``F.linear`` / ``matmul(h, W.t())`` head (optionally flattened with
``view(-1, V)``), by :func:`~rewriter.passes.fuse_cross_entropy.loss.fused_linear_cross_entropy`,
else by :func:`~rewriter.passes.fuse_cross_entropy.loss.fused_cross_entropy`, class
weights included: the chunked losses of :mod:`rewriter.passes.fuse_cross_entropy.loss`.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from rewriter.fx.pass_base import FxPass, FxPassResult
from rewriter.fx.registry import register_fx_pass
from rewriter.passes.fuse_cross_entropy import onnx as _onnx_pass
from rewriter.passes.fuse_cross_entropy.loss import (
    REDUCTIONS,
    fused_cross_entropy,
    fused_linear_cross_entropy,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# The fx rewrite
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Loss:
    """A matched loss call: its logits, target and options."""

    logits: fx.Node
    target: Any
    ignore_index: int
    reduction: str
    label_smoothing: float
    consumer: fx.Node  # the node reading the logits: the loss, or its log-softmax
    class_weight: fx.Node | str | None = None  # a node, or the path of a module's buffer


@dataclasses.dataclass
class _Head:
    """A linear head feeding the loss: ``hidden @ weight.T + bias``, ``weight`` in [V, H]."""

    hidden: Any  # an fx.Node
    weight: Any
    bias: Any
    guarded: bool = False


_CE_PARAMS = (
    "input",
    "target",
    "weight",
    "size_average",
    "ignore_index",
    "reduce",
    "reduction",
    "label_smoothing",
)
_NLL_PARAMS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction")
_LOG_SOFTMAX = {F.log_softmax, torch.log_softmax}


def _arguments(node: fx.Node, params: tuple[str, ...]) -> dict[str, Any]:
    return dict(zip(params, node.args, strict=False)) | dict(node.kwargs)


def _match_loss(gm: fx.GraphModule, node: fx.Node) -> _Loss | str | None:
    """The loss a node computes, why it cannot be fused (a string), or None when it is no loss."""
    if node.op == "call_module" and isinstance(
        gm.get_submodule(str(node.target)), nn.CrossEntropyLoss
    ):
        module = gm.get_submodule(str(node.target))
        arguments = _arguments(node, ("input", "target")) | {
            "weight": None if module.weight is None else f"{node.target}.weight",
            "ignore_index": module.ignore_index,
            "reduction": module.reduction,
            "label_smoothing": module.label_smoothing,
        }
    elif node.op == "call_function" and node.target is F.cross_entropy:
        arguments = _arguments(node, _CE_PARAMS)
    elif node.op == "call_function" and node.target is F.nll_loss:
        arguments = _arguments(node, _NLL_PARAMS)
        log_prob = arguments.get("input")
        dim = _log_softmax_dim(log_prob)
        if dim is None:
            return None  # an NLL of something other than a log-softmax
        if dim != 1:
            return f"log_softmax over dim {dim}, not the class dim 1"
        assert isinstance(log_prob, fx.Node)
        if len(log_prob.users) > 1:
            return "the log-softmax has other users"
        arguments["input"], arguments["log_softmax"] = log_prob.args[0], log_prob
    else:
        return None
    class_weight = arguments.get("weight")
    if class_weight is not None and not isinstance(class_weight, (fx.Node, str)):
        return "class weights are not a traced value"
    if arguments.get("size_average") is not None or arguments.get("reduce") is not None:
        return "legacy size_average/reduce arguments"
    logits, reduction = arguments.get("input"), arguments.get("reduction", "mean")
    ignore_index, smoothing = (
        arguments.get("ignore_index", -100),
        arguments.get("label_smoothing", 0.0),
    )
    if not isinstance(logits, fx.Node):
        return "the logits are not a traced value"
    if (
        reduction not in REDUCTIONS
        or not isinstance(ignore_index, int)
        or not isinstance(smoothing, (int, float))
    ):
        return "reduction, ignore_index or label_smoothing is computed at run time"
    consumer = arguments.pop("log_softmax", node)
    return _Loss(
        logits,
        arguments.get("target"),
        ignore_index,
        reduction,
        float(smoothing),
        consumer,
        class_weight,
    )


def _log_softmax_dim(node: Any) -> int | None:
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target in _LOG_SOFTMAX:
        dim = _arguments(node, ("input", "dim")).get("dim")
    elif node.op == "call_method" and node.target == "log_softmax":
        dim = _arguments(node, ("self", "dim")).get("dim")
    else:
        return None
    return dim if isinstance(dim, int) else -1000


def _match_head(gm: fx.GraphModule, logits: fx.Node, loss: fx.Node) -> _Head | None:
    """The linear head producing ``logits`` for ``loss`` (possibly through ``view(-1, V)``), or None."""
    source: Any = logits
    flattened = False
    if logits.op == "call_method" and logits.target in ("view", "reshape") and _flattens(logits):
        source, flattened = logits.args[0], True
    if not isinstance(source, fx.Node):
        return None
    # Other users would keep the logits alive; a size query feeding the view dies with it.
    consumer = logits if flattened else loss
    if any(user is not consumer and set(user.users) != {logits} for user in source.users):
        return None
    rank = _rank(source)
    if not flattened and rank is not None and rank != 2:
        return None  # (B, T, V) logits: class dim 1 is T, not the vocabulary
    head = _linear(gm, source)
    if head is not None:
        # Without the view and the rank unknown, the call checks the rank at run time.
        head.guarded = not flattened and rank is None
    return head


def _flattens(view: fx.Node) -> bool:
    """``x.view(-1, V)`` where V is ``x``'s last dimension (an int, ``x.size(-1)`` or ``x.shape[-1]``)."""
    shape = view.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    if len(shape) != 2 or shape[0] != -1:
        return False
    last, source = shape[1], view.args[0]
    if isinstance(last, int):
        meta = source.meta.get("tensor_meta") if isinstance(source, fx.Node) else None
        return meta is None or meta.shape[-1] == last
    if not isinstance(last, fx.Node):
        return False
    if last.op == "call_method" and last.target == "size":
        return last.args[0] is source and tuple(last.args[1:]) in ((-1,),)
    if last.op == "call_function" and last.target is operator.getitem and last.args[1] == -1:
        shape_node = last.args[0]
        return (
            isinstance(shape_node, fx.Node)
            and shape_node.op == "call_function"
            and shape_node.target is getattr
            and shape_node.args == (source, "shape")
        )
    return False


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _linear(gm: fx.GraphModule, node: fx.Node) -> _Head | None:
    if node.op == "call_module" and type(gm.get_submodule(str(node.target))) is nn.Linear:
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{node.target}.weight")
            bias = (
                gm.graph.get_attr(f"{node.target}.bias")
                if gm.get_submodule(str(node.target)).bias is not None
                else None
            )
        return _Head(node.args[0], weight, bias)
    if node.op == "call_function" and node.target in (F.linear, torch._C._nn.linear):
        arguments = _arguments(node, ("input", "weight", "bias"))
        return _Head(arguments["input"], arguments["weight"], arguments.get("bias"))
    if node.op == "call_function" and node.target in (torch.matmul, operator.matmul):
        h, w_t = node.args[:2]
        # matmul(h, W.t()) or h @ W.T: the weight is transposed back to [V, H].
        if isinstance(w_t, fx.Node) and w_t.op == "call_method" and w_t.target == "t":
            return _Head(h, w_t.args[0], None)
        if (
            isinstance(w_t, fx.Node)
            and w_t.op == "call_function"
            and w_t.target is getattr
            and w_t.args[1] == "T"
        ):
            return _Head(h, w_t.args[0], None)
    return None


def rewrite_fx(
    gm: fx.GraphModule,
    *,
    chunk_size: int | None = None,
    linear: bool = True,
    z_loss: float = 0.0,
    notes: list[str] | None = None,
) -> tuple[fx.GraphModule, dict[str, int]]:
    """Replace cross-entropy losses in ``gm`` by the fused, chunked ones (in place).

    Returns ``(gm, stats)`` with stats ``{"cross_entropy_fused": n,
    "linear_cross_entropy_fused": m, "skipped": k}``; why the ``k`` losses were left is
    appended to ``notes`` when given. ``linear=False`` fuses only the loss, never the
    head. ``z_loss`` adds the z-loss term (which changes the loss: 0 keeps it exact).
    Shape metadata (``ShapeProp``) lets the rewrite see 2-D logits; without it, a head
    not followed by ``view(-1, V)`` is fused behind a run-time rank check.

    >>> class Head(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lm_head = nn.Linear(8, 32)
    ...     def forward(self, h, y):
    ...         return F.cross_entropy(self.lm_head(h), y)
    >>> gm, stats = rewrite_fx(torch.fx.symbolic_trace(Head()))
    >>> stats
    {'cross_entropy_fused': 0, 'linear_cross_entropy_fused': 1, 'skipped': 0}
    """
    stats = {"cross_entropy_fused": 0, "linear_cross_entropy_fused": 0}
    skipped: list[str] = []
    graph = gm.graph
    for node in list(graph.nodes):
        loss = _match_loss(gm, node)
        if loss is None:
            continue
        if isinstance(loss, str):
            skipped.append(f"loss {node.name!r} left as is: {loss}")
            continue
        options: dict[str, Any] = {
            "chunk_size": chunk_size,
            "ignore_index": loss.ignore_index,
            "reduction": loss.reduction,
            "label_smoothing": loss.label_smoothing,
            "z_loss": z_loss,
        }
        head = _match_head(gm, loss.logits, loss.consumer) if linear else None
        with graph.inserting_before(node):
            if isinstance(loss.class_weight, str):  # nn.CrossEntropyLoss's weight buffer
                options["class_weight"] = graph.get_attr(loss.class_weight)
            elif loss.class_weight is not None:
                options["class_weight"] = loss.class_weight
            if head is not None:
                function = (
                    _linear_cross_entropy_if_2d if head.guarded else fused_linear_cross_entropy
                )
                new = graph.call_function(
                    function, (head.hidden, head.weight, loss.target, head.bias), options
                )
                stats["linear_cross_entropy_fused"] += 1
            else:
                new = graph.call_function(fused_cross_entropy, (loss.logits, loss.target), options)
                stats["cross_entropy_fused"] += 1
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    _drop_unused_modules(gm)
    graph.lint()
    gm.recompile()
    stats["skipped"] = len(skipped)
    for note in skipped:
        logger.info("fuse-cross-entropy (fx): %s", note)
    if notes is not None:
        notes.extend(skipped)
    return gm, stats


def _linear_cross_entropy_if_2d(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """The fused loss for 2-D hidden states; the original ``cross_entropy(linear)`` otherwise.

    Inserted where tracing could not tell the logits' rank: on (B, T, V) logits the class
    dimension 1 is not the vocabulary, so fusing would change the function.
    """
    if hidden.dim() == 2:
        return fused_linear_cross_entropy(hidden, weight, target, bias, **options)
    z_loss = options.pop("z_loss", 0.0)
    options.pop("chunk_size", None)
    if z_loss:
        raise ValueError("z_loss needs 2-D hidden states")
    class_weight = options.pop("class_weight", None)
    return F.cross_entropy(F.linear(hidden, weight, bias), target, weight=class_weight, **options)


def _drop_unused_modules(gm: fx.GraphModule) -> None:
    """Delete loss modules the rewrite replaced (parameters stay: the fused call reads them;
    a loss module whose class weights the fused call reads stays too)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    used |= {str(n.target).rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}
    for name, module in list(gm.named_children()):
        if isinstance(module, nn.CrossEntropyLoss) and name not in used:
            gm.delete_submodule(name)


# --------------------------------------------------------------------------------------
# The fx pass, by the ONNX pass's name and options
# --------------------------------------------------------------------------------------


@register_fx_pass
class FuseCrossEntropyFxPass(FxPass):
    """Losses (with their linear head) -> chunked :func:`fused_linear_cross_entropy`."""

    name = _onnx_pass.FuseCrossEntropyPass.name
    exact = _onnx_pass.FuseCrossEntropyPass.exact
    Options = _onnx_pass.FuseCrossEntropyOptions

    def call(self, gm: fx.GraphModule) -> FxPassResult:
        notes: list[str] = []
        gm, stats = rewrite_fx(
            gm, chunk_size=self.options.chunk_size or None, linear=self.options.linear, notes=notes
        )
        modified = stats["cross_entropy_fused"] + stats["linear_cross_entropy_fused"] > 0
        return FxPassResult(gm, modified, stats, notes)
