"""ghostify: rewrite a model's Conv2d layers as GhostModules, in place, and report the savings."""

from importlib.metadata import PackageNotFoundError, version

from .bottleneck import GhostBottleneck
from .convert import convert
from .errors import ConfigError, ConversionError, GhostifyError, PlanError
from .ghost_module import GhostModule
from .plan import plan_of
from .report import SavingsReport, report
from .se_layer import SELayer

try:
    __version__ = version("ghostify")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "ConfigError",
    "ConversionError",
    "GhostBottleneck",
    "GhostModule",
    "GhostifyError",
    "PlanError",
    "SELayer",
    "SavingsReport",
    "__version__",
    "convert",
    "plan_of",
    "report",
]
