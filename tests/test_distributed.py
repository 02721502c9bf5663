"""Two CPU processes under torchrun (gloo, loopback) end with the weights of one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def _run(command: list[str], tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(WORKER.parent.parent),
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    _run([sys.executable, str(WORKER), str(tmp_path)], tmp_path)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    _run([*launcher, "--nproc_per_node", "2", str(WORKER), str(tmp_path)], tmp_path)
    single = torch.load(tmp_path / "rank0-of1.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"rank{r}-of2.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    calibrated = [k for k in single if k.startswith("calibrated.") and "cheap_conv" in k]
    assert calibrated  # the converted layers are there
    for key in single:
        # Every rank holds the very same weights (broadcast from rank 0) ...
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        # ... and they are those of one process on all the data, up to the order of float sums.
        torch.testing.assert_close(ranks[0][key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    # The calibration did change the weights, so the comparison is not between two no-ops.
    assert not torch.equal(single["calibrated.4.running_var"], torch.ones(32))
