"""matmul(softmax(q @ kᵀ · s + mask), v) in a torch.fx graph: the attention finder of the fx twins.

The fx twins of ``sigmoid-attention`` (:mod:`rewriter.passes.sigmoid_attention.fx`) and
``softmax-free-attention`` (:mod:`rewriter.passes.softmax_free_attention.fx`) find
attention with :func:`find_sites`, replace each site by a call of their custom op with
:func:`replace_site`, give the op its fake and backward with
:func:`register_attention_op` and export it with :func:`dynamo_translation`.

Attention is found in two forms:

* ``F.scaled_dot_product_attention`` (``symbolic_trace``) and
  ``aten.scaled_dot_product_attention`` (``torch.export``), with ``attn_mask``,
  ``is_causal`` and ``scale``;
* explicit ``matmul(softmax(q @ kᵀ · s + mask), v)`` in a module: ``@``/``torch.matmul``/
  ``bmm``, kᵀ as ``k.transpose(-2, -1)``/``.mT`` (or any other tensor, transposed back),
  the scale as ``*``/``/`` by a constant on the scores or on q, an additive mask or
  ``masked_fill(cond, -inf)``, and an optional dropout between softmax and the matmul
  (removed: the swap changes the function anyway, and fine-tuning sees no dropout).

Each becomes one call of a custom operator (``torch.library``), whose math is
:mod:`rewriter.passes.attention.math` and whose backward differentiates that math (recomputed
under autograd), so the rewritten module trains; ``register_fake`` lets it be traced and
exported. Softmax calls that are not attention are left alone and noted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from rewriter.passes.attention import math as amath

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# Custom operators: what the attention ops of the passes share
# --------------------------------------------------------------------------------------


def _fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, *args: Any) -> torch.Tensor:
    del k, mask, args
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    del output
    q, k, v, mask, *attributes = inputs
    ctx.attributes = attributes
    ctx.save_for_backward(q, k, v, mask)


def register_attention_op(op: Any, math_of: Callable[..., torch.Tensor]) -> None:
    """Give the custom op ``op(q, k, v, mask, *attributes)`` its fake and its backward.

    ``math_of(q, k, v, mask, attributes)`` is the op's torch math: the backward
    differentiates it, recomputed under autograd.
    """

    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, mask = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out = math_of(leaves[0], leaves[1], leaves[2], mask, ctx.attributes)
            grads = torch.autograd.grad(out, leaves, grad)
        return (*grads, None, None, None, None)

    op.register_fake(_fake)
    op.register_autograd(backward, setup_context=_setup)


# --------------------------------------------------------------------------------------
# Finding attention in a graph
# --------------------------------------------------------------------------------------

_SDPA = {F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}
_SDPA_PARAMS = (
    "query",
    "key",
    "value",
    "attn_mask",
    "dropout_p",
    "is_causal",
    "scale",
    "enable_gqa",
)
_SOFTMAX_FUNCTIONS = {
    torch.softmax,
    F.softmax,
    torch.ops.aten.softmax.int,
    torch.ops.aten._softmax.default,
}
_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm}
_MUL = {operator.mul, torch.mul}
_DIV = {operator.truediv, torch.div}
_ADD = {operator.add, torch.add}
_DROPOUT_FUNCTIONS = {F.dropout, torch.dropout}


@dataclasses.dataclass
class Site:
    """A matched attention: its inputs (fx nodes, or the mask's constant), and the node
    whose value it replaces."""

    q: Any
    k: Any  # None: k_t is Kᵀ from another producer, transposed back by the rewrite
    k_t: Any
    v: Any
    mask: Any
    mask_from_fill: bool  # masked_fill(cond, -inf): the mask is ~cond
    scale: float
    causal: bool
    output: fx.Node
    dropout: bool


def _is_call(node: Any, functions: set[Any], methods: tuple[str, ...] = ()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _shape(node: Any) -> tuple[Any, ...] | None:
    value = (
        node.meta.get("val", node.meta.get("tensor_meta")) if isinstance(node, fx.Node) else None
    )
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _sdpa_site(node: fx.Node) -> Site | str | None:
    if not _is_call(node, _SDPA):
        return None
    arguments = dict(zip(_SDPA_PARAMS, node.args, strict=False)) | dict(node.kwargs)
    if arguments.get("enable_gqa"):
        return "scaled_dot_product_attention with enable_gqa"
    if _number(arguments.get("dropout_p", 0.0)) not in (0.0, None):
        logger.info("%s: dropout_p dropped by the rewrite", node.name)
    scale = arguments.get("scale")
    if scale is None:
        shape = _shape(arguments["query"])
        if shape is None or not isinstance(shape[-1], int):
            return "scale=None and the head dimension is unknown (pass example_inputs)"
        scale = 1.0 / math.sqrt(shape[-1])
    return Site(
        q=arguments["query"],
        k=arguments["key"],
        k_t=None,
        v=arguments["value"],
        mask=arguments.get("attn_mask"),
        mask_from_fill=False,
        scale=float(scale),  # type: ignore[arg-type]
        causal=bool(arguments.get("is_causal", False)),
        output=node,
        dropout=False,
    )


def _softmax_dim(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, Any] | None:
    """(input, dim) of a softmax call in any form, else None."""
    if node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return node.args[0], dim  # type: ignore[return-value]
    if node.op == "call_method" and node.target == "softmax":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return node.args[0], dim  # type: ignore[return-value]
    if node.op == "call_module" and isinstance(
        gm.get_submodule(str(node.target)), torch.nn.Softmax
    ):
        return node.args[0], gm.get_submodule(str(node.target)).dim  # type: ignore[return-value]
    return None


def _strip_scale(node: Any) -> tuple[Any, float]:
    """``node`` without multiplications/divisions by constants, and their product."""
    scale = 1.0
    while _is_call(node, _MUL | _DIV, ("mul", "div", "__mul__", "__truediv__")):
        a, b = node.args[0], node.args[1]
        divide = node.target in _DIV or node.target in ("div", "__truediv__")
        if _number(b) is not None and b:
            scale, node = (scale / b if divide else scale * b), a
        elif _number(a) is not None and not divide:
            scale, node = scale * a, b
        else:
            break
    return node, scale


def _is_dropout(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), torch.nn.Dropout)
    return _is_call(node, _DROPOUT_FUNCTIONS, ("dropout",))


def _explicit_site(gm: fx.GraphModule, node: fx.Node) -> Site | str | None:
    found = _softmax_dim(gm, node)
    if found is None:
        return None
    x: Any
    x, dim = found
    shape = _shape(x)
    if dim != -1 and not (shape is not None and dim == len(shape) - 1):
        return f"softmax over dim {dim}, not the last"
    mask, mask_from_fill = None, False
    if _is_call(x, _ADD, ("add", "__add__")) and len(x.args) == 2:
        a, b = x.args
        for scores, other in ((a, b), (b, a)):
            if _is_call(
                _strip_scale(scores)[0], _MATMUL_FUNCTIONS, ("matmul", "__matmul__", "bmm")
            ):
                x, mask = scores, other
                break
    elif _is_call(x, {torch.masked_fill}, ("masked_fill",)):
        fill = _number(x.args[2] if len(x.args) > 2 else x.kwargs.get("value"))
        if fill is None or fill > amath.MASKED_AT_OR_BELOW:
            return f"masked_fill with {fill} is not a mask"
        x, mask, mask_from_fill = x.args[0], x.args[1], True
    scores, scale = _strip_scale(x)
    if not _is_call(scores, _MATMUL_FUNCTIONS, ("matmul", "__matmul__", "bmm")):
        return "not attention (the softmax input is not q @ kᵀ)"
    q, q_scale = _strip_scale(scores.args[0])
    k_t, k_scale = _strip_scale(scores.args[1])
    scale *= q_scale * k_scale
    k = None
    if (
        _is_call(k_t, {torch.transpose}, ("transpose",))
        and _swaps_last_two(k_t)
        or isinstance(k_t, fx.Node)
        and k_t.op == "call_function"
        and k_t.target is getattr
        and k_t.args[1] == "mT"
    ):
        k = k_t.args[0]
    users = list(node.users)
    dropout = False
    if len(users) == 1 and _is_dropout(gm, users[0]):
        dropout, users = True, list(users[0].users)
    if len(users) != 1 or not _is_call(
        users[0], _MATMUL_FUNCTIONS, ("matmul", "__matmul__", "bmm")
    ):
        return "not attention (the softmax output does not feed one matmul with v)"
    out = users[0]
    if out.args[0] is not (node if not dropout else list(node.users)[0]):
        return "not attention (the probabilities are the right operand)"
    return Site(q, k, k_t, out.args[1], mask, mask_from_fill, scale, False, out, dropout)  # type: ignore[arg-type]


def _swaps_last_two(node: fx.Node) -> bool:
    dims = node.args[1:3]
    shape = _shape(node)
    if shape is not None and all(isinstance(d, int) for d in dims):
        dims = tuple(d % len(shape) for d in dims)  # type: ignore[operator]
        return set(dims) == {len(shape) - 2, len(shape) - 1}
    return set(dims) == {-2, -1}


def find_sites(gm: fx.GraphModule) -> tuple[list[Site], list[str]]:
    """The attention sites of ``gm``, and one note per softmax that is not attention."""
    sites, notes = [], []
    for node in list(gm.graph.nodes):
        site = _sdpa_site(node)
        kind = "scaled_dot_product_attention"
        if site is None:
            site, kind = _explicit_site(gm, node), "softmax"
        if isinstance(site, str):
            notes.append(f"{kind} {node.name!r} left as is: {site}")
        elif site is not None:
            sites.append(site)
    return sites, notes


def replace_site(gm: fx.GraphModule, site: Site, op: Any, attributes: list[Any]) -> None:
    """Replace ``site`` by ``op(q, k, v, mask, *attributes)``."""
    graph = gm.graph
    with graph.inserting_before(site.output):
        k = site.k if site.k is not None else graph.call_method("transpose", (site.k_t, -2, -1))
        mask = site.mask
        if site.mask_from_fill:
            mask = graph.call_function(torch.logical_not, (mask,))
        call = graph.call_function(op, (site.q, k, site.v, mask, *attributes))
    call.meta.update(
        {key: value for key, value in site.output.meta.items() if key in ("val", "tensor_meta")}
    )
    site.output.replace_all_uses_with(call)
    graph.erase_node(site.output)
    graph.eliminate_dead_code()


def key_length(site: Site) -> int | None:
    """The static number of keys of ``site``, or None."""
    shape = _shape(site.k) if site.k is not None else _shape(site.k_t)
    if shape is None:
        return None
    dim = shape[-2] if site.k is not None else shape[-1]
    return dim if isinstance(dim, int) else None


# --------------------------------------------------------------------------------------
# ONNX export: our ops -> ai.rewriter::SigmoidAttention / SoftmaxFreeAttention
# --------------------------------------------------------------------------------------

def dynamo_translation(op_type: str, attribute_names: tuple[str, ...]) -> Callable[..., Any]:
    """The onnxscript translation of an attention custom op ``(q, k, v, mask, *attributes)``
    into ``ai.rewriter::<op_type>(Q, K, V, Mask)``, for ``torch.onnx.export(dynamo=True,
    custom_translation_table=...)``; :func:`rewriter.fx.export_onnx` adds the body.

    The mask becomes additive (0 when there is none), and ``causal`` (when among
    ``attribute_names``) a lower-triangular additive mask, as the ONNX passes make them.

    >>> dynamo_translation("SigmoidAttention", ("scale", "bias", "causal"))  # doctest: +SKIP
    """
    import onnx
    from onnxscript import opset18
    from onnxscript.values import Op, Opset

    from rewriter.pass_base import DOMAIN, DOMAIN_VERSION

    schema_type = onnx.defs.OpSchema
    float_types = ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"]
    op: Any = opset18
    kinds = {"scale": schema_type.AttrType.FLOAT, "bias": schema_type.AttrType.FLOAT}
    schema = schema_type(
        op_type,
        DOMAIN,
        DOMAIN_VERSION,
        inputs=[schema_type.FormalParameter(x, "T") for x in ("Q", "K", "V", "Mask")],
        outputs=[schema_type.FormalParameter("Y", "T")],
        type_constraints=[("T", float_types, "float tensors")],
        attributes=[
            schema_type.Attribute(a, kinds.get(a, schema_type.AttrType.INT), "")
            for a in attribute_names
            if a != "causal"
        ],
    )
    target = Op(Opset(DOMAIN, DOMAIN_VERSION), op_type, schema)

    def translate(q: Any, k: Any, v: Any, mask: Any, *values: Any) -> Any:
        attributes = dict(zip(attribute_names, values, strict=True))
        zero = op.CastLike(op.Constant(value_float=0.0), q)
        minus_inf = op.CastLike(op.Constant(value_float=-math.inf), q)
        if mask is None:
            additive = op.CastLike(op.Constant(value_floats=[0.0]), q)
            additive = op.Reshape(additive, op.Constant(value_ints=[1, 1, 1, 1]))
        elif mask.dtype is not None and mask.dtype.name == "BOOL":
            additive = op.Where(mask, zero, minus_inf)
        else:
            additive = op.CastLike(mask, q)
        if attributes.pop("causal", False):
            lengths = op.Concat(
                op.Shape(q, start=2, end=3), op.Shape(k, start=2, end=3), axis=0
            )
            lower = op.Trilu(op.Expand(op.Constant(value_ints=[1]), lengths), upper=0)
            additive = op.Add(additive, op.Where(op.Cast(lower, to=9), zero, minus_inf))
        return target(q, k, v, additive, **attributes)

    return translate
