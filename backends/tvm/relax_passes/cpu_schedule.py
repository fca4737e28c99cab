"""Our CPU schedules applied to a module: which rule takes each PrimFunc, and a record of it.

:func:`cpu_schedule` is the pipeline's scheduling stage on CPUs: for each PrimFunc not
yet scheduled (our hand-written kernels and applied tuning records are), the first rule
of :func:`cpu_rules` that takes it schedules it, as dlight's ``ApplyDefaultSchedule``
does; a rule that raises is passed over. The rules, in order: the channels-last
implicit-GEMM convolution (:mod:`.conv`), the register-tiled matmul
(:mod:`.schedules`), the channels-last window (depthwise convolutions, pooling), row
reductions, dlight's CPU reduction, tiled transposes (:mod:`.transpose`), elementwise.

On CUDA, :func:`gpu_schedule` applies dlight's GPU rules (:func:`gpu_rules`) the same
way, in place of dlight's ``ApplyDefaultSchedule``, so that a rule that raises on a
function is passed over for the next one there too: dlight's ``Matmul`` asserts on some
fused convolutions (MobileNetV3-small at batch 8: "consumers of the cache-write stage
that are not properly inlined"), which ended the whole compile.

:class:`ScheduleRecord` keeps which rule took which function, and the functions none
took (TVM's default lowering, scalar loops): the report's ``compiled.schedules`` and the
CLI's "functions on TVM's default lowering" line show a user where time goes.

>>> record = ScheduleRecord()  # doctest: +SKIP
>>> mod = cpu_schedule(target, record)(mod)  # doctest: +SKIP
>>> record.unscheduled  # doctest: +SKIP
['cumsum']
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.relax_passes import conv, schedules, transpose

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ScheduleRecord:
    """What scheduled each PrimFunc of a build: ``scheduled`` maps a function's name to the
    rule that scheduled it (``matmul``, ``conv``, ...; ``kernel`` for our hand-written
    kernels and applied tuning records); ``unscheduled`` lists the functions no rule took,
    left to TVM's default lowering (scalar loops): where a model loses its time."""

    scheduled: dict[str, str] = dataclasses.field(default_factory=dict)
    unscheduled: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"scheduled": dict(self.scheduled), "unscheduled": list(self.unscheduled)}


def cpu_rules(target: tvm.target.Target) -> list[Any]:
    """Our CPU schedule rules for ``target``, in the order they are tried."""
    from tvm.s_tir import dlight as dl

    lanes = schedules.vector_lanes(target)
    prefetch_tiles = schedules.prefetch_max_tiles(target)
    return [
        conv.rules()["conv"](lanes, prefetch_tiles, conv.stream_bytes(target)),
        schedules.rule("matmul")(lanes, prefetch_tiles),
        conv.rules()["window"](lanes, conv.stream_bytes(target)),
        schedules.rule("row_reduction")(lanes),
        schedules.rule("column_reduction")(lanes),
        dl.cpu.Reduction(),
        transpose.rule()(lanes),
        schedules.rule("elementwise")(lanes),
    ]


def gpu_rules() -> list[Any]:
    """dlight's GPU rules, in the order TVM's CUDA pipeline tries them."""
    from tvm.s_tir import dlight as dl

    return [
        dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Fallback(),
    ]


def cpu_schedule(
    target: tvm.target.Target, record: ScheduleRecord | None = None
) -> tvm.transform.Pass:
    """The module pass that schedules every unscheduled PrimFunc for CPU ``target``: the
    first of :func:`cpu_rules` that takes a function schedules it (as dlight's
    ``ApplyDefaultSchedule``), and ``record`` (if given) says which rule took which."""
    return _schedule_pass("RewriterCpuSchedule", target, cpu_rules(target), record)


def gpu_schedule(
    target: tvm.target.Target, record: ScheduleRecord | None = None
) -> tvm.transform.Pass:
    """:func:`cpu_schedule` for a GPU ``target``, with :func:`gpu_rules`."""
    return _schedule_pass("RewriterGpuSchedule", target, gpu_rules(), record)


def _schedule_pass(
    name: str, target: tvm.target.Target, rules: list[Any], record: ScheduleRecord | None
) -> tvm.transform.Pass:
    import tvm

    record = record if record is not None else ScheduleRecord()

    @tvm.transform.module_pass(opt_level=0, name=name)
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updated = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            name = gv.name_hint
            if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
                record.scheduled[name] = "kernel"
                continue
            for rule in rules:
                try:
                    space = rule.apply(func, target, False)
                except Exception as exc:  # dlight's own rules raise where a primitive refuses
                    logger.debug("%s: %s not applied: %s", name, type(rule).__name__, exc)
                    continue
                if space is None:
                    continue
                schedule = space[0] if isinstance(space, list) else space
                updated[gv] = schedule.mod["main"].with_attr("tirx.is_scheduled", True)
                record.scheduled[name] = getattr(rule, "what", type(rule).__name__)
                break
            else:
                record.unscheduled.append(name)
        for gv, func in updated.items():
            mod[gv] = func
        if record.unscheduled:
            logger.info(
                "%d functions left to TVM's default lowering (no schedule of ours): %s",
                len(record.unscheduled),
                ", ".join(sorted(record.unscheduled)),
            )
        return mod

    return pass_
