"""ghostify: rewrite a model's convolutions as GhostModules, in place, and report the savings.

The package follows the pipeline: ``layers`` (GhostModule and blocks), ``fit`` (fitting a
GhostModule to the layer it replaces), ``surgery`` (discover, select, build, swap, record),
``report`` (counting and rendering the savings), ``io`` (checkpoints, model SPECs), ``tune``
(calibrated conversion, distillation fine-tuning) and ``deploy`` (the fastest inference form).
"""

# Public names are imported on first use (PEP 562), so that `import ghostify` and the command
# line's argument checks run without importing torch: a usage error answers at once. Add a public
# name here (and under TYPE_CHECKING below), never as a top-level import.
from __future__ import annotations

import importlib
import sys
import types
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, ConversionError, GhostifyError, PlanError, TrainedWeightsWarning

_LAZY = {
    "Budget": ".budget",
    "BudgetPlan": ".budget",
    "budget_plan": ".budget",
    "plan_budget": ".budget",
    "Calibration": ".tune",
    "ConvType": ".layers",
    "ConversionRecord": ".surgery",
    "DeployRecord": ".deploy",
    "DistillationLoss": ".tune",
    "GhostBottleneck": ".layers",
    "GhostModule": ".layers",
    "GhostModule1d": ".layers",
    "GhostModule3d": ".layers",
    "SELayer": ".layers",
    "SavingsReport": ".report",
    "Selection": ".surgery.selection",
    "convert": ".pipeline",
    "deploy": ".deploy",
    "deploy_record": ".deploy",
    "export_onnx": ".deploy",
    "finetune": ".tune",
    "fit": ".fit",
    "load_calibration_data": ".io.data",
    "original_model": ".surgery",
    "plan_of": ".surgery",
    "record_of": ".surgery",
    "register_conv_type": ".layers",
    "report": ".report",
    "slice_output_channels": ".layers",
    "trained_evidence": ".trained",
    "unregister_conv_type": ".layers",
}

if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from .budget import Budget, BudgetPlan, budget_plan, plan_budget
    from .deploy import DeployRecord, deploy, deploy_record, export_onnx
    from .fit import fit
    from .io.data import load_calibration_data
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
    from .trained import trained_evidence
    from .tune import Calibration, DistillationLoss, finetune

try:
    __version__ = version("ghostify")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"


class _Package(types.ModuleType):
    """The package's module type: keeps ``ghostify.deploy``, ``.fit`` and ``.report`` the
    functions they are named after when their sub-packages get imported (which binds the
    sub-package under its name here), as the eager imports of old left them."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


_SHADOWED = ("deploy", "fit", "report")
sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    """Import a public name (or a sub-module, as ``ghostify.tune``) the first time it is used."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise  # the sub-module exists but needs something missing: say that
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value  # later lookups find it directly
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Budget",
    "BudgetPlan",
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
    "TrainedWeightsWarning",
    "__version__",
    "budget_plan",
    "convert",
    "deploy",
    "deploy_record",
    "export_onnx",
    "finetune",
    "fit",
    "load_calibration_data",
    "original_model",
    "plan_budget",
    "plan_of",
    "record_of",
    "register_conv_type",
    "report",
    "slice_output_channels",
    "trained_evidence",
    "unregister_conv_type",
]
