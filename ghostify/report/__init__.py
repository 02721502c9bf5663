"""The savings report: counting (fvcore), measuring both models, the data model, rendering."""

from .measure import counting_copy, rebuild_original, report
from .model import LayerSaving, SkippedLayer
from .render import human
from .savings import SavingsReport

__all__ = [
    "LayerSaving",
    "SavingsReport",
    "SkippedLayer",
    "counting_copy",
    "human",
    "rebuild_original",
    "report",
]
