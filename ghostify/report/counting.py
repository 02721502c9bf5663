"""MAC and parameter counts of one model: fvcore first, PyTorch's FlopCounterMode as fallback.

fvcore counts one fused multiply-add as one "flop", so every figure here is in MACs. PyTorch's
``FlopCounterMode`` counts 2 FLOPs per MAC; its figures are halved on the way in.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from ..utils import describe_error

with warnings.catch_warnings():
    # fvcore.nn scripts its focal loss on import, which PyTorch now flags as deprecated.
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis, parameter_count
    from fvcore.nn.jit_handles import conv_flop_count, get_shape

FVCORE = "fvcore.nn.FlopCountAnalysis"
FLOP_COUNTER = "torch.utils.flop_counter.FlopCounterMode"

# fvcore's operator names (after dropping "aten::") in the two families the cross-check compares.
_FVCORE_CONV = ("conv",)
_FVCORE_LINEAR = ("linear", "addmm", "mm", "matmul", "bmm", "einsum")
_TORCH_LINEAR = ("mm", "addmm", "bmm", "baddbmm")

# Operators fvcore reports as unsupported although they do no arithmetic: they only move data.
DATA_MOVEMENT_OPS = frozenset(
    {
        "aten::index_select",
        "aten::max_pool2d",
        "aten::max_pool1d",
        "aten::max_pool3d",
        "aten::adaptive_max_pool2d",
        "aten::pad",
        "aten::repeat",
        "aten::pixel_shuffle",
        "aten::channel_shuffle",
        "aten::flip",
    }
)


@dataclass
class MacCount:
    """What one counter measured on one model, in MACs, with what it could not count."""

    counter: str  # FVCORE or FLOP_COUNTER
    total: int
    by_module: dict[str, int]
    by_operator: dict[str, int]
    conv: int  # MACs of convolutions
    linear: int  # MACs of linear layers and matrix products
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    batchnorm_included: bool = False


class InputsRejected(RuntimeError):
    """The model raised when run on the example inputs (not a counting problem)."""


def clone_args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Fresh copies of the tensors in ``args``, so a forward that writes in place cannot leak."""
    return tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, args)


@contextmanager
def _quiet_fvcore() -> Iterator[None]:
    """Mute fvcore's logger; its unsupported-op counts stay available through the analysis."""
    logger = logging.getLogger("fvcore")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _convolution_mode_macs(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """fvcore handle for ``aten::_convolution_mode`` (input, weight, bias, stride, padding: str,
    dilation, groups): the same count as fvcore's own for ``aten::_convolution``."""
    shapes = [get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0])]
    return Counter({"conv": conv_flop_count(*shapes, transposed=False)})


def _no_macs(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    return Counter()


def fvcore_count(
    model: nn.Module, args: tuple[Any, ...], *, include_batchnorm: bool = True
) -> MacCount:
    """Count ``model(*args)`` with fvcore's FlopCountAnalysis (raises if tracing fails)."""
    analysis = (
        FlopCountAnalysis(model, clone_args(args))
        .tracer_warnings("none")
        .unsupported_ops_warnings(False)
        .uncalled_modules_warnings(False)
    )
    # A conv with string padding ("same"/"valid") traces as aten::_convolution_mode, which
    # fvcore has no handle for: it would count nothing for it (timm's and HF's TF-ported nets).
    analysis.set_op_handle("aten::_convolution_mode", _convolution_mode_macs)
    if not include_batchnorm:
        # A handle counting nothing: set_op_handle(name, None) only marks the op ignored, and
        # fvcore's default handle for it stays and still counts.
        analysis.set_op_handle("aten::batch_norm", _no_macs)
    with _quiet_fvcore(), torch.no_grad():
        by_module = {name: int(value) for name, value in analysis.by_module().items()}
        by_operator = {op: int(value) for op, value in analysis.by_operator().items()}
        unsupported = dict(analysis.unsupported_ops())
    return MacCount(
        counter=FVCORE,
        total=int(analysis.total()),
        by_module=by_module,
        by_operator=dict(sorted(by_operator.items())),
        conv=sum(by_operator.get(op, 0) for op in _FVCORE_CONV),
        linear=sum(by_operator.get(op, 0) for op in _FVCORE_LINEAR),
        unsupported_ops=dict(sorted(unsupported.items())),
        batchnorm_included=include_batchnorm and "batch_norm" in by_operator,
    )


def flop_counter_count(model: nn.Module, args: tuple[Any, ...]) -> MacCount:
    """Count ``model(*args)`` with PyTorch's FlopCounterMode, halved to MACs.

    Raises InputsRejected when the model itself fails on ``args``: this is a plain eager forward,
    so a failure here is the model's answer to the inputs, not a limit of the counter.
    """
    mode = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), mode, warnings.catch_warnings():
            # The counter's global module hooks make torch.compile'd submodules warn; harmless.
            warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)`")
            model(*clone_args(args))
    except Exception as error:
        raise InputsRejected(describe_error(error)) from error
    counts = mode.get_flop_counts()
    root = type(model).__name__
    by_module: dict[str, int] = {}
    for key, ops in counts.items():
        if key == "Global":
            continue
        # ModuleTracker names modules "<RootClass>.child.grandchild"; fvcore names them "child..."
        name = "" if key == root else key.removeprefix(root + ".")
        by_module[name] = sum(ops.values()) // 2
    by_operator: dict[str, int] = {}
    for packet, flops in counts.get("Global", {}).items():
        op = str(packet).split(".")[-1]  # "aten.convolution" -> "convolution"
        by_operator[op] = by_operator.get(op, 0) + flops // 2
    return MacCount(
        counter=FLOP_COUNTER,
        total=mode.get_total_flops() // 2,
        by_module=by_module,
        by_operator=dict(sorted(by_operator.items())),
        conv=sum(v for op, v in by_operator.items() if "convolution" in op),
        linear=sum(by_operator.get(op, 0) for op in _TORCH_LINEAR),
        batchnorm_included=False,
    )


def count_params(model: nn.Module) -> dict[str, int]:
    """fvcore's parameter_count: parameters per module name ("" is the whole model)."""
    return {name: int(value) for name, value in parameter_count(model).items()}
