"""The base of the fx passes: a pass takes a ``torch.fx.GraphModule`` and returns what it did.

An fx pass is the twin of an ONNX pass: it has the ONNX pass's ``name``, ``exact`` and
``Options``, so one option definition serves both fronts (:func:`register_fx_pass`
checks it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import fx


@dataclasses.dataclass
class FxPassResult:
    """What an fx pass did: the module, whether it changed, its statistics and notes."""

    graph_module: fx.GraphModule
    modified: bool
    stats: dict[str, int]
    notes: list[str] = dataclasses.field(default_factory=list)


class FxPass:
    """Base of the fx passes. ``name``, ``exact`` and ``Options`` are the ONNX twin's.

    >>> class Nothing(FxPass):
    ...     name, exact, Options = "nothing", True, dict
    ...     def call(self, gm):
    ...         return FxPassResult(gm, False, {})
    """

    name: ClassVar[str]
    exact: ClassVar[bool]
    Options: ClassVar[type]

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def __call__(self, gm: fx.GraphModule) -> FxPassResult:
        result = self.call(gm)
        gm.graph.lint()
        gm.recompile()
        return result

    def call(self, gm: fx.GraphModule) -> FxPassResult:
        raise NotImplementedError
