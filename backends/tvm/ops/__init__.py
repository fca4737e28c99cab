"""One lowering per ``ai.rewriter`` op, found by the op's name from both fronts.

Each module of this package lowers one op (or one family of ops) and registers it with
:func:`register`, which records:

* the op type in the ``ai.rewriter`` domain (``"TwoPassSoftmax"``), which
  :mod:`rewriter.backends.tvm.import_onnx` looks up, and the torch op of our fx front
  where there is one (``"rewriter::two_pass_softmax"``), which
  :mod:`rewriter.backends.tvm.import_torch` looks up;
* ``emit``, the decorated function: one :class:`OpCall` in, the op written into the Relax
  module out (``call_tir`` to our kernel);
* what :func:`rewriter.backends.tvm.import_onnx.prepare` needs to know before it drops
  the op's ONNX function body:

  - ``refusal``: for a kernel that needs static shapes, why it cannot take a node (""
    when it can), asked once the shapes are inferred; a node it refuses is compiled from
    its function body. None: the kernel takes every node.
  - ``cpu_only``: GPU targets compile the op from its function body.
  - ``option``: the keyword of ``prepare`` that turns the kernel off (``"fuse_loss"``).
  - ``before_import``: a last ONNX-level rewrite of each node that gets the kernel.

The importers hold no per-op table: adding an op lowering is adding a module here (the
package's modules are imported on first use, see :func:`lowerings`), plus its kernel in
:mod:`rewriter.backends.tvm.kernels`.

>>> @register("TwoPassSoftmax", torch_op="rewriter::two_pass_softmax")  # doctest: +SKIP
... def emit_softmax(call: OpCall) -> relax.Expr:
...     return emit_two_pass_softmax(call.bb, call.inputs[0], log=False, target=call.target)
>>> lowering("TwoPassSoftmax").renamed  # doctest: +SKIP
'ai.rewriter::TwoPassSoftmax'
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from rewriter.backends.tvm.relax_passes.op_patterns import (
    OPAQUE,  # FuseOps fuses a kernel with nothing
)
from rewriter.pass_base import DOMAIN

if TYPE_CHECKING:
    import tvm
    from tvm import relax


# compile(kernel=...): builds the two-pass softmax PrimFunc (see ops.two_pass_softmax).
KernelFactory = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class OpCall:
    """One call of our op, as an importer hands it to the op's lowering.

    ``inputs``: the op's tensor inputs in order, as Relax expressions (None for an omitted
    optional input); ``attrs``: its ONNX attributes, or the torch op's other arguments by
    name; ``kernel``: the two-pass softmax kernel factory of ``compile(kernel=...)``.
    """

    bb: relax.BlockBuilder
    inputs: list[relax.Expr | None]
    attrs: Mapping[str, Any]
    target: tvm.target.Target
    kernel: KernelFactory | None = None

    def input(self, index: int) -> relax.Expr | None:
        """Input ``index``, or None when the call has fewer inputs."""
        return self.inputs[index] if index < len(self.inputs) else None


Emit = Callable[[OpCall], Any]


@dataclasses.dataclass(frozen=True)
class Lowering:
    """How one ``ai.rewriter`` op becomes Relax (see the module docstring)."""

    op_type: str
    emit: Emit
    torch_op: str | None = None
    refusal: Callable[[ir.Node], str] | None = None
    cpu_only: bool = False
    option: str | None = None
    before_import: Callable[[ir.Node], None] | None = None

    @property
    def renamed(self) -> str:
        """The op's name in the default domain for TVM's importer (see :func:`renamed`)."""
        return renamed(self.op_type)

    def wanted(self, options: Mapping[str, bool], *, gpu: bool) -> bool:
        """Whether ``prepare`` with ``options`` (``{"fuse_loss": False}``) for a GPU target
        (``gpu``) or not gives this op our kernel rather than its function body."""
        if self.cpu_only and gpu:
            return False
        return self.option is None or options.get(self.option, True)


_LOWERINGS: dict[str, Lowering] = {}
_LOADED = False


def register(
    op_type: str,
    *,
    torch_op: str | None = None,
    refusal: Callable[[ir.Node], str] | None = None,
    cpu_only: bool = False,
    option: str | None = None,
    before_import: Callable[[ir.Node], None] | None = None,
) -> Callable[[Emit], Emit]:
    """Register the decorated function as the lowering of ``ai.rewriter::<op_type>`` (and
    of ``torch_op``); see the module docstring for the other arguments."""

    def decorate(emit: Emit) -> Emit:
        if op_type in _LOWERINGS:
            raise ValueError(f"{op_type} has two lowerings")
        _LOWERINGS[op_type] = Lowering(
            op_type, emit, torch_op, refusal, cpu_only, option, before_import
        )
        return emit

    return decorate


def renamed(op_type: str) -> str:
    """``ai.rewriter::<op_type>``: what ``prepare`` renames our op to, in the default domain,
    so that TVM's importer (which sees only op types) cannot take it for a standard op."""
    return f"{DOMAIN}::{op_type}"


def lowerings() -> dict[str, Lowering]:
    """Every registered lowering, by op type."""
    _load()
    return dict(_LOWERINGS)


def lowering(op_type: str) -> Lowering | None:
    """The lowering of ``ai.rewriter::<op_type>``, or None."""
    _load()
    return _LOWERINGS.get(op_type)


def _load() -> None:
    """Import the modules of this package (once): each registers its lowerings."""
    global _LOADED
    if not _LOADED:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _LOADED = True


def torch_lowerings() -> dict[str, Lowering]:
    """The lowerings of our torch ops, by qualified op name (``rewriter::two_pass_softmax``)."""
    return {low.torch_op: low for low in lowerings().values() if low.torch_op is not None}


def static_shape(expr: relax.Expr) -> list[int] | None:
    """The static shape of a Relax tensor expression, or None."""
    from tvm import tirx

    shape = getattr(expr.ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    values = list(shape.values)
    if not all(isinstance(v, tirx.IntImm) for v in values):
        return None
    return [int(v.value) for v in values]


def kernel_dim(value: Any, name: str) -> Any:
    """A size for a kernel's PrimFunc: an int where ``value`` (a TIR expression) is
    static, else a fresh ``tirx.Var`` called ``name``, which the kernel binds from its
    buffers' shapes at run time."""
    from tvm import sym, tirx

    simplified = sym.Analyzer().simplify(value)
    if isinstance(simplified, tirx.IntImm):
        return int(simplified.value)
    return tirx.Var(name, "int64")


def attribute_text(value: Any) -> str:
    """An ONNX string attribute as text (TVM's importer passes them as bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def constant_value(expr: Any) -> np.ndarray | None:
    """The value of a constant tensor of the module (an initializer), else None."""
    from tvm import ir

    if not isinstance(expr, ir.expr.Constant):
        return None
    value = expr.value
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def scheduled_kernel(func: Any) -> Any:
    """Our hand-scheduled kernel ``func`` as a ``call_tir`` callee: private (no global
    symbol: a kernel may call itself "main"), opaque to fusion, marked scheduled for the
    target (dlight and our CPU rules skip it), and ``tirx.noalias`` (its outputs are
    fresh buffers). One function of a module without ``tirx.noalias`` (the kernels said
    ``tir.noalias``, TVM's old name) made TVM's LLVM codegen drop the ``_compute_``
    functions with ``noalias`` pointers for every function of the library: the register
    tiles of the convolutions and matmuls, ``TVMBackendAllocWorkspace`` buffers, were
    then stored after every FMA (wav2vec2's convolutions at 2.3x their time)."""
    func = _with_root_block(func).without_attr("global_symbol")
    return func.with_attrs({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


def _with_root_block(func: Any) -> Any:
    """Wrap a hand-written (block-free) PrimFunc body in a root block.

    Relax's ``RewriteDataflowReshape`` inspects every ``call_tir`` callee and fails on a
    PrimFunc whose body is not a block realize.
    """
    from tvm import s_tir

    if isinstance(func.body, s_tir.SBlockRealize):
        return func
    root = s_tir.SBlock(iter_vars=[], reads=[], writes=[], name_hint="root", body=func.body)
    return func.with_body(s_tir.SBlockRealize(iter_values=[], predicate=True, block=root))
