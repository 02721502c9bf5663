"""What a timing depends on besides the layer: the hardware, the libraries, the threads.

A latency measured on one machine says nothing about another, nor about the same machine with
another PyTorch, ONNX Runtime or thread count, nor after the GhostModule's own code changed.
``environment`` names all of that; the disk cache keeps one file per environment.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from ..utils import package_version

RUNTIMES = ("eager", "onnxruntime")


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor``), with the
    family/model/stepping numbers where Linux gives them (names alone can be generic)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "stepping") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break  # the first processor's block is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    numbers = "/".join(fields[k] for k in ("cpu family", "model", "stepping") if k in fields)
    return f"{name} ({numbers})" if numbers else name


def device_name(device: torch.device) -> str:
    """The hardware behind ``device``: the GPU's name, or the CPU's with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{cpu_name()} x{os.cpu_count()}"
    return device.type


@functools.cache
def layers_source_hash() -> str:
    """A hash of the source of ``ghostify.layers``: a changed GhostModule forward is a changed
    layer, so its old timings must not be reused."""
    digest = hashlib.sha1()
    folder = Path(__file__).resolve().parent.parent / "layers"
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def environment(runtime: str, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Everything besides the layer, its input shape, dtype and layout that a timing depends on."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "runtime": runtime,
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ghostify_layers": layers_source_hash(),
        "python": platform.python_version(),
    }
    if runtime == "onnxruntime":
        env["onnxruntime"] = package_version("onnxruntime")
    return env


def environment_id(env: dict[str, Any]) -> str:
    """A short stable name for ``env`` (the cache's file name)."""
    text = json.dumps(env, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]
