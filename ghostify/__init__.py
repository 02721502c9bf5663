"""ghostify: rewrite a model's Conv2d layers as GhostModules, in place, and report the savings.

The package follows the pipeline: ``layers`` (GhostModule and blocks), ``fit`` (fitting a
GhostModule to the layer it replaces), ``surgery`` (discover, select, build, swap, record),
``report`` (counting and rendering the savings), ``io`` (checkpoints, model SPECs), ``tune``
(calibrated conversion, distillation fine-tuning) and ``deploy`` (the fastest inference form).
"""

from importlib.metadata import PackageNotFoundError, version

from .errors import ConfigError, ConversionError, GhostifyError, PlanError
from .fit import fit
from .layers import GhostBottleneck, GhostModule, SELayer
from .report import SavingsReport, report
from .surgery import ConversionRecord, convert, original_model, plan_of, record_of
from .tune import Calibration, DistillationLoss, finetune

try:
    __version__ = version("ghostify")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Calibration",
    "ConfigError",
    "ConversionError",
    "ConversionRecord",
    "DistillationLoss",
    "GhostBottleneck",
    "GhostModule",
    "GhostifyError",
    "PlanError",
    "SELayer",
    "SavingsReport",
    "__version__",
    "convert",
    "finetune",
    "fit",
    "original_model",
    "plan_of",
    "record_of",
    "report",
]
