"""Verification of an fx rewrite: the original and the rewritten module, run on the same inputs.

Both run under the same seed (dropout in training mode draws the same masks), each on
its own copy of the inputs and from the same parameters and buffers (restored after each
run): a module that updates its input or its own state in place must not make the second
run differ, nor leave the caller's tensors or the module changed. Every tensor output is
compared with :mod:`rewriter.verify`, with the ONNX front's tolerances.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.utils import _pytree as pytree

from rewriter import verify
from rewriter.errors import InputError, VerificationError, first_line
from rewriter.job import Verification

logger = logging.getLogger(__name__)


def verify_rewrite(
    original: torch.nn.Module,
    rewritten: fx.GraphModule,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    exact: bool,
    tolerance: verify.Tolerance | None,
    seed: int,
) -> Verification:
    """Run ``original`` and ``rewritten`` on the same inputs and seed; compare their outputs.

    An ``exact`` rewrite's float and complex outputs must agree within ``tolerance``
    (default: by dtype, :func:`rewriter.verify.default_tolerance`), its other outputs bit
    for bit;
    the result says whether they do (the caller raises).

    >>> verify_rewrite(model, gm, (x,), {}, True, None, 0).passed  # doctest: +SKIP
    True
    """
    with torch.no_grad(), state_restored(original, rewritten) as restore:
        try:
            reference = _run_seeded(original, args, kwargs, seed)
        except Exception as exc:  # the caller's module and inputs: not a rewrite's fault
            raise InputError(
                "the original module fails on example_inputs "
                f"({type(exc).__name__}: {first_line(exc)})"
            ) from exc
        restore()
        candidate = _run_seeded(rewritten, args, kwargs, seed)
    ref_leaves, ref_spec = pytree.tree_flatten_with_path(reference)
    cand_leaves, cand_spec = pytree.tree_flatten_with_path(candidate)
    if len(ref_leaves) != len(cand_leaves):
        raise VerificationError(
            f"the rewritten module returns {cand_spec}, the original {ref_spec}"
        )
    outputs, used = [], None
    for (path, ref), (_, cand) in zip(ref_leaves, cand_leaves, strict=True):
        if not isinstance(ref, torch.Tensor):
            continue
        name = pytree.keystr(path) or "output"
        dtype = str(ref.dtype).removeprefix("torch.")
        comparison = verify.compare(name, to_numpy(ref), to_numpy(cand))
        comparison.dtype = dtype
        if exact and (ref.is_floating_point() or ref.is_complex()):
            chosen = tolerance or verify.default_tolerance(dtype)
            verify.check_tolerance(comparison, to_numpy(ref), chosen)
            used = {"rtol": chosen.rtol, "atol": chosen.atol}
        elif exact:
            comparison.passed = comparison.max_abs_err == 0
        if exact and comparison.rewritten_shape is not None:
            comparison.passed = False
        if comparison.warning:
            logger.warning("%s", comparison.warning)
        outputs.append(comparison)
    inputs = {
        prefix + pytree.keystr(path): list(value.shape)
        for prefix, tree in (("args", args), ("kwargs", kwargs))
        for path, value in pytree.tree_flatten_with_path(tree)[0]
        if isinstance(value, torch.Tensor)
    }
    return Verification(outputs=outputs, inputs=inputs, tolerance=used, enforced=exact)


def _run_seeded(
    module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], seed: int
) -> Any:
    # The same seed for both runs: dropout in training mode draws the same masks. Each
    # run on its own copy of the inputs: a module may update them in place (x.mul_(2)).
    args, kwargs = pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module(*args, **kwargs)


@contextlib.contextmanager
def state_restored(*modules: torch.nn.Module) -> Iterator[Callable[[], None]]:
    """Undo what running (or tracing) the modules does to their parameters and buffers: updates
    in place (BatchNorm statistics in training mode, a forward that updates its own
    parameter) and attributes assigned anew (``self.calls = self.calls + 1``). Yields the
    function that restores them, for between the runs; restores them on exit.

    Every parameter and buffer is copied once (modules that share one share its copy); a
    restore copies back only those whose version counter moved.

    >>> with state_restored(model):  # doctest: +SKIP
    ...     gm = torch.fx.symbolic_trace(model)  # a buffer updated in place by the trace
    """
    slots: list[tuple[dict[str, Any], str, torch.Tensor]] = [
        (table, name, tensor)
        for module in modules
        if isinstance(module, torch.nn.Module)  # a plain callable has no state
        for owner in module.modules()
        for table in (owner._parameters, owner._buffers)
        for name, tensor in table.items()
        if tensor is not None
    ]
    saved = {id(tensor): (tensor.detach().clone(), tensor._version) for _, _, tensor in slots}

    def restore() -> None:
        with torch.no_grad():
            for table, name, tensor in slots:
                table[name] = tensor
                copy, version = saved[id(tensor)]
                if tensor._version != version:
                    tensor.copy_(copy)
                    saved[id(tensor)] = (copy, tensor._version)

    try:
        yield restore
    finally:
        restore()


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A detached CPU copy of ``tensor`` as numpy (bfloat16, which numpy lacks, as float32)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        tensor = tensor.float()
    return tensor.numpy()
