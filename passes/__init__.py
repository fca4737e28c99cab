"""The built-in passes: one package per pass (or family of passes), named after it.

Importing this package imports every package in it, and each registers its ONNX
pass(es) with ``@rewriter.registry.register``; :func:`rewriter.registry.available`
imports this package by name, and :func:`rewriter.fx.available` imports each package's
``fx`` module (its fx twins) by name. A new pass is a new package here: no list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil

# The pass packages, in import order.
PACKAGES = tuple(sorted(info.name for info in pkgutil.iter_modules(__path__) if info.ispkg))

for _package in PACKAGES:
    importlib.import_module(f"{__name__}.{_package}")
