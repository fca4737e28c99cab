"""The registry of pass names, and parsing of pipeline specs.

A pipeline is written ``name`` or ``name(key=value,...)``, comma-separated:
``two-pass-softmax,quantize(bits=8)``. It can also come from a TOML file::

    [[pass]]
    name = "two-pass-softmax"

    [[pass]]
    name = "quantize"
    options = { bits = 8 }
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any

from rewriter.errors import InputError, shorten
from rewriter.pass_base import RewritePass, parse_options

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_REGISTRY: dict[str, type[RewritePass]] = {}


def register(cls: type[RewritePass]) -> type[RewritePass]:
    """Class decorator adding a pass to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> dict[str, type[RewritePass]]:
    """All registered passes by name, sorted.

    >>> "two-pass-softmax" in available()
    True
    """
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def create_pass(name: str, options: dict[str, Any] | None = None) -> RewritePass:
    """Instantiate the pass registered as ``name`` with ``options`` (strings or typed values).

    >>> create_pass("two-pass-softmax").exact
    True
    """
    passes = available()
    if name not in passes:
        known = ", ".join(passes)
        raise InputError(f"unknown pass '{shorten(name)}' (available: {known})")
    cls = passes[name]
    return cls(parse_options(cls.Options, options or {}, pass_name=name))


_SPEC = re.compile(r"\s*([A-Za-z0-9_\-]+)\s*(?:\(([^()]*)\))?\s*(?:,|$)")


def split_pipeline(spec: str) -> list[tuple[str, dict[str, str]]]:
    """Split ``"a,b(k=v)"`` into ``[("a", {}), ("b", {"k": "v"})]`` (names not checked).

    >>> split_pipeline("a,b(k=v)")
    [('a', {}), ('b', {'k': 'v'})]
    """
    entries = []
    position = 0
    spec = spec.strip()
    while position < len(spec):
        match = _SPEC.match(spec, position)
        if match is None or match.end() == position:
            raise InputError(f"cannot parse pass list at: {shorten(spec[position:])!r}")
        name = match.group(1)
        entries.append((name, _parse_arguments(name, match.group(2))))
        position = match.end()
    return entries


def parse_pipeline(spec: str) -> list[RewritePass]:
    """Parse ``"a,b(key=value,key2=value2)"`` into pass instances.

    >>> [p.name for p in parse_pipeline("two-pass-softmax")]
    ['two-pass-softmax']
    """
    passes = [create_pass(name, arguments) for name, arguments in split_pipeline(spec)]
    if not passes:
        raise InputError("no passes given")
    return passes


def load_pipeline(path: str | Path) -> list[RewritePass]:
    """Read a TOML pipeline file (``[[pass]]`` tables with ``name`` and ``options``).

    Any other key, at the top level or in a ``[[pass]]``, is refused (a typo such as
    ``opts`` or ``[pass.option]`` must not run the pass with its default options).

    Option values go through the same conversion as ``--passes`` strings (a TOML
    ``bits = 8`` is ``bits=8``, a list of strings is ``a|b``), so each is checked
    against its option's type; a table or a date is refused.
    """
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such pipeline file") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{path}: is a folder, not a TOML pipeline file") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read the pipeline file ({exc.strerror})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a valid TOML pipeline ({exc})") from exc
    _check_keys(path, document, ("pass",), "at the top level")
    entries = document.get("pass")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{path}: expected one or more [[pass]] tables")
    passes = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InputError(f"{path}: each [[pass]] needs a name (a string)")
        name = entry["name"]
        _check_keys(path, entry, ("name", "options"), f"in [[pass]] '{shorten(name)}'")
        options = entry.get("options", {})
        if not isinstance(options, dict):
            raise InputError(f"{path}: options of pass '{shorten(name)}' must be a table")
        texts = {key: _option_text(path, name, key, value) for key, value in options.items()}
        passes.append(create_pass(name, texts))
    return passes


def _check_keys(path: Path, table: dict[str, Any], accepted: tuple[str, ...], where: str) -> None:
    """Refuse a key of ``table`` not in ``accepted``: a misspelt ``options`` would otherwise
    run the pass with its defaults."""
    for key in table:
        if key not in accepted:
            raise InputError(f"{path}: unknown key '{shorten(key)}' {where} (accepted: {', '.join(accepted)})")


def _option_text(path: Path, name: str, key: str, value: Any) -> str:
    """A TOML option value as the text ``--passes`` would give (bool, number, string, list of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list) and all(isinstance(item, (str, int, float)) for item in value):
        return "|".join(str(item) for item in value)
    kind = "a table" if isinstance(value, dict) else type(value).__name__
    raise InputError(f"{path}: option '{shorten(str(key))}' of pass '{shorten(name)}' is {kind}; expected a value")


def _parse_arguments(name: str, arguments: str | None) -> dict[str, str]:
    if not arguments or not arguments.strip():
        return {}
    values: dict[str, str] = {}
    for item in arguments.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"pass '{name}': option {shorten(item.strip())!r} is not key=value")
        values[key.strip()] = value.strip()
    return values


def _load_builtin_passes() -> None:
    # Importing the package registers every built-in pass. By name: the passes import
    # this module (to register), so a static import back would be an import cycle.
    importlib.import_module("rewriter.passes")
