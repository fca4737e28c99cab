"""The fx twins of the pruning family: ``prune``, ``prune-2to4`` and ``prune-width`` on GraphModules.

Each takes its ONNX twin's name and ``Options`` and calls the torch implementation:
:mod:`rewriter.passes.pruning.prune_torch` (masks in place) and
:mod:`rewriter.passes.pruning.prune_width_torch` (Linear modules rebuilt narrower).
"""

from __future__ import annotations

import torch
from torch import fx

from rewriter.errors import InputError
from rewriter.fx.pass_base import FxPass, FxPassResult
from rewriter.fx.registry import register_fx_pass
from rewriter.passes.pruning import prune_torch, prune_width_torch
from rewriter.passes.pruning.prune import PruneOptions
from rewriter.passes.pruning.prune_2to4 import Prune2to4Options
from rewriter.passes.pruning.prune_width import PruneWidthOptions


@register_fx_pass
class PruneFxPass(FxPass):
    """``prune`` on a GraphModule: the ``uniform`` and ``global-magnitude`` allocations.

    ``rd`` needs calibration batches, which an fx pass does not get: call
    :func:`~rewriter.passes.pruning.prune_torch.prune_module` with them instead.
    """

    name = "prune"
    exact = False
    Options = PruneOptions

    def call(self, gm: torch.fx.GraphModule) -> FxPassResult:
        if self.options.allocation == "rd":
            raise InputError(
                "prune (fx): the rd allocation needs calibration batches; call "
                "rewriter.passes.pruning.prune_torch.prune_module(module, batches, options), or use allocation=uniform"
            )
        before = prune_torch.zeros(gm)
        layers, _ = prune_torch.prunable_modules(
            gm, exclude=self.options.exclude, include_lm_head=self.options.include_lm_head
        )
        prune_torch.unshared(gm, layers)
        report = prune_torch.prune_module(gm, [], self.options)
        return FxPassResult(gm, prune_torch.zeros(gm) != before, report.stats, report.notes)


@register_fx_pass
class Prune2to4FxPass(FxPass):
    """``prune-2to4`` on a GraphModule's Linear/Conv modules."""

    name = "prune-2to4"
    exact = False
    Options = Prune2to4Options

    def call(self, gm: torch.fx.GraphModule) -> FxPassResult:
        before = prune_torch.zeros(gm)
        options = self.options
        layers, _ = prune_torch.prunable_modules(
            gm,
            include=options.include,
            exclude=options.exclude,
            include_lm_head=options.include_lm_head,
        )
        prune_torch.unshared(gm, layers)
        report = prune_torch.prune_2to4_module(gm, options)
        return FxPassResult(gm, prune_torch.zeros(gm) != before, report.stats, report.notes)


@register_fx_pass
class PruneWidthFxPass(FxPass):
    """``prune-width`` on a GraphModule (traced with ``symbolic_trace``: its Linear modules
    are rebuilt in the GraphModule only, the traced model keeps its own)."""

    name = "prune-width"
    exact = False
    Options = PruneWidthOptions

    def call(self, gm: fx.GraphModule) -> FxPassResult:
        report = prune_width_torch.prune_width_module(gm, self.options)
        modified = report.stats["glu_pruned"] + report.stats["mlp_pruned"] > 0
        return FxPassResult(gm, modified, report.stats, report.notes)
