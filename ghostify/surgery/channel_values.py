"""What the coupling walk knows of one value of the graph: which channel spaces it holds, how.

A tensor's channels (dim 1) are a sequence of spaces: one for a layer's output, several after a
concatenation. Pooling to one pixel and flattening keep the channels (then the last axis of an
``(N, C)`` tensor, which a linear layer reads); other reshapes lose track of them.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import ACTIVATION_FUNCTIONS, ACTIVATION_METHODS

# Modules with a tensor per channel, permuted along dim 0 with the channels they see.
THROUGH_MODULES = (nn.modules.batchnorm._BatchNorm, nn.PReLU)  # and frozen BatchNorms
# Modules acting on each channel alone, with no per-channel tensor.
CHANNEL_MODULES = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.Upsample,
    nn.modules.dropout._DropoutNd,
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
)
# Ops combining tensors element by element: two tensors meeting there share one order.
ELEMENTWISE_FUNCTIONS = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.isub,
    operator.mul,
    operator.imul,
    operator.truediv,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.subtract,
    torch.mul,
    torch.multiply,
    torch.div,
    torch.true_divide,
    torch.maximum,
    torch.minimum,
}
ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
UNARY_FUNCTIONS = {
    *ACTIVATION_FUNCTIONS,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.interpolate,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.softplus,
    F.relu6,
    torch.clamp,
    torch.abs,
    torch.exp,
    torch.square,
    torch.sqrt,
    torch.neg,
    operator.neg,
}
UNARY_METHODS = {
    *ACTIVATION_METHODS,
    "sigmoid_",
    "tanh_",
    "contiguous",
    "clone",
    "detach",
    "float",
    "half",
    "bfloat16",
    "to",
    "abs",
    "exp",
    "neg",
    "square",
    "sqrt",
}
METADATA_METHODS = {"size", "dim", "numel", "ndimension", "get_device"}
METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}
SCALAR_MODULES = {"operator", "_operator", "builtins", "math"}

# Per-channel tensors of the THROUGH_MODULES (those a module lacks are skipped).
THROUGH_TENSORS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class Channels:
    """A tensor whose channel axis holds ``spaces`` one after the other."""

    spaces: tuple[int, ...]
    flat: bool = False  # an (N, C) tensor: the channels are its last axis
    unit: bool = False  # every spatial size is 1 (after a global pool)
    ndim: int | None = None  # the tensor's dimensions, when known

    def with_spaces(self, spaces: tuple[int, ...]) -> Channels:
        return dataclasses.replace(self, spaces=spaces)

    def with_unit(self, unit: bool) -> Channels:
        return dataclasses.replace(self, unit=unit)


def is_unit_pool(module: nn.Module) -> bool:
    """An adaptive pool to one pixel (``AdaptiveAvgPool2d(1)``, ``((1, 1))``)."""
    if not isinstance(
        module, nn.modules.pooling._AdaptiveAvgPoolNd | nn.modules.pooling._AdaptiveMaxPoolNd
    ):
        return False
    return all_ones(module.output_size)


def all_ones(size: Any) -> bool:
    if isinstance(size, int):
        return size == 1
    return isinstance(size, list | tuple) and bool(size) and all(s == 1 for s in size)


def flattened(value: Channels) -> Channels | None:
    """``value`` flattened from dim 1: the same channels when every spatial size is 1."""
    if value.flat:
        return value
    if not value.unit:
        return None
    return dataclasses.replace(value, flat=True, unit=False, ndim=2)


def flattens(node: fx.Node) -> bool:
    """``x.flatten(1)``, ``torch.flatten(x, 1)``, ``x.view(n, -1)`` or ``x.reshape(n, -1)``."""
    args = node.args[1:]
    if getattr(node.target, "__name__", node.target) == "flatten":
        start = args[0] if args else node.kwargs.get("start_dim", 0)
        end = args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    shape = args[0] if len(args) == 1 and isinstance(args[0], list | tuple) else args
    return len(shape) == 2 and shape[1] == -1


def reduced(node: fx.Node, value: Channels) -> Channels | None:
    """``x.mean(dims)`` (or sum, amax) over exactly the spatial axes keeps the channels."""
    if value.ndim is None or value.flat:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dims = (dims,) if isinstance(dims, int) else dims
    if not isinstance(dims, list | tuple) or not all(isinstance(d, int) for d in dims):
        return None
    if {d % value.ndim for d in dims} != set(range(2, value.ndim)):
        return None
    if keepdim:
        return value.with_unit(True)
    return dataclasses.replace(value, flat=True, unit=False, ndim=2)


def cat_dim(node: fx.Node, inputs: list[Channels]) -> int | None:
    """The axis a concatenation joins, as a channel axis (1), or None when it is another."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(dim, int):
        return None
    if dim == 1:
        return 1
    if dim == -1 and all(value.flat for value in inputs):
        return 1
    return None
