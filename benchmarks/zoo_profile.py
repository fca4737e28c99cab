"""Where a compiled zoo model spends its time: PrimFunc by PrimFunc, beside ORT's op types.

Three pieces, used by ``benchmarks/zoo.py``:

* :func:`schedule_capture` and :func:`schedule_table`: which rule scheduled each
  PrimFunc. A ``PassInstrument`` (passed to ``tvm.transform.PassContext`` around
  ``backend.compile``) snapshots the module's PrimFuncs after our CPU scheduling pass
  (``RewriterCpuSchedule``, :func:`rewriter.backends.tvm.relax_passes.cpu_schedule.cpu_schedule`).
  The snapshot must be taken inside the hook: later passes lower the module in place.
  Which rule took each function is the compile's own record (``Compiled.schedules``):

  - ``kernel``: already marked ``tirx.is_scheduled`` before the pass (our hand-written
    kernels: softmax, attention, losses, int8/bf16 matmuls);
  - the name of the first rule that scheduled it: ours (:data:`OUR_RULES`: ``conv``,
    ``matmul``, ``channels-last window``, ``row reduction``, ``transpose``,
    ``elementwise``) or ``Reduction`` (dlight's generic CPU rule, which parallelizes the
    outer loops and leaves the reduction itself scalar);
  - ``none``: no rule applied; the function is lowered as TVM legalized it, scalar and
    single-threaded.

  The attribute alone cannot tell these apart (every rule sets ``tirx.is_scheduled``),
  and a scheduled function can still be scalar where it matters. So each function is
  also read with ``s_tir.Schedule``: ``vector`` is whether its heaviest blocks (the
  reduction blocks if it has any, else all blocks) sit under a vectorized loop,
  ``parallel`` whether any loop is parallel, ``symbolic`` whether a buffer has a
  symbolic dimension; ``buffers`` gives the parameters' shapes (a conv's input, weight
  and output), which tell a 7x7 depthwise conv from a 16x16 patch embedding.

* :func:`profile_kernels` (from ``benchmarks/e2e.py``): seconds per VM call symbol, timed
  by the Relax VM's instrument hook (``VirtualMachine.set_instrument``). TVM 0.27's VM
  has no ``profile()``: its profiler was removed, so ``relax.VirtualMachine(ex, dev,
  profile=True)`` does not exist there. The hook adds a Python call per VM call
  (microseconds); the totals are indicative. ``vm.builtin.*`` symbols are the VM's own
  work (allocations, reshapes, shape checks).
* :func:`profile_ort` (also from ``e2e.py``): ONNX Runtime's profiler
  (``SessionOptions.enable_profiling``), kernel time per op type.

:func:`family` maps both sides to op families (``conv``, ``matmul``, ``norm``, ...),
so the two can be compared family by family.

>>> family("fused_conv2d1_add1_relu1"), family("FusedConv"), family("max_pool2d")
('conv', 'conv', 'pool')
>>> family("winograd_input1"), family("fused_winograd_output_add1_relu1")
('conv', 'conv')
>>> family("fused_strided_slice_maximum"), family("ReduceMean"), family("vm.builtin.reshape")
('layout', 'reduce', 'vm')
"""

from __future__ import annotations

import re
from typing import Any

from benchmarks.e2e import profile_kernels, profile_ort

__all__ = ["OUR_RULES", "family", "profile_kernels", "profile_ort", "schedule_capture"]

SCHEDULE_PASS = "RewriterCpuSchedule"
# The names our CPU rules record (``what``), in the order the pass tries them.
OUR_RULES = ("conv", "matmul", "channels-last window", "row reduction", "transpose", "elementwise")

# Op families. ORT op types by name (its fused ops included); anything else is
# elementwise.
ORT_FAMILIES = {
    **dict.fromkeys(("Conv", "FusedConv", "NhwcConv", "ConvTranspose"), "conv"),
    **dict.fromkeys(("MatMul", "Gemm", "FusedMatMul", "FusedGemm", "Einsum"), "matmul"),
    **dict.fromkeys(("Attention", "MultiHeadAttention", "GroupQueryAttention"), "attention"),
    **dict.fromkeys(("Softmax", "LogSoftmax"), "softmax"),
    **dict.fromkeys(("LSTM", "GRU", "RNN"), "recurrent"),
    **dict.fromkeys(
        (
            "LayerNormalization",
            "SkipLayerNormalization",
            "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization",
            "BatchNormalization",
            "GroupNorm",
            "GroupNormalization",
            "InstanceNormalization",
        ),
        "norm",
    ),
    **dict.fromkeys(("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"), "pool"),
    **dict.fromkeys(("Resize", "Upsample"), "resize"),
    **dict.fromkeys(("Gather", "GatherElements", "GatherND"), "gather"),
    **dict.fromkeys(
        (
            "Reshape",
            "Transpose",
            "Concat",
            "Split",
            "Slice",
            "Squeeze",
            "Unsqueeze",
            "Expand",
            "Flatten",
            "Pad",
            "Tile",
            "Identity",
            "Shape",
            "ReorderInput",
            "ReorderOutput",
        ),
        "layout",
    ),
}
# TVM PrimFuncs are named by the ops they hold (fused_conv2d1_add1_relu1): the first
# family, in this order, that one of its ops (digits dropped) belongs to.
TVM_FAMILIES = (
    ("attention", ("softmax_attention", "sigmoid_attention")),  # our fused kernels
    ("softmax", ("softmax", "log_softmax")),
    # Winograd's transforms (relax_passes/winograd.py) count as convolution; its 16 matrix
    # products are a plain ``matmul`` PrimFunc, counted as matmul.
    (
        "conv",
        (
            "conv1d",
            "conv2d",
            "conv3d",
            "conv1d_transpose",
            "conv2d_transpose",
            "winograd_input",
            "winograd_output",
        ),
    ),
    ("matmul", ("matmul", "dense", "batch_matmul", "einsum")),
    ("recurrent", ("lstm", "gru")),
    ("norm", ("layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm")),
    ("pool", ("max_pool1d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "pool")),
    ("resize", ("resize1d", "resize2d", "image_resize2d")),
    ("reduce", ("mean", "sum", "max", "min", "variance", "prod", "argmax", "argmin")),
    ("gather", ("take", "gather_elements", "gather_nd")),
    (
        "layout",
        (
            "reshape",
            "transpose",
            "concatenate",
            "split",
            "strided_slice",
            "squeeze",
            "expand_dims",
            "broadcast_to",
            "flatten",
            "pad",
            "tile",
            "layout_transform",
            "copy",
        ),
    ),
)


def family(name: str) -> str:
    """The op family of a TVM PrimFunc or VM call symbol, or of an ORT op type:
    ``softmax``, ``attention``, ``conv``, ``matmul``, ``norm``, ``pool``, ``resize``,
    ``reduce``, ``gather``, ``layout``, ``recurrent``, ``elementwise``, or ``vm`` (the
    VM's builtins)."""
    if name.startswith("vm."):
        return "vm"
    if name[:1].isupper():
        return "reduce" if name.startswith("Reduce") else ORT_FAMILIES.get(name, "elementwise")
    if name.startswith("rewriter_two_pass"):
        return "softmax"
    ops = _op_names(name)
    for label, members in TVM_FAMILIES:
        if any(op in members for op in ops):
            return label
    return "elementwise"


def _op_names(name: str) -> set[str]:
    """The op names a PrimFunc name may hold: each ``_``-separated word and each pair of
    neighbours (``layer_norm``, ``strided_slice``), trailing digits dropped."""
    words = [re.sub(r"\d+$", "", word) for word in name.split("_")]
    words = [word for word in words if word]
    pairs = [f"{a}_{b}" for a, b in zip(words, words[1:], strict=False)]
    triples = [f"{a}_{b}_{c}" for a, b, c in zip(words, words[1:], words[2:], strict=False)]
    return set(words) | set(pairs) | set(triples)


def schedule_capture() -> Any:
    """A ``PassInstrument`` that snapshots the PrimFuncs after our scheduling pass
    (``.after``, name -> PrimFunc)."""
    import tvm

    @tvm.instrument.pass_instrument
    class ScheduleCapture:
        def __init__(self) -> None:
            self.after: dict[str, Any] = {}

        def run_after_pass(self, mod: Any, info: Any) -> None:
            if info.name == SCHEDULE_PASS:
                self.after = _prim_funcs(mod)

    return ScheduleCapture()


def schedule_table(capture: Any, record: Any) -> list[dict[str, Any]]:
    """One row per PrimFunc that the scheduling pass saw: ``name``, ``scheduled_by``
    (``kernel``, a rule's name, ``Reduction`` or ``none``, from ``record``, the compile's
    ``ScheduleRecord``), ``ours`` (a kernel or one of our rules), ``vector``,
    ``parallel``, ``reduction``, ``symbolic``."""
    rows = []
    for name, func in sorted(capture.after.items()):
        by = record.scheduled.get(name, "none")
        facts = _loop_facts(func)
        if by == "kernel":  # hand-written: vector types, not vectorized loops
            facts |= {"vector": None, "parallel": None}
        ours = by == "kernel" or by in OUR_RULES
        row = {"name": name, "scheduled_by": by, "ours": ours, **facts}
        rows.append(row | {"buffers": _buffers(func)})
    return rows


def _buffers(func: Any) -> str:
    """The shapes of the function's buffer parameters, inputs first (the output last):
    ``1x3x224x224 256x3x16x16 -> 1x256x14x14``; a symbolic dimension by its name."""
    from tvm import tirx

    shapes = [
        "x".join(str(int(d)) if isinstance(d, tirx.IntImm) else str(d) for d in param.shape)
        for param in func.params
        if hasattr(param, "shape")
    ]
    return " ".join(shapes[:-1]) + (" -> " if len(shapes) > 1 else "") + (shapes[-1:] or [""])[0]


def _prim_funcs(mod: Any) -> dict[str, Any]:
    from tvm import tirx

    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def _loop_facts(func: Any) -> dict[str, bool | None]:
    """``vector``, ``parallel``, ``reduction`` from the function's blocks and loops, and
    ``symbolic`` from its buffers (None where the function cannot be read as a schedule,
    as for hand-written kernels without blocks)."""
    from tvm import s_tir, tirx

    symbolic = any(
        not isinstance(dim, tirx.IntImm)
        for param in func.params
        for dim in getattr(param, "shape", ())  # buffers; scalar parameters have no shape
    )
    try:
        sch = s_tir.Schedule(func)
        pending, blocks = list(sch.get_child_blocks(sch.get_sblock("root"))), []
        while pending:
            block = pending.pop()
            blocks.append(block)
            pending.extend(sch.get_child_blocks(block))
    except Exception:  # no root block, or not a schedulable function
        return {"vector": None, "parallel": None, "reduction": None, "symbolic": symbolic}
    kinds, reductions = [], []
    for block in blocks:
        loops = {sch.get(loop).kind for loop in sch.get_loops(block)}
        kinds.append(loops)
        iters = sch.get(block).iter_vars
        reductions.append(any(iv.iter_type == tirx.IterVar.CommReduce for iv in iters))
    heavy = [k for k, r in zip(kinds, reductions, strict=True) if r] or kinds
    return {
        "vector": any(tirx.ForKind.VECTORIZED in k for k in heavy),
        "parallel": any(tirx.ForKind.PARALLEL in k for k in kinds),
        "reduction": any(reductions),
        "symbolic": symbolic,
    }
