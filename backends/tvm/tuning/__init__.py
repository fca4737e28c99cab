"""MetaSchedule tuning of the CPU pipeline: :mod:`.search` (the pipeline stage, the
database, the report) over :mod:`.measure` (building and timing candidates).

>>> compiled = compile("model.onnx", "avx512", tune=64)  # doctest: +SKIP
>>> compiled.tuning.counts()  # doctest: +SKIP
{'tuned': 3, 'reused': 0, 'untuned': 5, 'failed': 0}
"""

from __future__ import annotations

from rewriter.backends.tvm.tuning.measure import Progress, Remote
from rewriter.backends.tvm.tuning.search import (
    CHOICES_FILE,
    TaskResult,
    Tuner,
    TuningReport,
    check_options,
    default_database,
    num_cores,
)

__all__ = [
    "CHOICES_FILE",
    "Progress",
    "Remote",
    "TaskResult",
    "Tuner",
    "TuningReport",
    "check_options",
    "default_database",
    "num_cores",
]
