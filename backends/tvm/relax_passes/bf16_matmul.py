"""``matmul(A_bf16, W_bf16) (+ bias) -> call_tir(bf16_matmul, [A, pack(W)(, bias)])`` in Relax.

On targets with AVX512-BF16, a Relax ``matmul`` of a static bfloat16 activation by a
constant 2-D bfloat16 weight (or ``permute_dims`` of one: Gemm with ``transB``, a torch
``Linear``) runs our ``vdpbf16ps`` kernel (:mod:`rewriter.backends.tvm.kernels.bf16_matmul`),
or, where the target has AMX-BF16, our AMX kernel (``tdpbf16ps`` on 16 x 32 tiles:
:mod:`rewriter.backends.tvm.kernels.amx_matmul`): the weight is packed as ``[ceil(N/16),
K/2, 16, 2]`` here, at compile time (zero past column N: a head of 30522 or 1000 classes
computes whole groups of 16 channels and stores its N; for AMX, whole pairs of groups
and ``K`` zero-padded to a multiple of 32), and a following ``add`` of a constant ``[N]`` bias (the matmul's only
use) is folded into the kernel's epilogue. The output keeps the matmul's dtype: bfloat16
(rounded to nearest even) or float32 (``out_dtype``).

Without it, TVM legalizes the bf16 matmul to a loop that converts each bf16 operand to
float32 and multiplies in float32 (our register-tiled schedule), so the rewrite changes
speed, not the arithmetic: both accumulate exact products in float32 and round the
result once. One difference: with the bias folded in, ``acc + bias`` is rounded once,
where the graph rounds the matmul's result to bf16 before adding (closer to the exact
value; at most one bf16 unit in the last place apart).

Runs before legalization (:func:`rewriter.backends.tvm.relax_pipeline` puts it first on
CPU targets that :func:`supported` accepts); other targets keep TVM's path. Matmuls it
cannot take (``K`` odd without AMX, symbolic shapes, a computed weight) keep TVM's path,
and :func:`rewrite` says why in its statistics (logged), with the kernel it used
(``kernel``: ``amx`` or ``vdpbf16ps``).

>>> mod, stats = rewrite(mod, target)  # doctest: +SKIP
>>> stats["bf16_matmuls"], stats["bias_fused"], stats["kernel"]  # doctest: +SKIP
(12, 8, 'amx')
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from rewriter.backends.tvm.kernels import amx_matmul
from rewriter.backends.tvm.kernels import bf16_matmul as vnni_kernel
from rewriter.backends.tvm.kernels.bf16_matmul import GROUP, bf16_matmul
from rewriter.backends.tvm.relax_passes import pack_weights

if TYPE_CHECKING:
    import tvm
    from tvm import relax

logger = logging.getLogger(__name__)

# Name prefix of the kernels' GlobalVars in the Relax module (tests look for it).
KERNEL_NAME = "rewriter_bf16_matmul"
LANES = 16  # output channels per vdpbf16ps (float32 lanes of a zmm register)
BF16 = "bfloat16"


@dataclasses.dataclass
class Site:
    """A matmul to rewrite: its activation, its weight [K, N] and what it writes."""

    x: relax.Expr
    shape: list[int]
    weight: np.ndarray  # bfloat16 [K, N]
    out_dtype: str


def pack_weight(weight: np.ndarray) -> np.ndarray:
    """Pack ``weight`` [K, N] as ``[ceil(N/16), K/2, 16, 2]``: ``packed[n // 16, k // 2, n % 16,
    k % 2] = weight[k, n]``, zero past column N.

    >>> int(pack_weight(np.arange(4 * 32).reshape(4, 32))[1, 1, 2, 1])  # weight[3, 18]
    114
    """
    return pack_weights.pack_groups(weight, GROUP, LANES)


def supported(target: tvm.target.Target) -> bool:
    """Whether ``target`` has one of the bf16 kernels (AMX-BF16 or AVX512-BF16).

    >>> supported(resolve("avx512")), supported(resolve("avx2"))  # doctest: +SKIP
    (True, False)
    """
    return amx_matmul.supported(target, "bf16") or vnni_kernel.supported(target)


def refusal(k: int, n: int, *, amx: bool = False) -> str:
    """Why the kernel cannot take a ``K x N`` weight, or "" when it can (any ``N``: the
    weight is zero-padded to whole groups of 16 channels; with ``amx``, any ``K`` too).

    >>> refusal(64, 30522), refusal(63, 48), refusal(63, 48, amx=True)
    ('', 'K=63, N=48: the kernel needs K % 2 == 0', '')
    """
    if k % GROUP and not amx:
        return f"K={k}, N={n}: the kernel needs K % {GROUP} == 0"
    return ""


def rewrite(mod: tvm.IRModule, target: tvm.target.Target) -> tuple[tvm.IRModule, dict[str, Any]]:
    """Rewrite the bf16 matmuls of ``mod``'s Relax functions for ``target`` (see the module
    docstring); returns the new module and the statistics (``bf16_matmuls``,
    ``bias_fused`` and, under ``skipped``, why the other bf16 matmuls were left)."""
    import tvm
    from tvm import relax

    from rewriter.backends.tvm.ops import static_shape

    matmul_op, add_op = tvm.ir.Op.get("relax.matmul"), tvm.ir.Op.get("relax.add")
    permute_op = tvm.ir.Op.get("relax.permute_dims")
    amx = amx_matmul.supported(target, "bf16")
    stats: dict[str, Any] = {
        "bf16_matmuls": 0,
        "bias_fused": 0,
        "kernel": "amx" if amx else "vdpbf16ps",
        "skipped": [],
    }
    gvars: dict[tuple[int, int, int, bool, str], Any] = {}

    def constant(expr: Any) -> np.ndarray | None:
        if isinstance(expr, tvm.ir.expr.GenericConst) and isinstance(
            expr.value, tvm.runtime.Tensor
        ):
            return expr.value.numpy()
        return None

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):  # type: ignore[misc]
        def __init__(self, module: tvm.IRModule) -> None:
            super().__init__(module)
            self.values: dict[Any, Any] = {}
            self.uses: dict[Any, int] = {}
            self.absorbed: list[Any] = []  # matmuls whose add takes them with the bias

        def prepare(self, func: relax.Function) -> None:
            """Bound values and use counts of ``func``'s dataflow variables, and the
            matmul + bias pairs to fold."""
            self.values = dict(relax.analysis.get_var2val(func))
            self.uses = {}
            for block in func.body.blocks:
                if isinstance(block, relax.DataflowBlock):
                    for var, users in relax.analysis.udchain(block).items():
                        self.uses[var] = len(users)
            self.absorbed = []
            for value in self.values.values():
                folded = self.bias_of(value) if isinstance(value, relax.Call) else None
                if folded is not None:
                    self.absorbed.append(folded[0])

        def site(self, call: relax.Call, *, report: bool) -> Site | None:
            """The rewrite of matmul ``call`` (None: not ours, or refused and reported)."""
            if not call.op.same_as(matmul_op) or getattr(call.args[0].ty, "dtype", None) != BF16:
                return None
            x, w = call.args
            transposed = False
            bound = self.values.get(w)
            if isinstance(bound, relax.Call) and bound.op.same_as(permute_op):
                axes = bound.attrs.axes
                transposed = axes is None or [int(a) for a in axes] == [1, 0]
                w = bound.args[0] if transposed else w
            weight = constant(w)
            shape = static_shape(x)
            reason = ""
            if weight is None or weight.ndim != 2 or str(weight.dtype) != BF16:
                reason = "the weight is not a constant 2-D bfloat16 tensor"
            elif shape is None or len(shape) < 2:
                reason = "the activation's shape is not static (fix the input dims)"
            elif call.ty.dtype not in (BF16, "float32"):
                reason = f"output dtype {call.ty.dtype}"
            else:
                weight = weight.T if transposed else weight
                reason = refusal(*weight.shape, amx=amx)
            if reason:
                if report:
                    stats["skipped"].append(reason)
                return None
            assert weight is not None and shape is not None
            return Site(x, shape, weight, str(call.ty.dtype))

        def bias_of(self, call: relax.Call) -> tuple[relax.Call, Site, np.ndarray] | None:
            """``(matmul, its site, bias [N] float32)`` when ``call`` adds a constant bias to
            a matmul we rewrite that nothing else reads."""
            if not call.op.same_as(add_op):
                return None
            for index in (0, 1):
                var, other = call.args[index], call.args[1 - index]
                matmul = self.values.get(var)
                if not isinstance(matmul, relax.Call) or self.uses.get(var) != 1:
                    continue
                site = self.site(matmul, report=False)
                bias = constant(other)
                if site is None or bias is None:
                    continue
                n = site.weight.shape[1]
                if (
                    bias.size == n
                    and bias.shape[-1:] == (n,)
                    and str(call.ty.dtype) == site.out_dtype
                ):
                    return matmul, site, bias.astype(np.float32).reshape(n)
            return None

        def visit_call_(self, call: relax.Call) -> relax.Expr:
            folded = self.bias_of(call)
            if folded is not None:
                _, site, bias = folded
                stats["bias_fused"] += 1
                return self.emit(site, bias)
            if any(call.same_as(matmul) for matmul in self.absorbed):
                return super().visit_call_(call)  # dead once its add is rewritten
            alone = self.site(call, report=True)
            if alone is None:
                return super().visit_call_(call)
            return self.emit(alone, None)

        def emit(self, site: Site, bias: np.ndarray | None) -> relax.Expr:
            stats["bf16_matmuls"] += 1
            bb = self.builder_
            k, n = site.weight.shape
            m = int(np.prod(site.shape[:-1]))
            key = (m, k, n, bias is not None, site.out_dtype)
            if key not in gvars:
                gvars[key] = bb.add_func(kernel_func(*key, target=target), KERNEL_NAME)
            x = self.visit_expr(site.x)
            flat = x if len(site.shape) == 2 else bb.emit(relax.op.reshape(x, [m, k]))
            packed = (
                amx_matmul.pack_weight("bf16", site.weight) if amx else pack_weight(site.weight)
            )
            args = [flat, relax.const(packed)]
            if bias is not None:
                args.append(relax.const(bias))
            y = relax.call_tir(gvars[key], args, relax.TensorType([m, n], site.out_dtype))
            if len(site.shape) == 2:
                return y
            return relax.op.reshape(bb.emit(y), [*site.shape[:-1], n])

    rewriter = Rewriter(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            rewriter.prepare(func)
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    if not stats["bf16_matmuls"]:
        return mod, stats
    # The matmuls folded into their bias add are no longer read.
    return relax.transform.DeadCodeElimination()(rewriter.builder_.get()), stats


def kernel_func(
    m: int, k: int, n: int, bias: bool, out_dtype: str, *, target: tvm.target.Target
) -> tvm.tirx.PrimFunc:
    """The kernel (AMX where ``target`` has AMX-BF16) as a private, opaque, already
    scheduled PrimFunc for ``call_tir``."""
    from rewriter.backends.tvm.ops import scheduled_kernel

    if amx_matmul.supported(target, "bf16"):
        func = amx_matmul.amx_matmul("bf16", m, k, n, bias=bias, out_dtype=out_dtype, target=target)
    else:
        func = bf16_matmul(m, k, n, bias=bias, out_dtype=out_dtype, target=target)
    return scheduled_kernel(func)


def rewrite_pass(target: tvm.target.Target) -> tvm.transform.Pass:
    """:func:`rewrite` as a module pass; its statistics go to the log."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="RewriteBf16Matmul")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod, stats = rewrite(mod, target)
        if stats["bf16_matmuls"]:
            logger.info(
                "%d bf16 matmuls run the %s kernel (%d with their bias folded in)",
                stats["bf16_matmuls"],
                stats["kernel"],
                stats["bias_fused"],
            )
        for reason in stats["skipped"]:
            logger.info("bf16 matmul left to TVM: %s", reason)
        return mod

    return pass_
