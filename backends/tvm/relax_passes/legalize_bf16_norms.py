"""``layer_norm(x_bf16, g, b) -> astype(layer_norm(astype(x, f32), ...), bf16)`` in Relax.

TVM's legalization of ``layer_norm`` and ``rms_norm`` accepts float32 and float16 only
("layer_norm: only support float32 and float16 for now"), so a bf16 BERT export did not
compile. Their bf16 calls are computed in float32 here, inputs widened (exact) and the
result rounded to bf16 once: what TVM's own bf16 legalization does for the ops it
handles (its TIR computes bf16 arithmetic in float32).

``erf``, ``tanh`` (GELU's) and ``softmax`` are legalized by TVM in bf16, but slowly: erf
of 256 x 1536 bf16 values took 15.5 ms on one Sapphire Rapids core, 0.8 ms computed in
float32 here (TVM's fast float32 polynomial after ``FastMathTransform``); the GELUs were
75% of a bf16 MiniLM's time at batch 8 x 32, the softmaxes 43% at 1 x 128 (24 of 57 ms,
then 2.5). They are upcast the same way, so our float32 schedules take them.

Exact up to that final rounding. Runs before legalization, on every target
(:func:`rewriter.backends.tvm.relax_pipeline`).

>>> mod = upcast_pass()(mod)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.relax_passes import visit_functions

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger(__name__)

# Relax ops whose legalization has no bfloat16, by statistic.
UPCAST_OPS = {
    "bf16_norms_upcast": ("relax.nn.layer_norm", "relax.nn.rms_norm"),
    # Legalized in bf16, but ~10-20x slower than in float32 (see the module docstring).
    "bf16_activations_upcast": ("relax.erf", "relax.tanh", "relax.nn.softmax"),
}


def upcast(mod: tvm.IRModule) -> tuple[tvm.IRModule, dict[str, int]]:
    """``mod`` with the bf16 calls of :data:`UPCAST_OPS` computed in float32, and how many."""
    import tvm
    from tvm import relax

    ops = {tvm.ir.Op.get(name): stat for stat, names in UPCAST_OPS.items() for name in names}
    stats = dict.fromkeys(UPCAST_OPS, 0)

    @relax.expr_functor.mutator
    class Upcast(relax.PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            stat = next((stat for op, stat in ops.items() if call.op.same_as(op)), None)
            if stat is None or call.ty.dtype != "bfloat16":
                return call
            args = [
                relax.op.astype(arg, "float32")
                if getattr(arg.ty, "dtype", None) == "bfloat16"
                else arg
                for arg in call.args
            ]
            stats[stat] += 1
            wide = self.builder_.emit(relax.Call(call.op, args, call.attrs))
            return relax.op.astype(wide, "bfloat16")

    mutator = Upcast(mod)
    visit_functions(mutator, mod)
    return (mutator.builder_.get() if any(stats.values()) else mod), stats


def upcast_pass() -> tvm.transform.Pass:
    """:func:`upcast` as a module pass; its count goes to the log."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="UpcastBf16Norms")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod, stats = upcast(mod)
        if stats["bf16_norms_upcast"]:
            logger.info("%d bf16 normalizations computed in float32", stats["bf16_norms_upcast"])
        if stats["bf16_activations_upcast"]:
            logger.info(
                "%d bf16 erf/tanh/softmax computed in float32", stats["bf16_activations_upcast"]
            )
        return mod

    return pass_
