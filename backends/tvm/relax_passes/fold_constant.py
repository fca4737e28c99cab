"""Relax's ``FoldConstant``, with our kernels built for the target they were written for.

``FoldConstant`` evaluates a ``call_tir`` whose arguments are all constants at compile
time: it builds the callee (the global ``tirx.build``) for plain ``llvm``, no CPU
features, and runs it. Our hand-written kernels are written for the target's vectors
(16-lane float32 arithmetic, AVX-512 reductions and shuffles); JIT-compiled for plain
``llvm``, LLVM aborted the whole process ("Do not know how to split the result of this
operator!"). A real case: DETR compiled at a fixed batch, whose first decoder layer's
self-attention reads only weights (the object queries, with a zero target), so the
fused attention kernel's arguments were all constants.

Here, while ``FoldConstant`` runs, ``tirx.build`` builds our kernels (PrimFuncs marked
``tirx.is_scheduled``) for the compile's target: the call becomes a constant computed as
the library would compute it, and the library does not run it at all. Where this CPU
cannot run code for the target (a library compiled for another CPU), the build of a
kernel raises instead, which ``FoldConstant`` takes as "cannot fold": the call stays.
Other functions are built as TVM builds them.

>>> mod = fold_constant(target)(mod)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm import cpu_features

if TYPE_CHECKING:
    import tvm


def fold_constant(target: tvm.target.Target) -> tvm.transform.Pass:
    """The Relax pass (see the module docstring)."""
    import tvm
    from tvm import relax

    runnable = target.kind.name == "llvm" and not cpu_features.missing_for(target)

    @tvm.transform.module_pass(opt_level=0, name="FoldConstantForTarget")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with _kernels_built_for(target, runnable):
            return relax.transform.FoldConstant()(mod)

    return pass_


@contextlib.contextmanager
def _kernels_built_for(target: tvm.target.Target, runnable: bool) -> Iterator[None]:
    """``tirx.build`` building our kernels for ``target`` (refusing them where not
    ``runnable``), inside the block."""
    import tvm
    from tvm import tirx

    original = tvm.get_global_func(_BUILD)

    def build(mod: Any, build_target: Any = None, pipeline: Any = "default") -> Any:
        ours = isinstance(mod, tirx.PrimFunc) and mod.attrs is not None and bool(mod.attrs.get("tirx.is_scheduled", False))
        if not ours:
            return original(mod, build_target, pipeline)
        if not runnable:
            raise tvm.error.TVMError(f"a kernel for {target.kind.name} with features this CPU lacks: not folded")
        return original(mod, target, pipeline)

    tvm.register_global_func(_BUILD, build, override=True)
    try:
        yield
    finally:
        tvm.register_global_func(_BUILD, original, override=True)


_BUILD = "tirx.build"
