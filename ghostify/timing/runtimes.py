"""Running a module in a runtime, as a zero-argument call to time: eager PyTorch or ONNX Runtime.

Eager runs the module in inference mode, in the memory layout asked for. ONNX Runtime runs the
module exported by torch's TorchScript-based exporter (seconds faster per layer than the
``torch.export``-based one, and the same graph for a convolution), in a CPU session with as many
intra-op threads as torch uses, all graph optimisations on.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .environment import RUNTIMES

LAYOUTS = ("contiguous", "channels_last")


def check_runtime(runtime: object) -> str:
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {RUNTIMES}; got {runtime!r}")
    return runtime  # type: ignore[return-value]


def check_layout(layout: object) -> str:
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    return layout  # type: ignore[return-value]


def memory_format(layout: str, dims: int) -> torch.memory_format:
    """torch's memory format for ``layout`` on a tensor of ``dims`` dimensions."""
    if layout == "contiguous" or dims not in (4, 5):
        return torch.contiguous_format
    return torch.channels_last if dims == 4 else torch.channels_last_3d


def runner(
    module: nn.Module, args: tuple[torch.Tensor, ...], runtime: str, layout: str = "contiguous"
) -> Callable[[], Any]:
    """A call that runs ``module(*args)`` in ``runtime`` (``module`` in eval mode)."""
    module.eval()
    if runtime == "eager":
        if layout != "contiguous":
            fmt = memory_format(layout, args[0].dim())
            module.to(memory_format=fmt)
            args = tuple(a.contiguous(memory_format=fmt) for a in args)

        def call() -> Any:
            with torch.inference_mode():
                return module(*args)

        return call
    session = onnx_session(export_bytes(module, args))
    feeds = {
        item.name: arg.detach().cpu().numpy()
        for item, arg in zip(session.get_inputs(), args, strict=True)
    }
    return lambda: session.run(None, feeds)


def export_bytes(module: nn.Module, args: tuple[torch.Tensor, ...], opset: int = 18) -> bytes:
    """``module`` as an ONNX model (bytes), for timing."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, buffer, opset_version=opset, dynamo=False)
        except Exception:  # a torch without the TorchScript exporter, or a module it rejects
            buffer = io.BytesIO()
            torch.onnx.export(module, args, buffer, opset_version=opset, dynamo=True, verbose=False)
    return buffer.getvalue()


def onnx_session(model: bytes | str) -> Any:
    """An ONNX Runtime CPU session using torch's thread count, every graph optimisation on."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "timing in ONNX Runtime needs onnxruntime: pip install 'ghostify[deploy]'"
        ) from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
