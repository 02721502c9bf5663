"""Network surgery: discover the convolutions, select, build, check, swap, record."""

from .convert import convert
from .plan import plan_of
from .record import ConversionRecord, ConvertedLayer, SkippedConv, original_model, record_of

__all__ = [
    "ConversionRecord",
    "ConvertedLayer",
    "SkippedConv",
    "convert",
    "original_model",
    "plan_of",
    "record_of",
]
