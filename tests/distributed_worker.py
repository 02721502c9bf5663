"""Worker for tests/test_distributed.py: calibrate and fine-tune on this rank's shard, save weights.

    python -m torch.distributed.run --standalone --nproc_per_node 2 distributed_worker.py OUT
    python distributed_worker.py OUT          # the same on one process, all the data

Rank r of n reads samples r, r + n, r + 2n, ...; one process reads them all, so the two runs
see the same data and, the statistics being sums, must end with the same weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import ghostify


def calibration_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


def finetune_model() -> nn.Sequential:
    """No BatchNorm: in training mode each rank would normalise with its own batch (as in DDP)."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def main(out: Path) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:256], dtype=torch.float32).unsqueeze(1) / 16
    # Global batch b holds samples 64b .. 64b + 63 on one process, split between the ranks.
    shard = images[rank::world]
    per_rank = 64 // world

    model = calibration_model()
    calibration = ghostify.Calibration(
        list(shard.split(per_rank)), batch_size=per_rank, memory_budget=2**30
    )
    ghostify.convert(model, calibration_data=calibration)
    student = ghostify.convert(finetune_model())
    ghostify.finetune(student, list(shard.split(per_rank)), epochs=2, lr=3e-3, progress=False)
    weights = {f"calibrated.{k}": v for k, v in model.state_dict().items()}
    weights.update({f"finetuned.{k}": v for k, v in student.state_dict().items()})
    torch.save(weights, out / f"rank{rank}-of{world}.pt")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
