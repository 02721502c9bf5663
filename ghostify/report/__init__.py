"""The savings report: counting (fvcore), measuring both models, the data model, rendering."""

from .measure import counting_copy, rebuild_original, report
from .model import LayerSaving, SavingsReport, SkippedLayer
from .render import human

__all__ = [
    "LayerSaving",
    "SavingsReport",
    "SkippedLayer",
    "counting_copy",
    "human",
    "rebuild_original",
    "report",
]
