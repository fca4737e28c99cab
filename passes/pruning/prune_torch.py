"""nn.Linear(W) -> nn.Linear(W * mask): unstructured and 2:4 pruning on torch modules, in place.

The torch twins of the ONNX passes ``prune`` and ``prune-2to4`` (their fx passes, in
:mod:`rewriter.passes.pruning.fx`, call these),
with the same options dataclasses and the same arithmetic (:mod:`rewriter.passes.pruning.math`):

* :func:`prune_module`: layer-adaptive unstructured magnitude pruning (Xu et al.,
  ICCV 2023, arXiv 2308.10438), the ``rd`` allocation measuring each layer's
  distortion curve by running the module on calibration batches, or a baseline
  (``uniform``, ``global-magnitude``). Masks are applied in place to the weights of
  ``nn.Linear`` and ``nn.Conv1d/2d/3d`` modules.
* :func:`prune_2to4_module`: 2:4 semi-structured magnitude sparsity, in place.
* width pruning, which rebuilds ``nn.Linear`` modules with smaller shapes, lives in
  :mod:`rewriter.passes.pruning.prune_width_torch`.

All are approximate. The LM head (a module named ``*lm_head``, or a Linear sharing its
weight with an ``nn.Embedding``) is left dense unless ``include_lm_head``.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from rewriter.errors import InputError
from rewriter.passes.pruning import math as pruning
from rewriter.passes.pruning.prune import PruneOptions
from rewriter.passes.pruning.prune_2to4 import Prune2to4Options

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
PRUNABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
Prunable = torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d


@dataclasses.dataclass
class PruneReport:
    """What a torch pruning function did: counts as the ONNX pass's stats, and per-layer notes."""

    stats: dict[str, int]
    notes: list[str]


def prunable_modules(
    module: torch.nn.Module,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    include_lm_head: bool = False,
) -> tuple[list[tuple[str, Prunable]], list[str]]:
    """``(name, module)`` of the Linear/Conv modules to prune, and notes on those left out.

    >>> [name for name, _ in prunable_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))[0]]
    ['0']
    """
    embedded = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    found: list[tuple[str, Prunable]] = []
    notes: list[str] = []
    seen: set[int] = set()
    for name, sub in module.named_modules():
        if not isinstance(sub, PRUNABLE) or id(sub.weight) in seen:
            continue
        seen.add(id(sub.weight))
        if include and not any(fnmatch.fnmatchcase(name, glob) for glob in include):
            continue
        if any(fnmatch.fnmatchcase(name, glob) for glob in exclude):
            notes.append(f"layer {name}: excluded by name")
            continue
        if not include_lm_head and (name.endswith("lm_head") or id(sub.weight) in embedded):
            notes.append(f"layer {name}: LM head left dense (include_lm_head=true prunes it)")
            continue
        found.append((name, sub))
    return found, notes


def _numpy(weight: torch.Tensor) -> np.ndarray:
    return weight.detach().float().cpu().numpy()


def _call(module: torch.nn.Module, batch: Batch) -> Any:
    if isinstance(batch, Mapping):
        return module(**batch)
    return module(*batch)


def _mask_of(batch: Batch) -> np.ndarray | None:
    if isinstance(batch, Mapping):
        for name, value in batch.items():
            if "mask" in name.lower() and value.ndim == 2:
                return value.detach().cpu().numpy()
    return None


def _float_leaves(output: Any) -> list[np.ndarray]:
    if hasattr(output, "to_tuple"):  # transformers ModelOutput
        output = output.to_tuple()
    leaves = pytree.tree_leaves(output)
    return [
        leaf.detach().double().cpu().numpy()
        for leaf in leaves
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
    ]


def prune_module(
    module: torch.nn.Module,
    calibration: Sequence[Batch],
    options: PruneOptions | None = None,
) -> PruneReport:
    """Prune ``module``'s Linear/Conv weights in place to ``options.sparsity`` (see the module docstring).

    ``calibration``: batches to call the module with (dicts of keyword tensors, or
    tuples of positional ones); an ``attention_mask`` among the keywords restricts the
    distortion to real tokens.

    >>> report = prune_module(model, [{"input_ids": ids, "attention_mask": mask}],
    ...                       PruneOptions(sparsity=0.5))  # doctest: +SKIP
    >>> report.stats["sparsity_permille"]  # doctest: +SKIP
    500
    """
    options = options or PruneOptions()
    from rewriter.passes.pruning.prune import _check_options

    _check_options(options)
    layers, notes = prunable_modules(
        module, exclude=options.exclude, include_lm_head=options.include_lm_head
    )
    if not layers:
        notes.append("no prunable modules (nn.Linear / nn.Conv)")
        return PruneReport({"layers_pruned": 0}, notes)
    weights = [_numpy(layer.weight) for _, layer in layers]
    params = [w.size for w in weights]
    start = time.perf_counter()
    if options.allocation == "uniform":
        allocation = pruning.allocate_uniform(params, options.sparsity)
    elif options.allocation == "global-magnitude":
        allocation = pruning.allocate_global_magnitude(weights, options.sparsity)
    else:
        if not calibration:
            raise InputError("prune: the rd allocation needs calibration batches")
        amounts = pruning.amount_grid(options.max_amount, options.steps)
        curves = _curves(module, layers, amounts, calibration, options.distortion)
        zeros = [int(np.count_nonzero(w == 0)) for w in weights]
        allocation = pruning.allocate_rd(
            pruning.monotone(curves), params, amounts, options.sparsity, zeros=zeros
        )
    seconds = time.perf_counter() - start
    zeroed = 0
    with torch.no_grad():
        for (_, layer), weight, count in zip(layers, weights, allocation.counts, strict=True):
            pruned = pruning.magnitude_prune(weight, count)
            zeroed += int(np.count_nonzero(pruned == 0))
            layer.weight.mul_(torch.from_numpy(pruned != 0).to(layer.weight.device))
    total = sum(params)
    stats = pruning.allocation_stats(allocation.counts, zeroed, total, seconds)
    for index, ((name, _), count) in enumerate(zip(layers, allocation.counts, strict=True)):
        measured = (
            f", distortion {allocation.distortion[index]:.3e}" if allocation.distortion else ""
        )
        notes.append(
            f"layer {name}: params {params[index]}, sparsity {count / params[index]:.4f}{measured}"
        )
    return PruneReport(stats, notes)


def _curves(
    module: torch.nn.Module,
    layers: Sequence[tuple[str, Prunable]],
    amounts: np.ndarray,
    calibration: Sequence[Batch],
    distortion: str,
) -> np.ndarray:
    """``curves[l, j]``: distortion with only layer ``l`` pruned by ``amounts[j]`` (weights restored after)."""
    masks = [_mask_of(batch) for batch in calibration]
    was_training = module.training
    module.eval()
    curves = np.zeros((len(layers), len(amounts)))
    with torch.no_grad():
        reference = [
            pruning.distortion_features(_float_leaves(_call(module, batch)), mask, distortion)
            for batch, mask in zip(calibration, masks, strict=True)
        ]
        start = time.perf_counter()
        for index, (name, layer) in enumerate(layers):
            original = layer.weight.detach().clone()
            order = torch.from_numpy(pruning.magnitude_order(_numpy(original))).to(original.device)
            flat = layer.weight.data.view(-1)
            done = 0
            try:
                for j, amount in enumerate(amounts):
                    count = pruning.pruned_count(flat.numel(), float(amount))
                    flat[order[done:count]] = 0
                    done = max(done, count)
                    if count == 0:
                        continue
                    total = 0.0
                    for batch, mask, ref in zip(calibration, masks, reference, strict=True):
                        out = pruning.distortion_features(
                            _float_leaves(_call(module, batch)), mask, distortion
                        )
                        total += pruning.relative_error(ref, out)
                    curves[index, j] = total / len(calibration)
            finally:
                layer.weight.data.copy_(original)
            logger.info(
                "prune: distortion curve %d/%d (%s) after %.1f s",
                index + 1,
                len(layers),
                name,
                time.perf_counter() - start,
            )
    module.train(was_training)
    return curves


def prune_2to4_module(
    module: torch.nn.Module, options: Prune2to4Options | None = None
) -> PruneReport:
    """2:4 magnitude sparsity along the input dimension of the chosen Linear/Conv weights, in place.

    >>> prune_2to4_module(torch.nn.Linear(8, 2)).stats["params_zeroed"]
    8
    """
    options = options or Prune2to4Options()
    layers, notes = prunable_modules(
        module,
        include=options.include,
        exclude=options.exclude,
        include_lm_head=options.include_lm_head,
    )
    stats = {"layers_sparsified": 0, "layers_skipped": 0, "params_total": 0, "params_zeroed": 0}
    with torch.no_grad():
        for name, layer in layers:
            weight = _numpy(layer.weight)  # [out, in, ...]: the input dimension is axis 1
            if weight.shape[1] % 4:
                notes.append(
                    f"layer {name}: input dimension {weight.shape[1]} is not a multiple of 4, left dense"
                )
                stats["layers_skipped"] += 1
                continue
            mask = pruning.two_four_mask(weight, 1) & (weight != 0)
            layer.weight.mul_(torch.from_numpy(mask).to(layer.weight.device))
            stats["layers_sparsified"] += 1
            stats["params_total"] += weight.size
            stats["params_zeroed"] += int(weight.size - np.count_nonzero(mask))
    return PruneReport(stats, notes)


# --------------------------------------------------------------------------------------
# What the fx passes (rewriter.passes.pruning.fx) need
# --------------------------------------------------------------------------------------


def unshared(
    gm: torch.nn.Module, layers: Sequence[tuple[str, Prunable]]
) -> list[tuple[str, Prunable]]:
    """Give ``gm`` its own copies of ``layers``: a traced module shares its submodules with
    the model it came from, and masking in place would change that model too."""
    copies = []
    for name, layer in layers:
        clone = copy.deepcopy(layer)
        parent_name, _, child = name.rpartition(".")
        setattr(gm.get_submodule(parent_name) if parent_name else gm, child, clone)
        copies.append((name, clone))
    return copies


def zeros(module: torch.nn.Module) -> int:
    return sum(int((m.weight == 0).sum()) for m in module.modules() if isinstance(m, PRUNABLE))
