"""Keeping what the trained model knows: calibrated conversion and distillation fine-tuning.

``convert(model, calibration_data=...)`` fits the new layers on real data (``calibrate``);
``DistillationLoss`` (``distill``) and ``finetune`` train the converted model from the original.
All of it works under torch.distributed (``distributed``).
"""

from .calibrate import Calibration
from .distill import DistillationLoss
from .finetune import finetune
from .observers import layer_statistics

__all__ = ["Calibration", "DistillationLoss", "finetune", "layer_statistics"]
