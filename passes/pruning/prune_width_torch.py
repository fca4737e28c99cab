"""Linear(d, h) -> Linear(d, h'): MLP width pruning on torch modules, the twin of ``prune-width``.

MAW width pruning (arXiv 2512.22671; :func:`rewriter.passes.pruning.math.maw_scores`) of the MLPs
found by tracing submodules with ``torch.fx``: Llama/Mistral-style
``down(act(gate(x)) * up(x))`` and plain ``down(act(up(x)))``, inside one traceable
module (an untraceable outer model is searched submodule by submodule). The two or
three ``nn.Linear`` modules are rebuilt with smaller shapes; options are the ONNX
pass's :class:`~rewriter.passes.pruning.prune_width.PruneWidthOptions`. An MLP split over two
modules (BERT's ``intermediate`` and ``output``) is not found. Approximate.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import fx

from rewriter.errors import InputError
from rewriter.passes.pruning import math as pruning
from rewriter.passes.pruning.prune_torch import PRUNABLE, PruneReport, _numpy
from rewriter.passes.pruning.prune_width import PruneWidthOptions

_ELEMENTWISE_FUNCTIONS = {
    operator.mul,
    operator.add,
    operator.sub,
    operator.truediv,
    torch.mul,
    torch.add,
    torch.sigmoid,
    torch.tanh,
    torch.relu,
    torch.erf,
    torch.nn.functional.silu,
    torch.nn.functional.gelu,
    torch.nn.functional.relu,
    torch.nn.functional.sigmoid,
    torch.nn.functional.tanh,
}
_ELEMENTWISE_METHODS = {
    "mul",
    "add",
    "sub",
    "div",
    "sigmoid",
    "tanh",
    "relu",
    "float",
    "to",
    "type_as",
}


@dataclasses.dataclass(frozen=True)
class _FxMlp:
    root: str
    sources: tuple[str, ...]
    down: str
    hidden: int


def _is_elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS
    if node.op == "call_module":
        sub = gm.get_submodule(str(node.target))
        # Activation modules: no parameters, not a projection (SiLU, GELU, HF ACT2FN ...).
        return (
            not isinstance(sub, PRUNABLE)
            and next(sub.parameters(), None) is None
            and not list(sub.children())
        )
    return False


def _linear(gm: fx.GraphModule, node: Any) -> torch.nn.Linear | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        sub = gm.get_submodule(str(node.target))
        if isinstance(sub, torch.nn.Linear):
            return sub
    return None


def _find_in(gm: fx.GraphModule, root: str) -> tuple[list[_FxMlp], list[str]]:
    found, notes = [], []
    for down_node in gm.graph.nodes:
        down = _linear(gm, down_node)
        if down is None:
            continue
        hidden = down.in_features
        region: list[fx.Node] = []
        sources: list[fx.Node] = []
        stack, seen, reason = [down_node.args[0]], set(), ""
        while stack and not reason:
            node = stack.pop()
            if not isinstance(node, fx.Node):
                if isinstance(node, (int, float)):
                    continue
                reason = f"operand {node!r}"
                break
            if node in seen:
                continue
            seen.add(node)
            source = _linear(gm, node)
            if source is not None and source.out_features == hidden:
                sources.append(node)
            elif _is_elementwise(gm, node):
                region.append(node)
                stack.extend(
                    arg
                    for arg in (*node.args, *node.kwargs.values())
                    if not isinstance(arg, (str, torch.dtype))
                )
            else:
                reason = "" if not region else f"{node.name} is {node.op} {node.target}"
        if reason or not region or not 1 <= len(sources) <= 2:
            if reason:
                notes.append(f"{root}.{down_node.target}: not an MLP down projection ({reason})")
            continue
        if len(sources) == 2 and sources[0].args[0] is not sources[1].args[0]:
            notes.append(f"{root}.{down_node.target}: its two projections take different inputs")
            continue
        inside = set(region) | {down_node}
        if any(user not in inside for node in sources + region for user in node.users):
            notes.append(f"{root}.{down_node.target}: a hidden value is also used outside the MLP")
            continue
        prefix = f"{root}." if root else ""
        found.append(
            _FxMlp(
                root,
                tuple(prefix + str(s.target) for s in sources),
                prefix + str(down_node.target),
                hidden,
            )
        )
    return found, notes


def find_mlps(module: torch.nn.Module) -> tuple[list[_FxMlp], list[str]]:
    """The MLPs of ``module``: traced submodule by submodule, outermost first.

    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> [m.sources for m in find_mlps(mlp)[0]]
    [('0',)]
    """
    found: list[_FxMlp] = []
    notes: list[str] = []
    done: set[str] = set()
    claimed: set[str] = set()
    for name, sub in module.named_modules():
        if any(name == d or name.startswith(d + ".") for d in done) or isinstance(sub, PRUNABLE):
            continue
        if not any(isinstance(m, torch.nn.Linear) for m in sub.modules()):
            continue
        try:
            gm = fx.symbolic_trace(sub)
        except Exception:  # untraceable modules are common (data-dependent control flow)
            continue
        mlps, why = _find_in(gm, name)
        mlps = [m for m in mlps if m.down not in claimed]
        if mlps or why:
            notes.extend(why)
        for mlp in mlps:
            claimed.add(mlp.down)
        found.extend(mlps)
        if not name:  # the whole module traced: nothing left to look at
            break
        done.add(name)
    return found, notes


def prune_width_module(
    module: torch.nn.Module, options: PruneWidthOptions | None = None
) -> PruneReport:
    """Rebuild each MLP's Linear modules without the ``ratio`` lowest-MAW hidden channels.

    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> prune_width_module(mlp, PruneWidthOptions(ratio=0.5)).stats["channels_after"]
    4
    >>> mlp[2].in_features
    4
    """
    options = options or PruneWidthOptions()
    if not 0.0 <= options.ratio < 1.0:
        raise InputError(f"prune-width: ratio must be in [0, 1), got {options.ratio}")
    score = pruning.channel_criterion(options.criterion)
    mlps, notes = find_mlps(module)
    stats = {
        "glu_pruned": 0,
        "mlp_pruned": 0,
        "channels_before": 0,
        "channels_after": 0,
        "params_removed": 0,
    }
    for mlp in mlps:
        sources = [_get_linear(module, name) for name in mlp.sources]
        down = _get_linear(module, mlp.down)
        # nn.Linear weights are [out, in]: the hidden channels are axis 0 of the sources.
        scores = score([(_numpy(s.weight), 0) for s in sources])
        keep = pruning.channels_to_keep(scores, options.ratio, multiple=options.multiple)
        kind = "glu" if len(sources) == 2 else "mlp"
        stats["channels_before"] += mlp.hidden
        stats["channels_after"] += keep.size
        if keep.size == mlp.hidden:
            continue
        index = torch.from_numpy(keep)
        before = sum(p.numel() for m in [*sources, down] for p in m.parameters())
        for name, source in zip(mlp.sources, sources, strict=True):
            _replace(module, name, _sliced(source, index, rows=True))
        _replace(module, mlp.down, _sliced(down, index, rows=False))
        after = sum(
            p.numel()
            for name in [*mlp.sources, mlp.down]
            for p in module.get_submodule(name).parameters()
        )
        stats["params_removed"] += before - after
        stats[f"{kind}_pruned"] += 1
        notes.append(f"{kind} at {mlp.down}: hidden {mlp.hidden} -> {keep.size}")
    return PruneReport(stats, notes)


def _sliced(linear: torch.nn.Linear, index: torch.Tensor, *, rows: bool) -> torch.nn.Linear:
    """A new Linear keeping output features ``index`` (``rows``) or input features ``index``."""
    weight = linear.weight.detach()
    index = index.to(weight.device)
    if rows:
        new = torch.nn.Linear(
            linear.in_features,
            index.numel(),
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        new.weight.data.copy_(weight[index])
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach()[index])
    else:
        new = torch.nn.Linear(
            index.numel(),
            linear.out_features,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        new.weight.data.copy_(weight[:, index])
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
    new.train(linear.training)
    return new


def _replace(module: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, new)


def _get_linear(module: torch.nn.Module, name: str) -> torch.nn.Linear:
    linear = module.get_submodule(name)
    assert isinstance(linear, torch.nn.Linear)
    return linear
