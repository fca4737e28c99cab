"""The fx passes by name: the ONNX registry's names, each pass mirroring its ONNX twin.

The built-in fx passes live in the pass packages, in ``rewriter.passes.<name>.fx``, which
import this module to register themselves; this module finds them by module name
(:mod:`importlib`), so the fx front never imports a pass.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence

from rewriter import registry
from rewriter.errors import InputError
from rewriter.fx.pass_base import FxPass
from rewriter.pass_base import parse_options

_FX_PASSES: dict[str, type[FxPass]] = {}

def register_fx_pass(cls: type[FxPass]) -> type[FxPass]:
    """Class decorator adding an fx pass under the name of the ONNX pass it mirrors.

    The fx pass must take the ONNX pass's ``Options``: one option definition, two fronts.
    """
    if cls.name in _FX_PASSES and _FX_PASSES[cls.name] is not cls:
        raise ValueError(f"fx pass name {cls.name!r} registered twice")
    twin = registry.available().get(cls.name)
    if twin is None or twin.Options is not cls.Options or twin.exact != cls.exact:
        raise ValueError(
            f"fx pass {cls.name!r} must mirror a registered ONNX pass's Options and exact"
        )
    _FX_PASSES[cls.name] = cls
    return cls


def available() -> dict[str, type[FxPass]]:
    """The passes with an fx implementation, by name.

    >>> "two-pass-softmax" in available()
    True
    """
    load_builtin_fx_passes()
    return dict(sorted(_FX_PASSES.items()))


def load_builtin_fx_passes() -> None:
    """Import the ``fx`` module of every pass package that has one (it registers its passes).

    By name, so the fx front has no import of a pass: an fx module imports this module,
    never the other way round.
    """
    passes = importlib.import_module("rewriter.passes")
    for package in passes.PACKAGES:
        name = f"{passes.__name__}.{package}.fx"
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def parse_fx_pipeline(passes: str | Sequence[str | FxPass]) -> list[FxPass]:
    """Parse pass specs (``"two-pass-softmax(log_softmax=false)"``) into fx passes.

    >>> [p.options.log_softmax for p in parse_fx_pipeline("two-pass-softmax(log_softmax=false)")]
    [False]
    """
    load_builtin_fx_passes()
    items = [passes] if isinstance(passes, str) else list(passes)
    result: list[FxPass] = []
    for item in items:
        if isinstance(item, FxPass):
            result.append(item)
            continue
        for name, arguments in registry.split_pipeline(item):
            if name not in _FX_PASSES:
                known = ", ".join(available())
                where = "has no fx implementation" if name in registry.available() else "is unknown"
                raise InputError(f"pass '{name}' {where} (fx passes: {known})")
            cls = _FX_PASSES[name]
            result.append(cls(parse_options(cls.Options, arguments, pass_name=name)))
    if not result:
        raise InputError("no passes given")
    return result
