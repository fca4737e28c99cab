"""torch.softmax / F.softmax / nn.Softmax / ... -> torch.ops.rewriter.two_pass_softmax, on torch.fx.

The fx twin of ``two-pass-softmax``: it replaces every softmax and log-softmax call form (``torch.softmax``,
``F.softmax``, ``Tensor.softmax``, ``nn.Softmax``, ``torch.special.softmax``, the
``aten`` overloads of exported graphs, and the log variants) by the custom operators
``torch.ops.rewriter.two_pass_softmax(x, dim)`` and ``two_pass_log_softmax(x, dim)``:
the two-pass algorithm of :mod:`rewriter.passes.two_pass_softmax.math` (Dukhan & Ablavatski 2020,
arXiv 2001.04438) in float64, with the exact softmax backward, so the rewritten model
still trains, exports with ``torch.export`` and, through
:func:`rewriter.fx.export_onnx`, becomes
``ai.rewriter::TwoPassSoftmax`` nodes carrying the ONNX pass's function bodies.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from rewriter.fx.export import register_onnx_export
from rewriter.fx.pass_base import FxPass, FxPassResult
from rewriter.fx.registry import register_fx_pass
from rewriter.pass_base import DOMAIN, DOMAIN_VERSION
from rewriter.passes.two_pass_softmax import body
from rewriter.passes.two_pass_softmax import math as tpm
from rewriter.passes.two_pass_softmax import onnx as onnx_two_pass

# --------------------------------------------------------------------------------------
# The custom operators
# --------------------------------------------------------------------------------------


def _two_pass(x: torch.Tensor, dim: int, *, log: bool) -> torch.Tensor:
    """The two-pass (mantissa, exponent) softmax of ``x`` along ``dim``, in float64."""
    if not x.is_floating_point():
        raise RuntimeError(f"two_pass_softmax: expected a float tensor, got {x.dtype}")
    if x.numel() == 0:
        return torch.empty_like(x)
    xd = x.to(torch.float64)
    # Pass 1: n = round(x log2 e), t = x - n ln2 (Cody-Waite), m = p(t).
    n = torch.floor(xd * tpm.LOG2E + 0.5)
    t = xd - n * tpm.LN2_HI - n * tpm.LN2_LO
    # -inf has no mantissa (t is NaN): m = p(0) and its 2**(n - N) = 0 removes it.
    t = torch.where(torch.isneginf(xd), 0.0, t).clamp(-tpm.T_CLAMP, tpm.T_CLAMP)
    m = torch.full_like(t, tpm.EXP_POLY[-1])
    for coefficient in reversed(tpm.EXP_POLY[:-1]):
        m = m * t + coefficient
    delta = n - n.amax(dim, keepdim=True)
    scaled = m * torch.exp2(delta)
    total = scaled.sum(dim, keepdim=True)
    # Pass 2: y = m / M * 2**(n - N), or its logarithm.
    y = (torch.log(m) + delta * tpm.LN2) - torch.log(total) if log else scaled / total
    return y.to(x.dtype)


@torch.library.custom_op("rewriter::two_pass_softmax", mutates_args=())
def two_pass_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax of ``x`` along ``dim`` by the exact two-pass algorithm (float64 inside).

    >>> torch.ops.rewriter.two_pass_softmax(torch.tensor([1.0, 2.0, 3.0]), -1)
    tensor([0.0900, 0.2447, 0.6652])
    """
    return _two_pass(x, dim, log=False)


@torch.library.custom_op("rewriter::two_pass_log_softmax", mutates_args=())
def two_pass_log_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Log-softmax of ``x`` along ``dim`` by the exact two-pass algorithm (float64 inside).

    >>> torch.ops.rewriter.two_pass_log_softmax(torch.tensor([0.0, 0.0]), 0)
    tensor([-0.6931, -0.6931])
    """
    return _two_pass(x, dim, log=True)


def _fake(x: torch.Tensor, dim: int) -> torch.Tensor:
    torch._check(x.is_floating_point(), lambda: f"expected a float tensor, got {x.dtype}")
    return torch.empty_like(x)


def _save_output(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.dim = inputs[1]
    ctx.save_for_backward(output)


def _accumulation_type(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 gradients are reduced in float32, as torch's own kernels do.
    return torch.promote_types(dtype, torch.float32)


def _softmax_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    (y,) = ctx.saved_tensors
    acc = _accumulation_type(y.dtype)
    g, yy = grad.to(acc), y.to(acc)
    return (yy * (g - (g * yy).sum(ctx.dim, keepdim=True))).to(grad.dtype), None


def _log_softmax_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    (y,) = ctx.saved_tensors
    acc = _accumulation_type(y.dtype)
    g, yy = grad.to(acc), y.to(acc)
    return (g - torch.exp(yy) * g.sum(ctx.dim, keepdim=True)).to(grad.dtype), None


for _op, _backward in (
    (two_pass_softmax, _softmax_backward),
    (two_pass_log_softmax, _log_softmax_backward),
):
    _op.register_fake(_fake)
    _op.register_autograd(_backward, setup_context=_save_output)

# our op -> the ONNX operator (of the ONNX pass) it exports to
_OPS = {
    torch.ops.rewriter.two_pass_softmax.default: body.TARGETS["Softmax"],
    torch.ops.rewriter.two_pass_log_softmax.default: body.TARGETS["LogSoftmax"],
}
_OP_FOR = {
    False: torch.ops.rewriter.two_pass_softmax.default,
    True: torch.ops.rewriter.two_pass_log_softmax.default,
}

@dataclasses.dataclass(frozen=True)
class _Form:
    """How a softmax call form passes its arguments after the input tensor."""

    log: bool
    params: tuple[str, ...] = ("dim", "dtype")
    implicit_dim: bool = False  # dim=None picks torch's legacy dim (F.softmax, nn.Softmax)


_aten = torch.ops.aten
_FUNCTION_FORMS: dict[Any, _Form] = {
    torch.softmax: _Form(log=False),
    torch.special.softmax: _Form(log=False),
    F.softmax: _Form(log=False, params=("dim", "_stacklevel", "dtype"), implicit_dim=True),
    _aten.softmax.int: _Form(log=False),
    _aten._softmax.default: _Form(log=False, params=("dim", "half_to_float")),
    torch.log_softmax: _Form(log=True),
    torch.special.log_softmax: _Form(log=True),
    F.log_softmax: _Form(log=True, params=("dim", "_stacklevel", "dtype"), implicit_dim=True),
    _aten.log_softmax.int: _Form(log=True),
    _aten._log_softmax.default: _Form(log=True, params=("dim", "half_to_float")),
}
_METHOD_FORMS = {"softmax": _Form(log=False), "log_softmax": _Form(log=True)}
_MODULE_FORMS = {
    torch.nn.Softmax: _Form(log=False, implicit_dim=True),
    torch.nn.LogSoftmax: _Form(log=True, implicit_dim=True),
}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A matched softmax call, ready to be replaced."""

    x: fx.Node
    dim: int
    dtype: torch.dtype | None  # cast the input to it first


def _match(gm: fx.GraphModule, node: fx.Node) -> tuple[_Form, fx.Node, dict[str, Any]] | None:
    """The call form, input and other arguments of a softmax call, or None."""
    form = None
    arguments: dict[str, Any] = {}
    if node.op == "call_function":
        form = _FUNCTION_FORMS.get(node.target)
    elif node.op == "call_method":
        form = _METHOD_FORMS.get(str(node.target))
    elif node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        form = _MODULE_FORMS.get(type(module))
        arguments = {"dim": getattr(module, "dim", None)}
    if form is None:
        return None
    kwargs = dict(node.kwargs)
    x = node.args[0] if node.args else kwargs.pop("input", kwargs.pop("self", None))
    if not isinstance(x, fx.Node):
        return None
    if node.op != "call_module":
        arguments = dict(zip(form.params, node.args[1:], strict=False)) | kwargs
    return form, x, arguments


def _tensor_meta(node: fx.Node) -> tuple[torch.dtype, int] | None:
    """``(dtype, rank)`` of a node's value, from torch.export's or ShapeProp's metadata."""
    value = node.meta.get("val", node.meta.get("tensor_meta"))
    if value is None or not hasattr(value, "dtype") or not hasattr(value, "shape"):
        return None
    return value.dtype, len(value.shape)  # a (fake) tensor or ShapeProp's TensorMetadata


def _plan(form: _Form, x: fx.Node, arguments: dict[str, Any]) -> _Plan | str:
    """How to replace the call, or why it cannot be."""
    meta = _tensor_meta(x)
    dtype = arguments.get("dtype")
    if arguments.get("half_to_float"):
        dtype = torch.float32
    if dtype is not None and not isinstance(dtype, torch.dtype):
        return "dtype is computed at run time"
    effective = dtype or (meta[0] if meta else None)
    if effective is not None and not effective.is_floating_point:
        return f"input type {effective} is not a float type"
    if effective == torch.float64:
        # float64 results would carry the polynomial's error, far above float64 rounding.
        return f"float64 is computed to {tpm.EXP_POLY_MAX_REL_ERROR:g} relative error only, not exactly"
    dim = arguments.get("dim")
    if dim is None and form.implicit_dim:
        if meta is None:
            return "implicit dim (dim=None) needs the input's rank: pass example_inputs"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dim = F._get_softmax_dim("softmax", meta[1], 0)  # type: ignore[attr-defined]
    if isinstance(dim, str):
        return f"named dimension {dim!r}"
    if not isinstance(dim, int):
        return "dim is computed at run time" if dim is not None else "no dim given"
    rank = max(meta[1], 1) if meta else None
    if rank is not None and not -rank <= dim < rank:
        return f"dim {dim} out of range for rank {meta[1] if meta else '?'}"
    return _Plan(x=x, dim=dim, dtype=dtype)


@register_fx_pass
class TwoPassSoftmaxFxPass(FxPass):
    """Softmax/LogSoftmax calls -> ``torch.ops.rewriter.two_pass_(log_)softmax``.

    >>> gm = torch.fx.symbolic_trace(torch.nn.Softmax(dim=-1))
    >>> TwoPassSoftmaxFxPass()(gm).stats
    {'softmax_replaced': 1, 'log_softmax_replaced': 0, 'skipped': 0}
    """

    name = onnx_two_pass.TwoPassSoftmaxPass.name
    exact = onnx_two_pass.TwoPassSoftmaxPass.exact
    Options = onnx_two_pass.TwoPassSoftmaxOptions

    def call(self, gm: fx.GraphModule) -> FxPassResult:
        kinds = [False, True] if self.options.log_softmax else [False]
        stats = {_stat_name(log): 0 for log in kinds}
        notes: list[str] = []
        replaced_modules: set[str] = set()
        for node in list(gm.graph.nodes):
            matched = _match(gm, node)
            if matched is None or matched[0].log not in kinds:
                continue
            form, x, arguments = matched
            plan = _plan(form, x, arguments)
            if isinstance(plan, str):
                kind = "LogSoftmax" if form.log else "Softmax"
                notes.append(f"{kind} {node.name!r} left as is: {plan}")
                continue
            _replace(gm.graph, node, plan, _OP_FOR[form.log])
            if node.op == "call_module":
                replaced_modules.add(str(node.target))
            stats[_stat_name(form.log)] += 1
        still_used = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        for target in sorted(replaced_modules - still_used):
            gm.delete_submodule(target)
        stats["skipped"] = len(notes)
        modified = any(stats[_stat_name(log)] for log in kinds)
        return FxPassResult(gm, modified, stats, notes)


def _stat_name(log: bool) -> str:
    return "log_softmax_replaced" if log else "softmax_replaced"


def _replace(graph: fx.Graph, node: fx.Node, plan: _Plan, op: Any) -> None:
    with graph.inserting_before(node):
        x = plan.x
        if plan.dtype is not None:
            x = graph.call_method("to", (x, plan.dtype))
        new = graph.call_function(op, (x, plan.dim))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


# --------------------------------------------------------------------------------------
# ONNX export: our ops -> ai.rewriter::TwoPassSoftmax with the ONNX pass's bodies
# --------------------------------------------------------------------------------------


def _last_axis_perm(dim: int, rank: int) -> list[int] | None:
    """The permutation that swaps ``dim`` with the last axis, or None if it is last."""
    axis = dim % rank
    if axis == rank - 1:
        return None
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    return perm


def _dynamo_translations() -> dict[Any, Callable[..., Any]]:
    """onnxscript translations of our ops for ``torch.onnx.export(dynamo=True)``."""
    import onnx
    from onnxscript import opset18
    from onnxscript.values import Op, Opset

    schema_type = onnx.defs.OpSchema
    float_types = ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"]
    opset = Opset(DOMAIN, DOMAIN_VERSION)
    op: Any = opset18  # untyped: attribute values are plain Python here

    def translation(op_type: str) -> Callable[..., Any]:
        # A schema object, not registered in onnx: the body is attached after export.
        schema = schema_type(
            op_type,
            DOMAIN,
            DOMAIN_VERSION,
            inputs=[schema_type.FormalParameter("X", "T")],
            outputs=[schema_type.FormalParameter("Y", "T")],
            type_constraints=[("T", float_types, "float tensors")],
        )
        target = Op(opset, op_type, schema)

        def translate(x: Any, dim: int) -> Any:
            rank = len(x.shape)
            if rank == 0:
                y = target(op.Reshape(x, op.Constant(value_ints=[1])))
                return op.Reshape(y, op.Constant(value_ints=[]))
            perm = _last_axis_perm(dim, rank)
            if perm is None:
                return target(x)
            return op.Transpose(target(op.Transpose(x, perm=perm)), perm=perm)

        return translate

    return {torch_op: translation(op_type) for torch_op, op_type in _OPS.items()}


def _torchscript_symbolics() -> dict[str, Callable[..., Any]]:
    """Symbolic functions of our ops for the TorchScript exporter (``dynamo=False``)."""
    from torch.onnx import symbolic_helper

    def symbolic_for(op_type: str) -> Callable[..., Any]:
        @symbolic_helper.parse_args("v", "i")
        def symbolic(g: Any, x: Any, dim: int) -> Any:
            rank = symbolic_helper._get_tensor_rank(x)
            name = f"{DOMAIN}::{op_type}"
            if rank == 0:
                flat = g.op("Reshape", x, g.op("Constant", value_t=torch.tensor([1])))
                scalar = g.op("Constant", value_t=torch.tensor([], dtype=torch.int64))
                return g.op("Reshape", g.op(name, flat), scalar)
            if rank is None and dim != -1:
                return symbolic_helper._unimplemented(
                    op_type, "dim other than -1 with unknown rank", x
                )
            perm = _last_axis_perm(dim, rank) if rank is not None else None
            if perm is None:
                return g.op(name, x)
            moved = g.op("Transpose", x, perm_i=perm)
            return g.op("Transpose", g.op(name, moved), perm_i=perm)

        return symbolic

    return {
        torch_op.name().removesuffix(".default"): symbolic_for(op_type)
        for torch_op, op_type in _OPS.items()
    }


register_onnx_export(
    _dynamo_translations,
    {op_type: functools.partial(body.function_proto, op_type) for op_type in body.TARGETS.values()},
    torchscript=_torchscript_symbolics,
)
