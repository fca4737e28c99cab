"""Shared fixtures: real-model exports, built once a session in a temporary folder.

``real_model("bert_eager_torchscript")`` exports the model the first time a test asks
for it and returns the cached :class:`real_models.RealModel` afterwards, so a test
run only pays for the exports its selected tests use. The export times are listed
at the end of the run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.real_models import RealModel

# Transitional, not a test module: re-exports tests/loss_models.py for the backend tests
# (see its docstring); its basename is also tests/passes/fuse_cross_entropy's test module's.

# Filled by the real_model fixture; tests.real_models (torch) is imported only then,
# so test runs that use no real model do not pay for importing torch.
_BUILT: dict[str, RealModel] = {}


@pytest.fixture(scope="session")
def real_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's folder of exported models."""
    return tmp_path_factory.mktemp("real_models")


@pytest.fixture(scope="session")
def real_model(real_model_dir: Path) -> Callable[[str], RealModel]:
    """Build (once) and return the real model named as in :func:`real_models.build`."""

    from tests.real_models import BUILDERS, build

    def get(name: str) -> RealModel:
        if name not in _BUILT:
            if name in BUILDERS:
                pytest.importorskip("transformers")
            _BUILT[name] = build(name, real_model_dir)
        return _BUILT[name]

    return get


def pytest_configure(config: pytest.Config) -> None:
    """With torchvision installed (the dev extra), define its ops before any test imports
    transformers, which imports torchvision (see examples/torchvision_shim.py)."""
    del config

    if importlib.util.find_spec("torchvision") is not None:
        from examples.torchvision_shim import install

        install()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    exported = {name: model for name, model in _BUILT.items() if model.seconds > 0}
    if not exported:
        return
    terminalreporter.section("real-model exports")
    for name, model in exported.items():
        note = f"  ({model.note})" if model.note else ""
        terminalreporter.write_line(f"{name:<36} {model.exporter:<18} {model.seconds:6.1f} s{note}")
    total = sum(model.seconds for model in exported.values())
    terminalreporter.write_line(f"{'total':<36} {'':<18} {total:6.1f} s")
