"""The fx front's driver: trace a module, run fx passes on it, verify, report.

``rewrite(module, "two-pass-softmax", example_inputs)`` traces the module
(``torch.fx.symbolic_trace``, else ``torch.export``), runs the fx passes, then runs the
original and the rewritten module on ``example_inputs`` and compares every output with
:mod:`rewriter.verify`, as the ONNX front does.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from rewriter import verify
from rewriter.errors import InputError, VerificationError, first_line
from rewriter.fx.pass_base import FxPass
from rewriter.fx.registry import parse_fx_pipeline
from rewriter.fx.verify import state_restored, verify_rewrite
from rewriter.job import Verification
from rewriter.manager import PassRecord

logger = logging.getLogger(__name__)

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
    with state_restored(model):  # tracing runs a forward's in-place buffer updates for real
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
        verification = verify_rewrite(model, gm, args, example_kwargs or {}, exact, tolerance, seed)
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
        versions = _versions(model)
        try:
            gm, traced_with = fx.symbolic_trace(model), "symbolic_trace"
            if _versions(model) != versions:  # a buffer updated in place (self.count += 1)
                raise RuntimeError(
                    "it ran in-place updates of the module's parameters or buffers, "
                    "which its graph does not record"
                )
        except Exception as exc:  # tracing raises whatever the model's code raises on proxies
            reason = f"torch.fx.symbolic_trace failed ({type(exc).__name__}: {first_line(exc)})"
            if args is None:
                raise InputError(
                    f"{reason}; pass example_inputs to trace with torch.export"
                ) from exc
            try:
                gm = torch.export.export(model, args, kwargs).module()
            except Exception as export_exc:
                raise InputError(
                    f"{reason}; torch.export failed too ({first_line(export_exc)})"
                ) from export_exc
            notes.append(f"{reason}: traced with torch.export instead")
            traced_with = "torch.export"
    gm.training = model.training  # not recursive: submodules may be shared with model
    return gm, traced_with


def _versions(model: torch.nn.Module) -> list[int]:
    """The version counters of ``model``'s parameters and buffers (each in-place update moves one)."""
    if not isinstance(model, torch.nn.Module):
        return []
    return [tensor._version for tensor in (*model.parameters(), *model.buffers())]


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
        logger.info("shape propagation failed (%s); dtypes and ranks unknown", first_line(exc))

