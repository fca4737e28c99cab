"""Running a list of passes in order, timing each and collecting its statistics."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import onnx_ir as ir

from rewriter.io import gc_paused
from rewriter.pass_base import PassContext, RewritePass, RewriteResult

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PassRecord:
    """What one pass of a pipeline did."""

    name: str
    exact: bool
    stats: dict[str, int]
    notes: list[str]
    seconds: float
    modified: bool
    tables: dict[str, list[dict[str, object]]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PipelineResult:
    """The model after a pipeline, with one record per pass."""

    model: ir.Model
    records: list[PassRecord]

    @property
    def exact(self) -> bool:
        """True when every pass of the pipeline is exact."""
        return all(record.exact for record in self.records)

    @property
    def stats(self) -> dict[str, int]:
        """The statistics of all passes merged (counts of the same key are added)."""
        merged: dict[str, int] = {}
        for record in self.records:
            for key, value in record.stats.items():
                merged[key] = merged.get(key, 0) + value
        return merged


def run_pipeline(
    model: ir.Model,
    passes: Sequence[RewritePass],
    *,
    context: PassContext | None = None,
    on_pass: Callable[[int, RewritePass], None] | None = None,
) -> PipelineResult:
    """Apply ``passes`` in order to ``model`` (in place) and record what each did.

    ``context`` (calibration data, Ray workers and the like) is handed to every pass;
    a Ray it started for its workers is shut down at the end.

    >>> from rewriter.registry import parse_pipeline
    >>> result = run_pipeline(model, parse_pipeline("two-pass-softmax"))  # doctest: +SKIP
    >>> result.stats["softmax_replaced"]  # doctest: +SKIP
    12
    """
    try:
        return _run(model, passes, context, on_pass)
    finally:
        if context is not None:
            context.close()


def _run(
    model: ir.Model,
    passes: Sequence[RewritePass],
    context: PassContext | None,
    on_pass: Callable[[int, RewritePass], None] | None,
) -> PipelineResult:
    records = []
    for index, rewrite_pass in enumerate(passes):
        if context is not None:
            rewrite_pass.context = context
        if on_pass is not None:
            on_pass(index, rewrite_pass)
        start = time.perf_counter()
        with gc_paused():  # one collection after the pass, not one per 700 new objects
            result = rewrite_pass(model)
        seconds = time.perf_counter() - start
        stats = result.stats if isinstance(result, RewriteResult) else {}
        notes = result.notes if isinstance(result, RewriteResult) else []
        tables = result.tables if isinstance(result, RewriteResult) else {}
        model = result.model
        records.append(
            PassRecord(
                name=rewrite_pass.name,
                exact=rewrite_pass.exact,
                stats=dict(stats),
                notes=list(notes),
                seconds=seconds,
                modified=result.modified,
                tables=dict(tables),
            )
        )
        logger.info("%s: %s (%.3f s)", rewrite_pass.name, stats, seconds)
    return PipelineResult(model=model, records=records)
