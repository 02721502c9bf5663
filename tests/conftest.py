"""Shared test settings: deterministic seeds and a hypothesis profile sized for a 2-core CI box."""

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_teacher() -> tuple[nn.Sequential, tuple[torch.Tensor, ...]]:
    """The digits CNN of benchmarks/digits.py trained briefly (3 epochs, 640 images), the data."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import digits

    torch.manual_seed(0)
    data = digits.load()
    model = digits.train(digits.make_cnn(), data[0][:640], data[1][:640], epochs=3).eval()
    assert digits.accuracy(model, data[2], data[3]) > 0.85  # it did learn
    return model, data
