"""Exceptions ghostify raises, so callers can catch ours apart from PyTorch's, and its warnings."""


class GhostifyError(Exception):
    """Base class of every error ghostify raises on purpose."""


class ConfigError(GhostifyError, ValueError):
    """An argument has a value ghostify cannot accept; the message names it and what would do."""


class PlanError(GhostifyError, ValueError):
    """A conversion plan does not fit the model it is applied to."""


class ConversionError(GhostifyError, RuntimeError):
    """Building or checking a replacement failed; the model was left exactly as it was."""


class TrainedWeightsWarning(UserWarning):
    """A model that looks trained is converted without calibration data (data-free), which
    loses much of what it learnt; silence with
    ``warnings.filterwarnings("ignore", category=ghostify.TrainedWeightsWarning)``."""


class CalibrationMemoryError(ConfigError):
    """A calibration cannot fit its memory budget, not even with the bounded methods and spilling.

    Raised before any change to the model; the message names the layer, the bytes it needs at
    least and the budget (``Calibration(memory_budget=...)``). ``layer``, ``needed`` and
    ``budget`` hold the same as attributes.
    """

    def __init__(self, message: str, layer: str, needed: int, budget: int) -> None:
        super().__init__(message)
        self.layer = layer
        self.needed = needed
        self.budget = budget
