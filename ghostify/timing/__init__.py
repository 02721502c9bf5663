"""Per-layer latency, measured robustly and cached on disk: the timing database.

A low-level package (it builds on ``ghostify.layers`` only) used wherever a decision depends on
how fast a layer form runs here: ``convert(only_faster=True)``, ``report(latency=True)``, the
budget solver, and deploy's choice between forms.

    from ghostify.timing import TimingDatabase, module_key
    database = TimingDatabase("eager")              # or "onnxruntime"
    ms = database.time({"conv": conv, "ghost": ghost}, (8, 64, 56, 56))
"""

from .cache import ENV_VAR, TimingCache, default_folder
from .database import FormSource, TimingDatabase, entry_key, module_key
from .environment import RUNTIMES, environment
from .measure import time_interleaved
from .runtimes import LAYOUTS, export_bytes, onnx_session, runner

__all__ = [
    "ENV_VAR",
    "LAYOUTS",
    "RUNTIMES",
    "FormSource",
    "TimingCache",
    "TimingDatabase",
    "default_folder",
    "entry_key",
    "environment",
    "export_bytes",
    "module_key",
    "onnx_session",
    "runner",
    "time_interleaved",
]
