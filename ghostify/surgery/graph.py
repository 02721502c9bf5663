"""What surrounds each convolution: its producers and consumers, typed, from the fx graph.

Discovery keeps the fx graph(s) it traced; later passes ask them who consumes a converted layer's
output (channel-order folding, BatchNorm folding in deploy) instead of tracing again.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

# Neighbour kinds. "activation" covers every op that acts on each element (or channel) alone.
BATCHNORM = "batchnorm"
ACTIVATION = "activation"
CONV = "conv"
LINEAR = "linear"
ADD = "add"
CAT = "cat"
RESHAPE = "reshape"
OUTPUT = "output"
INPUT = "input"
OTHER = "other"

ACTIVATION_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
)
ACTIVATION_FUNCTIONS = {
    F.relu,
    F.relu_,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.dropout,
    torch.relu,
    torch.relu_,
    torch.sigmoid,
    torch.tanh,
}
ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_"}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_RESHAPE = {torch.flatten, torch.reshape, "view", "reshape", "flatten", "permute", "transpose"}


@dataclass(frozen=True)
class Neighbour:
    """A node next to a convolution in the graph: its kind and what it calls."""

    kind: str
    target: str  # qualified module name, or the function / method name

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"


def node_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The kind of ``node`` (one of the module constants above)."""
    if node.op == "placeholder":
        return INPUT
    if node.op == "output":
        return OUTPUT
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return BATCHNORM
        if isinstance(module, ACTIVATION_MODULES):
            return ACTIVATION
        if isinstance(module, nn.modules.conv._ConvNd) or hasattr(module, "primary_conv"):
            return CONV
        if isinstance(module, nn.Linear):
            return LINEAR
        return OTHER
    target = node.target
    if target in _ADD:
        return ADD
    if target in _CAT:
        return CAT
    if target in _RESHAPE:
        return RESHAPE
    if target in ACTIVATION_FUNCTIONS or (
        node.op == "call_method" and target in ACTIVATION_METHODS
    ):
        return ACTIVATION
    return OTHER


def neighbour(node: fx.Node, modules: dict[str, nn.Module], prefix: str) -> Neighbour:
    """``node`` as a Neighbour, module names qualified from the model's root."""
    if node.op == "call_module":
        target = f"{prefix}{node.target}"
    elif node.op in ("call_function", "call_method"):
        target = getattr(node.target, "__name__", str(node.target))
    else:
        target = node.op
    return Neighbour(node_kind(node, modules), target)


@dataclass
class TracedGraph:
    """One fx graph discovery traced: of the whole model (``prefix`` "") or of a submodule."""

    prefix: str  # qualified name of the traced module followed by ".", or ""
    graph: fx.Graph
    root: nn.Module  # the module that was traced

    def modules(self) -> dict[str, nn.Module]:
        """The traced module's submodules by (unprefixed) name, as its graph refers to them."""
        return dict(self.root.named_modules())

    def call_counts(self) -> dict[str, int]:
        """How often each submodule is called in this graph (by unprefixed name)."""
        counts: dict[str, int] = {}
        for node in self.graph.nodes:
            if node.op == "call_module":
                counts[str(node.target)] = counts.get(str(node.target), 0) + 1
        return counts

    def call_sites(self, name: str) -> list[fx.Node]:
        """The nodes calling the module qualified ``name`` (none if it is outside this graph)."""
        if not name.startswith(self.prefix):
            return []
        local = name[len(self.prefix) :]
        return [n for n in self.graph.nodes if n.op == "call_module" and n.target == local]
