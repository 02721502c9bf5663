"""ghostify: rewrite a model's convolutions as GhostModules, in place, and report the savings.

The package follows the pipeline: ``layers`` (GhostModule and blocks), ``fit`` (fitting a
GhostModule to the layer it replaces), ``surgery`` (discover, select, build, swap, record),
``report`` (counting and rendering the savings), ``io`` (checkpoints, model SPECs), ``tune``
(calibrated conversion, distillation fine-tuning) and ``deploy`` (the fastest inference form).
"""

from importlib.metadata import PackageNotFoundError, version

from .deploy import DeployRecord, deploy, deploy_record, export_onnx
from .errors import ConfigError, ConversionError, GhostifyError, PlanError
from .fit import fit
from .layers import (
    ConvType,
    GhostBottleneck,
    GhostModule,
    GhostModule1d,
    GhostModule3d,
    SELayer,
    register_conv_type,
    slice_output_channels,
    unregister_conv_type,
)
from .pipeline import convert
from .report import SavingsReport, report
from .surgery import ConversionRecord, original_model, plan_of, record_of
from .surgery.selection import Selection
from .tune import Calibration, DistillationLoss, finetune

try:
    __version__ = version("ghostify")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Calibration",
    "ConfigError",
    "ConvType",
    "ConversionError",
    "ConversionRecord",
    "DeployRecord",
    "DistillationLoss",
    "GhostBottleneck",
    "GhostModule",
    "GhostModule1d",
    "GhostModule3d",
    "GhostifyError",
    "PlanError",
    "SELayer",
    "SavingsReport",
    "Selection",
    "__version__",
    "convert",
    "deploy",
    "deploy_record",
    "export_onnx",
    "finetune",
    "fit",
    "original_model",
    "plan_of",
    "record_of",
    "register_conv_type",
    "report",
    "slice_output_channels",
    "unregister_conv_type",
]
