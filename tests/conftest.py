"""Shared test settings (deterministic seeds, a hypothesis profile sized for a 2-core CI box) and
helpers the test files share as fixtures."""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis

# Timings measured by the tests go to a fresh folder, never into the user's own cache.
os.environ["GHOSTIFY_TIMING_CACHE"] = tempfile.mkdtemp(prefix="ghostify-timing-")

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# One torch thread per xdist worker: the workers already fill the cores, and OpenMP threads
# beyond them spin-wait (two processes training the digits CNN side by side ran about 10x
# slower at 2 threads each than at 1 on the 2-core box).
_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
torch.set_num_threads(max(1, min(_THREADS, torch.get_num_threads())))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # The processes tests start (the CLI, the examples, zoo workers) get one thread too, for the
    # same reason: at torch's default, one thread per core, they spin against the other worker.
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _fvcore_macs(model: nn.Module, inputs: torch.Tensor | tuple, batchnorm: bool = True) -> int:
    """MACs of ``model(*inputs)`` counted by fvcore directly, independently of ghostify.report."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    analysis = FlopCountAnalysis(copy.deepcopy(model).eval(), args)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    # Without BatchNorm: the total less what fvcore's own batch_norm handle counted.
    left_out = 0 if batchnorm else analysis.by_operator().get("batch_norm", 0)
    return int(analysis.total()) - int(left_out)


@pytest.fixture(scope="session")
def fvcore_macs() -> Callable[..., int]:
    """The independent fvcore MAC counter: ``fvcore_macs(model, x, batchnorm=True)``."""
    return _fvcore_macs


@pytest.fixture(scope="session")
def digits_teacher() -> tuple[nn.Sequential, tuple[torch.Tensor, ...]]:
    """The digits CNN (ghostify.testing.digits) trained briefly: 3 epochs, 640 images; the data."""
    from ghostify.testing import digits

    torch.manual_seed(0)
    data = digits.load()
    model = digits.train(digits.make_cnn(), data[0][:640], data[1][:640], epochs=3).eval()
    assert digits.accuracy(model, data[2], data[3]) > 0.85  # it did learn
    return model, data


# pytest-xdist runs with --dist loadfile (pyproject): the tests of one file stay on one worker
# (they share module-scoped fixtures, e.g. a trained CNN), except in these files, whose tests are
# independent and long (zoo models, doc builds, examples in subprocesses): one worker running a
# whole such file set the suite's time while the other sat idle. (xdist's loadgroup would say
# this with markers, but xdist 3.8 sets a node id attribute that pytest 9 no longer reads.)
SPREAD_FILES = {"test_zoo.py", "test_docs.py", "test_examples.py", "test_readme.py"}


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    if config.getvalue("dist") != "loadfile":
        return None  # another --dist given on the command line: xdist's own scheduler
    from xdist.scheduler import LoadScopeScheduling

    class FileOrTestScheduling(LoadScopeScheduling):
        """loadfile, but each test of SPREAD_FILES is a unit of its own."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return nodeid if path.rsplit("/", 1)[-1] in SPREAD_FILES else path

    return FileOrTestScheduling(config, log)
