"""The torchvision shim defines its op schemas only where torchvision's own ops cannot load."""

from __future__ import annotations

import pytest
import torch

from examples import torchvision_shim


def test_the_shim_defines_nothing_where_torchvision_ops_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With torchvision's compiled ops loadable (a torchvision built for this torch), the
    shim must leave the namespace to them: torchvision registering its ``nms`` over the
    shim's aborts the process."""

    def library(*args: object) -> None:
        raise AssertionError("the shim defined torchvision ops beside torchvision's own")

    monkeypatch.setattr(torchvision_shim, "_LIBRARY", None)
    monkeypatch.setattr(torch._C, "_jit_get_schemas_for_operator", lambda name: [])
    monkeypatch.setattr(torchvision_shim, "_load_compiled_ops", lambda: True)
    monkeypatch.setattr(torch.library, "Library", library)
    torchvision_shim.install()
    assert torchvision_shim._LIBRARY is None


def test_the_shim_is_installed_exactly_where_torchvision_ops_do_not_load() -> None:
    """tests/conftest.py installed the shim first: it holds the schemas here exactly when
    torchvision's compiled ops do not load against this torch (the CPU torch of these
    machines), and the check says so without raising."""
    loaded = torchvision_shim._load_compiled_ops()
    assert isinstance(loaded, bool)
    assert (torchvision_shim._LIBRARY is None) == loaded
    assert torch._C._jit_get_schemas_for_operator("torchvision::nms")
