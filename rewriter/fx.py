"""The torch.fx front: the same passes, by the same names, on ``torch.fx.GraphModule``s.

``rewrite(module, "two-pass-softmax", example_inputs)`` traces the module
(``torch.fx.symbolic_trace``, else ``torch.export``), runs the fx passes, then runs the
original and the rewritten module on ``example_inputs`` and compares every output with
:mod:`rewriter.verify`, as the ONNX front does. Pass names and options are the ONNX
registry's: each fx pass takes its ONNX twin's ``Options`` dataclass.

``two-pass-softmax`` replaces every softmax and log-softmax call form (``torch.softmax``,
``F.softmax``, ``Tensor.softmax``, ``nn.Softmax``, ``torch.special.softmax``, the
``aten`` overloads of exported graphs, and the log variants) by the custom operators
``torch.ops.rewriter.two_pass_softmax(x, dim)`` and ``two_pass_log_softmax(x, dim)``:
the two-pass algorithm of :mod:`rewriter.two_pass_math` (Dukhan & Ablavatski 2020,
arXiv 2001.04438) in float64, with the exact softmax backward, so the rewritten model
still trains, exports with ``torch.export`` and, through :func:`export_onnx`, becomes
``ai.rewriter::TwoPassSoftmax`` nodes carrying the ONNX pass's function bodies.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx
from torch.utils import _pytree as pytree

from rewriter import io, registry, verify
from rewriter import two_pass_math as tpm
from rewriter.errors import InputError, VerificationError
from rewriter.job import Verification
from rewriter.manager import PassRecord
from rewriter.pass_base import DOMAIN, DOMAIN_VERSION, add_function, parse_options
from rewriter.passes import two_pass_softmax as onnx_two_pass

logger = logging.getLogger(__name__)

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
    torch.ops.rewriter.two_pass_softmax.default: onnx_two_pass.TARGETS["Softmax"],
    torch.ops.rewriter.two_pass_log_softmax.default: onnx_two_pass.TARGETS["LogSoftmax"],
}
_OP_FOR = {
    False: torch.ops.rewriter.two_pass_softmax.default,
    True: torch.ops.rewriter.two_pass_log_softmax.default,
}

# --------------------------------------------------------------------------------------
# fx passes: a registry keyed by the ONNX registry's names
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class FxPassResult:
    """What an fx pass did: the module, whether it changed, its statistics and notes."""

    graph_module: fx.GraphModule
    modified: bool
    stats: dict[str, int]
    notes: list[str] = dataclasses.field(default_factory=list)


class FxPass:
    """Base of the fx passes. ``name``, ``exact`` and ``Options`` are the ONNX twin's."""

    name: ClassVar[str]
    exact: ClassVar[bool]
    Options: ClassVar[type]

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def __call__(self, gm: fx.GraphModule) -> FxPassResult:
        result = self.call(gm)
        gm.graph.lint()
        gm.recompile()
        return result

    def call(self, gm: fx.GraphModule) -> FxPassResult:
        raise NotImplementedError


_FX_PASSES: dict[str, type[FxPass]] = {}


def register_fx_pass(cls: type[FxPass]) -> type[FxPass]:
    """Class decorator adding an fx pass under the name of the ONNX pass it mirrors.

    The fx pass must take the ONNX pass's ``Options``: one option definition, two fronts.
    """
    if cls.name in _FX_PASSES and _FX_PASSES[cls.name] is not cls:
        raise ValueError(f"fx pass name {cls.name!r} registered twice")
    twin = registry.available().get(cls.name)
    if twin is None or twin.Options is not cls.Options or twin.exact != cls.exact:
        raise ValueError(
            f"fx pass {cls.name!r} must mirror a registered ONNX pass's Options and exact"
        )
    _FX_PASSES[cls.name] = cls
    return cls


def available() -> dict[str, type[FxPass]]:
    """The passes with an fx implementation, by name.

    >>> "two-pass-softmax" in available()
    True
    """
    _load_builtin_fx_passes()
    return dict(sorted(_FX_PASSES.items()))


def _load_builtin_fx_passes() -> None:
    # Modules with fx passes register them on import; they import this module, so
    # they are loaded here, on first use, not at the top.
    import rewriter.attention_fx  # noqa: F401
    import rewriter.fused_cross_entropy  # noqa: F401
    import rewriter.prune_fx  # noqa: F401
    import rewriter.prune_width_fx  # noqa: F401


def parse_fx_pipeline(passes: str | Sequence[str | FxPass]) -> list[FxPass]:
    """Parse pass specs (``"two-pass-softmax(log_softmax=false)"``) into fx passes.

    >>> [p.options.log_softmax for p in parse_fx_pipeline("two-pass-softmax(log_softmax=false)")]
    [False]
    """
    _load_builtin_fx_passes()
    items = [passes] if isinstance(passes, str) else list(passes)
    result: list[FxPass] = []
    for item in items:
        if isinstance(item, FxPass):
            result.append(item)
            continue
        for name, arguments in registry.split_pipeline(item):
            if name not in _FX_PASSES:
                known = ", ".join(available())
                where = "has no fx implementation" if name in registry.available() else "is unknown"
                raise InputError(f"pass '{name}' {where} (fx passes: {known})")
            cls = _FX_PASSES[name]
            result.append(cls(parse_options(cls.Options, arguments, pass_name=name)))
    if not result:
        raise InputError("no passes given")
    return result


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
# The front: trace, run the passes, verify, report
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class FxReport:
    """What :func:`rewrite` did; ``to_json`` has the ONNX report's ``passes`` and ``verification``."""

    traced_with: str  # "graph_module" (given), "symbolic_trace" or "torch.export"
    passes: list[PassRecord]
    verification: Verification | None
    notes: list[str]
    seconds: float

    @property
    def exact(self) -> bool:
        return all(record.exact for record in self.passes)

    @property
    def stats(self) -> dict[str, int]:
        """The statistics of all passes merged (counts of the same key are added)."""
        merged: dict[str, int] = {}
        for record in self.passes:
            for key, value in record.stats.items():
                merged[key] = merged.get(key, 0) + value
        return merged

    def to_json(self) -> dict[str, Any]:
        return {
            "front": "fx",
            "traced_with": self.traced_with,
            "exact": self.exact,
            "passes": [dataclasses.asdict(record) for record in self.passes],
            "verification": self.verification.to_json() if self.verification else None,
            "notes": list(self.notes),
            "seconds": self.seconds,
        }


def rewrite(
    model: torch.nn.Module,
    passes: str | Sequence[str | FxPass] = ("two-pass-softmax",),
    example_inputs: tuple[Any, ...] | torch.Tensor | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    check: bool = True,
    tolerance: verify.Tolerance | None = None,
    seed: int = 0,
) -> tuple[fx.GraphModule, FxReport]:
    """Trace ``model``, apply ``passes`` and verify the result on ``example_inputs``.

    A ``GraphModule`` is copied (its parameters are shared), any other module is traced
    with ``torch.fx.symbolic_trace``, or with ``torch.export`` when that fails (which
    needs ``example_inputs``). With ``check`` and inputs, both modules run under the same
    seed; an exact pipeline whose outputs differ beyond ``tolerance`` (default: by dtype,
    :data:`rewriter.verify.DEFAULT_TOLERANCE`) raises :class:`VerificationError`.

    >>> gm, report = rewrite(torch.nn.Softmax(-1), "two-pass-softmax", (torch.randn(2, 5),))
    >>> report.stats["softmax_replaced"], report.verification.passed
    (1, True)
    """
    start = time.perf_counter()
    fx_passes = parse_fx_pipeline(passes)
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    notes: list[str] = []
    gm, traced_with = _graph_module(model, args, example_kwargs, notes)
    if args is not None and not example_kwargs:
        _propagate_meta(gm, args)
    records = []
    for fx_pass in fx_passes:
        begin = time.perf_counter()
        result = fx_pass(gm)
        records.append(
            PassRecord(
                name=fx_pass.name,
                exact=fx_pass.exact,
                stats=dict(result.stats),
                notes=list(result.notes),
                seconds=time.perf_counter() - begin,
                modified=result.modified,
            )
        )
        logger.info("%s (fx): %s", fx_pass.name, result.stats)
    verification = None
    if check and args is not None:
        exact = all(fx_pass.exact for fx_pass in fx_passes)
        verification = _verify(model, gm, args, example_kwargs or {}, exact, tolerance, seed)
        if verification.enforced and not verification.passed:
            worst = max(verification.outputs, key=lambda o: o.max_rel_err)
            raise VerificationError(
                f"exact fx rewrite changed output '{worst.name}': max abs err {worst.max_abs_err:.3g}, "
                f"max rel err {worst.max_rel_err:.3g} exceed the tolerance {verification.tolerance}"
            )
    elif check:
        notes.append("not verified: no example_inputs given")
    report = FxReport(traced_with, records, verification, notes, time.perf_counter() - start)
    return gm, report


def _graph_module(
    model: torch.nn.Module,
    args: tuple[Any, ...] | None,
    kwargs: dict[str, Any] | None,
    notes: list[str],
) -> tuple[fx.GraphModule, str]:
    """A GraphModule to rewrite, never ``model`` itself, and how it was obtained."""
    if isinstance(model, fx.GraphModule):
        gm = fx.GraphModule(model, copy.deepcopy(model.graph))
        gm.meta = dict(model.meta)
        traced_with = "graph_module"
    else:
        try:
            gm, traced_with = fx.symbolic_trace(model), "symbolic_trace"
        except Exception as exc:  # tracing raises whatever the model's code raises on proxies
            reason = f"torch.fx.symbolic_trace failed ({type(exc).__name__}: {_first_line(exc)})"
            if args is None:
                raise InputError(
                    f"{reason}; pass example_inputs to trace with torch.export"
                ) from exc
            try:
                gm = torch.export.export(model, args, kwargs).module()
            except Exception as export_exc:
                raise InputError(
                    f"{reason}; torch.export failed too ({_first_line(export_exc)})"
                ) from export_exc
            notes.append(f"{reason}: traced with torch.export instead")
            traced_with = "torch.export"
    gm.training = model.training  # not recursive: submodules may be shared with model
    return gm, traced_with


def _propagate_meta(gm: fx.GraphModule, args: tuple[Any, ...]) -> None:
    """Record dtypes and shapes (fake tensors, nothing runs) where tracing left none."""
    if all("val" in node.meta for node in gm.graph.find_nodes(op="placeholder")):
        return
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_args = pytree.tree_map_only(torch.Tensor, mode.from_tensor, args)
        with mode:
            ShapeProp(gm).propagate(*fake_args)
    except Exception as exc:  # a model fake tensors cannot run: rewrite without metadata
        logger.info("shape propagation failed (%s); dtypes and ranks unknown", _first_line(exc))


def _verify(
    original: torch.nn.Module,
    rewritten: fx.GraphModule,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    exact: bool,
    tolerance: verify.Tolerance | None,
    seed: int,
) -> Verification:
    with torch.no_grad(), _buffers_restored(original, rewritten):
        reference = _run_seeded(original, args, kwargs, seed)
        candidate = _run_seeded(rewritten, args, kwargs, seed)
    ref_leaves, ref_spec = pytree.tree_flatten_with_path(reference)
    cand_leaves, cand_spec = pytree.tree_flatten_with_path(candidate)
    if len(ref_leaves) != len(cand_leaves):
        raise VerificationError(
            f"the rewritten module returns {cand_spec}, the original {ref_spec}"
        )
    outputs, used = [], None
    for (path, ref), (_, cand) in zip(ref_leaves, cand_leaves, strict=True):
        if not isinstance(ref, torch.Tensor):
            continue
        name = pytree.keystr(path) or "output"
        dtype = str(ref.dtype).removeprefix("torch.")
        comparison = verify.compare(name, _numpy(ref), _numpy(cand))
        comparison.dtype = dtype
        if exact and ref.is_floating_point():
            chosen = tolerance or verify.DEFAULT_TOLERANCE.get(
                dtype, verify.DEFAULT_TOLERANCE["float32"]
            )
            verify.check_tolerance(comparison, _numpy(ref), chosen)
            used = {"rtol": chosen.rtol, "atol": chosen.atol}
        elif exact:
            comparison.passed = comparison.max_abs_err == 0
        outputs.append(comparison)
    inputs = {
        prefix + pytree.keystr(path): list(value.shape)
        for prefix, tree in (("args", args), ("kwargs", kwargs))
        for path, value in pytree.tree_flatten_with_path(tree)[0]
        if isinstance(value, torch.Tensor)
    }
    return Verification(outputs=outputs, inputs=inputs, tolerance=used, enforced=exact)


def _run_seeded(
    module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], seed: int
) -> Any:
    # The same seed for both runs: dropout in training mode draws the same masks.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module(*args, **kwargs)


@contextlib.contextmanager
def _buffers_restored(*modules: torch.nn.Module) -> Iterator[None]:
    """Undo buffer updates (BatchNorm statistics in training mode) of the verification runs."""
    buffers = {id(b): b for module in modules for b in module.buffers()}
    saved = {key: b.detach().clone() for key, b in buffers.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for key, buffer in buffers.items():
                buffer.copy_(saved[key])


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        tensor = tensor.float()
    return tensor.numpy()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# --------------------------------------------------------------------------------------
# ONNX export: our ops -> ai.rewriter::TwoPassSoftmax with the ONNX pass's bodies
# --------------------------------------------------------------------------------------

# The TorchScript exporter's default opset; CastLike (15) lets the bodies keep the dtype.
TORCHSCRIPT_OPSET = 17


def export_onnx(
    gm: torch.nn.Module,
    args: tuple[Any, ...],
    path: str | Path,
    *,
    dynamo: bool = True,
    kwargs: dict[str, Any] | None = None,
    opset_version: int | None = None,
) -> Path:
    """Export a rewritten module to ONNX at ``path`` (atomically), with our function bodies.

    ``torch.ops.rewriter.two_pass_(log_)softmax`` become ``ai.rewriter::TwoPassSoftmax``
    / ``TwoPassLogSoftmax`` along the last axis (between Transposes for another dim),
    whose bodies come from :func:`rewriter.passes.two_pass_softmax.function_proto`; the
    other custom ops (attention) come from the modules that :func:`register_onnx_export`.
    ``dynamo=False`` uses the (deprecated) TorchScript exporter.

    >>> export_onnx(gm, (torch.randn(2, 8),), "model.onnx")  # doctest: +SKIP
    """
    path = Path(path)
    if dynamo:
        program = torch.onnx.export(
            gm,
            args,
            kwargs=kwargs,
            dynamo=True,
            opset_version=opset_version,
            custom_translation_table=_export_translations(),
            verbose=False,
        )
        assert program is not None
        model = program.model
    else:
        model = _torchscript_export(gm, args, kwargs, opset_version or TORCHSCRIPT_OPSET)
    opset = model.opset_imports.get("", 1)
    used = {node.op_type for node in model.graph.all_nodes() if node.domain == DOMAIN}
    for op_type in sorted(used):
        add_function(model, _ONNX_BODIES[op_type](opset))
    io.save(model, path)
    logger.info("exported %s (%s)", path, ", ".join(sorted(used)) or "no ai.rewriter ops")
    return path


def _last_axis_perm(dim: int, rank: int) -> list[int] | None:
    """The permutation that swaps ``dim`` with the last axis, or None if it is last."""
    axis = dim % rank
    if axis == rank - 1:
        return None
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    return perm


# How our custom ops export to ONNX: each module with custom ops registers the dynamo
# translations of its torch ops and the builders of its ONNX ops' function bodies.
_ONNX_TRANSLATIONS: list[Callable[[], dict[Any, Callable[..., Any]]]] = []
_ONNX_BODIES: dict[str, Callable[[int], Any]] = {}


def register_onnx_export(
    translations: Callable[[], dict[Any, Callable[..., Any]]], bodies: dict[str, Callable[[int], Any]]
) -> None:
    """Make :func:`export_onnx` translate a module's custom ops and attach their bodies.

    ``translations()`` gives ``{torch op: onnxscript translation}``; ``bodies`` maps each
    ``ai.rewriter`` op type to ``opset -> onnx.FunctionProto``.
    """
    _ONNX_TRANSLATIONS.append(translations)
    _ONNX_BODIES.update(bodies)


def _export_translations() -> dict[Any, Callable[..., Any]]:
    _load_builtin_fx_passes()
    table: dict[Any, Callable[..., Any]] = {}
    for translations in _ONNX_TRANSLATIONS:
        table.update(translations())
    return table


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


def _torchscript_export(
    gm: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None, opset: int
) -> Any:
    """Export with the TorchScript exporter and load the result into onnx-ir."""
    if opset < onnx_two_pass.CASTLIKE_OPSET:
        raise InputError(
            f"export_onnx(dynamo=False) needs opset >= {onnx_two_pass.CASTLIKE_OPSET}, got {opset}"
        )
    import onnx
    import onnx_ir as ir
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

    for torch_op, op_type in _OPS.items():
        qualified = torch_op.name().removesuffix(".default")
        torch.onnx.register_custom_op_symbolic(qualified, symbolic_for(op_type), 9)
    with tempfile.TemporaryDirectory(prefix="rewriter-fx-") as folder:
        staged = Path(folder) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                gm,
                args,
                str(staged),
                kwargs=kwargs,
                dynamo=False,
                opset_version=opset,
                custom_opsets={DOMAIN: DOMAIN_VERSION},
            )
        # Read everything (external data included) before the folder goes away.
        return ir.serde.deserialize_model(onnx.load(str(staged)))


register_onnx_export(
    _dynamo_translations,
    {op_type: functools.partial(onnx_two_pass.function_proto, op_type) for op_type in onnx_two_pass.TARGETS.values()},
)
