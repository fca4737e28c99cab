"""Transitional, no tests: the loss fixtures moved to tests/loss_models.py.

The backend tests test_tvm_loss_lowering.py and test_loss_decompose.py import them from
here until they import tests.loss_models; this module goes then.
"""

from __future__ import annotations

from tests.loss_models import CASE_NAMES  # noqa: F401
from tests.loss_models import conformance_cases as _cases  # noqa: F401
from tests.loss_models import export_tiny_lm as _export_tiny_lm  # noqa: F401
