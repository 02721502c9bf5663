"""ONNX export of a converted or deployed model, checked in ONNX Runtime.

A deployed GhostModule exports as Conv -> depthwise Conv -> Concat -> Add (the folded biases as
one per-channel add after the concatenation), which ONNX Runtime's CPU provider runs in its
blocked layout without reordering between the two convolutions.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ConversionError
from ..inputs import as_args
from ..utils import describe_error

DEFAULT_OPSET = 18
# protobuf caps one message at 2 GiB; weights past this margin below it go to a .data file.
SINGLE_FILE_BYTES = 2**31 - 2**26


def external_data_path(path: str | Path) -> Path:
    """Where ``export_onnx`` puts the weights of a model too large for one file."""
    return Path(f"{path}.data")


def _tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    check: bool = True,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` (eval mode) to ``path`` as ONNX and, with ``check``, verify it in ORT.

    Uses torch's ``torch.export``-based exporter. The file is self-contained unless the weights
    pass protobuf's 2 GB limit (``external_data=None``: decided by their size; True or False to
    choose): then they go to ``external_data_path(path)`` (``model.onnx.data``) beside it, which
    must travel with it. With ``dynamic_batch`` the first dimension of
    every tensor input may vary at run time (a batch of one is traced as a batch of two, since
    torch.export would otherwise fix it to one). The check runs the file in onnxruntime on
    ``example_inputs`` and compares every output with eager PyTorch's.
    """
    args = as_args(example_inputs)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise ConfigError("export_onnx takes tensor example_inputs (a tensor or tuple of tensors)")
    if model.training:
        raise ConfigError("export_onnx needs a model in eval mode: call model.eval() first")
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"folder {str(path.parent)!r} for the ONNX file does not exist")
    if external_data is None:
        external_data = _tensor_bytes(model) > SINGLE_FILE_BYTES
    external_data_path(path).unlink(missing_ok=True)  # a stale one from an earlier export
    names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    dynamic, traced = None, args
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic = tuple({0: batch} for _ in args)
        # torch.export specialises a dimension of size 1; trace with a batch of two instead.
        traced = tuple(a.expand(2, *a.shape[1:]).clone() if a.shape[0] == 1 else a for a in args)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                traced,
                str(path),
                input_names=names,
                opset_version=opset,
                dynamo=True,
                external_data=external_data,
                dynamic_shapes=dynamic,
                verbose=False,
            )
    except Exception as error:
        raise ConversionError(f"ONNX export failed: {describe_error(error)}") from error
    if check:
        check_onnx(path, model, args)
    return path


def check_onnx(path: str | Path, model: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    """Run ``path`` in onnxruntime (CPU) on ``args``; every output must match eager PyTorch's."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "checking an ONNX file needs onnxruntime: pip install 'ghostify[deploy]'"
        ) from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {
        item.name: arg.detach().cpu().numpy()
        for item, arg in zip(session.get_inputs(), args, strict=True)
    }
    outputs = session.run(None, feeds)
    with torch.no_grad():
        expected = [
            t for t in torch.utils._pytree.tree_leaves(model(*args)) if isinstance(t, torch.Tensor)
        ]
    if len(outputs) != len(expected):
        raise ConversionError(
            f"the ONNX model gives {len(outputs)} outputs, PyTorch {len(expected)}"
        )
    for got, want in zip(outputs, expected, strict=True):
        scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
        try:
            torch.testing.assert_close(
                torch.from_numpy(got), want.cpu(), rtol=1e-3, atol=1e-4 * scale
            )
        except AssertionError as error:
            raise ConversionError(
                f"the ONNX model's outputs differ from PyTorch's in onnxruntime: "
                f"{describe_error(error)}"
            ) from None
