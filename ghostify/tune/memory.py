"""How much memory a calibration may hold, and what one layer's fit needs of it.

The default budget is half the memory available when the calibration starts (``psutil``'s
``available``, else ``MemAvailable`` in ``/proc/meminfo``, else 4 GiB), or 80% of the free device
memory on CUDA, and at least the smaller of 1 GiB and a tenth of the total: the rest stays for
the model, its frozen copy, one batch's transient tensors and the other processes. It follows
the machine's state, and the fit methods follow the budget: pass ``memory_budget`` for the same
methods on every run. What is counted against it: the activations kept between
stages, the statistics and the solver's workspace (``ghostify/tune/schedule.py`` estimates them
before the work starts).
"""

from __future__ import annotations

import torch

from ..errors import CalibrationMemoryError

GIB = 2**30
_FALLBACK = 4 * GIB


def _memory(device: torch.device | None) -> tuple[int, int]:
    """(available, total) bytes where the calibration works: device memory on CUDA, else host."""
    if device is not None and device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    try:
        import psutil

        memory = psutil.virtual_memory()
        return int(memory.available), int(memory.total)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo}
        return fields["MemAvailable"], fields["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        return _FALLBACK, 2 * _FALLBACK


def available_memory(device: torch.device | None = None) -> int:
    """Free memory where the calibration works: device memory on CUDA, else host memory."""
    return _memory(device)[0]


def default_budget(device: torch.device | None = None) -> int:
    """The budget when none is given: 50% of available host memory (80% of free CUDA memory),
    and at least the smaller of 1 GiB and a tenth of the total (a busy machine's momentary
    low should not refuse a calibration that fits)."""
    available, total = _memory(device)
    share = 0.8 if device is not None and device.type == "cuda" else 0.5
    return int(max(share * available, min(GIB, 0.1 * total)))


def refuse(layer: str, needed: int, budget: int, what: str) -> CalibrationMemoryError:
    """The error for a layer that does not fit even in its smallest form."""
    return CalibrationMemoryError(
        f"calibrating {layer!r} needs at least {format_bytes(needed)} ({what}) but "
        f"memory_budget is {format_bytes(budget)}; raise Calibration(memory_budget=...), "
        "use smaller calibration batches (batch_size=), or exclude the layer",
        layer,
        needed,
        budget,
    )


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
