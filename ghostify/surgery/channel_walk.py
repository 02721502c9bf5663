"""The fx graph walk behind ``coupling``: the channel spaces each value of a traced graph holds.

Every layer's channel axis gets spaces; values met element by element, and a layer called
more than once, unite theirs (union-find), and whatever may mix channels pins them. ``coupling``
turns the united spaces into channel groups.
"""

from __future__ import annotations

import builtins
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..layers.conv_types import TORCH_CONVS, conv_dims, conv_type_of
from ..layers.ghost_module import GhostModule
from .channel_values import (
    CHANNEL_MODULES,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    METADATA_ATTRIBUTES,
    METADATA_METHODS,
    SCALAR_MODULES,
    THROUGH_MODULES,
    UNARY_FUNCTIONS,
    UNARY_METHODS,
    Channels,
    all_ones,
    cat_dim,
    flattened,
    flattens,
    is_unit_pool,
    reduced,
)
from .graph import ACTIVATION_MODULES, TracedGraph
from .leaves import frozen_batchnorms, per_sample_functions

_NON_TENSOR = "non-tensor"  # shapes, sizes, dtypes: never carry channels
_OPAQUE = "opaque"  # a tensor whose channels are not followed (an input, an unknown op's output)
Value = Channels | str


class ChannelSpaces:
    """Union-find over channel spaces, with each set's channel count and pins."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int | None] = []
        self.pins: list[list[str]] = []

    def new(self, size: int | None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.pins.append([])
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        a, b = min(a, b), max(a, b)  # the older space names the set: groups in graph order
        self.parent[b] = a
        self.pins[a] += self.pins[b]
        if self.size[a] is None:
            self.size[a] = self.size[b]
        elif self.size[b] is not None and self.size[b] != self.size[a]:
            self.pins[a].append(f"channel counts {self.size[a]} and {self.size[b]} meet")
        return a

    def pin(self, space: int, reason: str) -> None:
        pins = self.pins[self.find(space)]
        if reason not in pins:
            pins.append(reason)


class ChannelWalk:
    """Assigns every value of the traced graphs its channel spaces (see the module docstring)."""

    def __init__(self) -> None:
        self.spaces = ChannelSpaces()
        # (module, role) -> spaces along its channel axis; role "out", "through" or "in".
        self.axes: dict[tuple[str, str], tuple[int, ...]] = {}
        self.read_directly: set[str] = set()
        self.pooled: set[str] = set()

    # -- graph -----------------------------------------------------------------------------------

    def graph(self, traced: TracedGraph) -> None:
        values: dict[fx.Node, Value] = {}
        modules = dict(traced.root.named_modules())
        for node in traced.graph.nodes:
            values[node] = self._node(node, values, modules, traced.prefix)

    def _node(
        self, node: fx.Node, values: dict[fx.Node, Value], modules: dict, prefix: str
    ) -> Value:
        if node.op == "placeholder":
            return _OPAQUE
        if node.op == "get_attr":
            self.read_directly.add(f"{prefix}{node.target}")
            return _OPAQUE
        if node.op == "output":
            self._pin_all(node, values, "the channels leave the traced graph (its output)")
            return _NON_TENSOR
        if node.op == "call_module":
            module = modules.get(str(node.target))
            return self._module(node, module, f"{prefix}{node.target}", values)
        return self._function(node, values)

    def _inputs(self, node: fx.Node, values: dict[fx.Node, Value]) -> list[Value]:
        return [values[n] for n in node.all_input_nodes]

    def _pin_all(self, node: fx.Node, values: dict[fx.Node, Value], reason: str) -> None:
        for value in self._inputs(node, values):
            if isinstance(value, Channels):
                for space in value.spaces:
                    self.spaces.pin(space, reason)

    def _unknown(self, node: fx.Node, values: dict[fx.Node, Value], what: str) -> Value:
        """An op whose effect on channels is unknown: its channel inputs stay as they are."""
        inputs = self._inputs(node, values)
        if inputs and all(value == _NON_TENSOR for value in inputs) and _scalar_op(node):
            return _NON_TENSOR
        self._pin_all(node, values, f"read by {what}, which may mix channels")
        return _OPAQUE

    # -- modules ---------------------------------------------------------------------------------

    def _module(
        self, node: fx.Node, module: nn.Module | None, name: str, values: dict[fx.Node, Value]
    ) -> Value:
        value = values[node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else None
        if module is None or not isinstance(value, Channels) or len(node.all_input_nodes) != 1:
            if module is not None and _is_writer(module) and len(node.all_input_nodes) == 1:
                return self._write(name, module, None)  # reads the input or an unknown value
            return self._unknown(node, values, f"module {name!r}")
        if isinstance(module, nn.Flatten):
            if module.start_dim == 1 and module.end_dim == -1:
                flat = flattened(value)
                if flat is not None:
                    return flat
            return self._unknown(node, values, f"module {name!r}")
        if is_depthwise(module) or isinstance(module, (*THROUGH_MODULES, *frozen_batchnorms())):
            if isinstance(module, nn.PReLU) and module.num_parameters == 1:
                return value
            return self._through(name, value)
        if isinstance(module, (*ACTIVATION_MODULES, *CHANNEL_MODULES)):
            return value.with_unit(value.unit or is_unit_pool(module))
        if _is_writer(module):
            return self._read(name, module, value, node, values)
        return self._unknown(node, values, f"module {name!r}")

    def _bind(self, name: str, role: str, spaces: tuple[int, ...]) -> tuple[int, ...]:
        """The module's channel axis in ``role`` is ``spaces``: the same on every call."""
        key = (name, role)
        known = self.axes.get(key)
        if known is None:
            self.axes[key] = spaces
            return spaces
        if len(known) != len(spaces):
            for space in (*known, *spaces):
                self.spaces.pin(space, f"{name!r} is called on differently split channels")
            return known
        for a, b in zip(known, spaces, strict=True):
            self.spaces.union(a, b)
        return known

    def _through(self, name: str, value: Channels) -> Channels:
        return value.with_spaces(self._bind(name, "through", value.spaces))

    def _read(
        self,
        name: str,
        module: nn.Module,
        value: Channels,
        node: fx.Node,
        values: dict[fx.Node, Value],
    ) -> Value:
        linear = isinstance(module, nn.Linear)
        if linear and not value.flat:
            return self._unknown(node, values, f"linear layer {name!r} along a spatial axis")
        if not linear and value.flat:
            return self._unknown(node, values, f"convolution {name!r} on flattened channels")
        reason = _input_pin(module)
        if reason is not None:
            for space in value.spaces:
                self.spaces.pin(space, f"read by {name!r}, {reason}")
        else:
            self._bind(name, "in", value.spaces)
        return self._write(name, module, value)

    def _write(self, name: str, module: nn.Module, value: Channels | None) -> Channels:
        linear = isinstance(module, nn.Linear)
        key = (name, "out")
        if key not in self.axes:
            size = module.out_features if linear else module.out_channels
            self.axes[key] = (self.spaces.new(size),)
        dims = module.dims if isinstance(module, GhostModule) else None
        ndim = 2 if linear else (dims or conv_dims(module)) + 2
        unit = bool(value and value.unit)
        if unit or linear:
            self.pooled.add(name)
        return Channels(self.axes[key], flat=linear, unit=unit, ndim=ndim)

    # -- functions and methods -------------------------------------------------------------------

    def _function(self, node: fx.Node, values: dict[fx.Node, Value]) -> Value:
        target = node.target
        what = getattr(target, "__name__", str(target))
        first = node.args[0] if node.args else None
        value = values.get(first) if isinstance(first, fx.Node) else None
        if node.op == "call_method" and target in METADATA_METHODS:
            return _NON_TENSOR
        if target is builtins.getattr:
            if node.args[1] in METADATA_ATTRIBUTES:
                return _NON_TENSOR
            return self._unknown(node, values, f"attribute {node.args[1]!r}")
        if target is operator.getitem and value == _NON_TENSOR:
            return _NON_TENSOR
        if target in ELEMENTWISE_FUNCTIONS or (
            node.op == "call_method" and target in ELEMENTWISE_METHODS
        ):
            return self._elementwise(node, values, what)
        if target in (torch.cat, torch.concat, torch.concatenate):
            return self._cat(node, values)
        if not isinstance(value, Channels):
            return self._unknown(node, values, what)
        others = [values[n] for n in node.all_input_nodes if n is not first]
        if any(other != _NON_TENSOR for other in others):
            return self._unknown(node, values, what)
        if target in UNARY_FUNCTIONS or (node.op == "call_method" and target in UNARY_METHODS):
            return value
        if target in per_sample_functions():
            return value
        if target is F.pad and _pads_space_only(node, value):
            return value
        if target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d):
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            return value.with_unit(value.unit or all_ones(size))
        shaped = reduced(node, value) if what in ("mean", "sum", "amax") else None
        if shaped is None and what in ("flatten", "view", "reshape"):
            shaped = flattened(value) if flattens(node) else None
        if shaped is not None:
            return shaped
        return self._unknown(node, values, what)

    def _elementwise(self, node: fx.Node, values: dict[fx.Node, Value], what: str) -> Value:
        inputs = self._inputs(node, values)
        tensors = [value for value in inputs if value != _NON_TENSOR]
        if not tensors:
            return _NON_TENSOR
        if any(value == _OPAQUE for value in tensors) or not tensors:
            self._pin_all(node, values, f"combined with an untracked tensor by {what}")
            return _OPAQUE
        first = tensors[0]
        assert isinstance(first, Channels)
        for other in tensors[1:]:
            assert isinstance(other, Channels)
            if len(other.spaces) != len(first.spaces) or other.flat != first.flat:
                self._pin_all(node, values, f"{what} of differently shaped channels")
                return _OPAQUE
            for a, b in zip(first.spaces, other.spaces, strict=True):
                self.spaces.union(a, b)
        unit = all(value.unit for value in tensors if isinstance(value, Channels))
        return first.with_unit(unit)

    def _cat(self, node: fx.Node, values: dict[fx.Node, Value]) -> Value:
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        inputs = [values.get(part) for part in parts] if isinstance(parts, list | tuple) else []
        if not inputs or not all(isinstance(value, Channels) for value in inputs):
            return self._unknown(node, values, "a concatenation of untracked tensors")
        if cat_dim(node, inputs) != 1:
            return self._unknown(node, values, "a concatenation along another axis")
        spaces = tuple(space for value in inputs for space in value.spaces)
        return inputs[0].with_spaces(spaces).with_unit(all(value.unit for value in inputs))


def _scalar_op(node: fx.Node) -> bool:
    module = getattr(node.target, "__module__", None)
    return node.op == "call_function" and module in SCALAR_MODULES


def _pads_space_only(node: fx.Node, value: Channels) -> bool:
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    spatial = (value.ndim or 0) - 2
    return isinstance(pad, list | tuple) and not value.flat and len(pad) <= 2 * spatial


def _is_writer(module: nn.Module) -> bool:
    """A layer whose output channels are new ones: a convolution or a linear layer."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return False  # its weight's axes are the other way round: not followed
    return isinstance(module, nn.modules.conv._ConvNd | nn.Linear | GhostModule)


def is_depthwise(module: nn.Module) -> bool:
    """A torch depthwise convolution: one channel in, one out, per group (per-channel)."""
    return (
        type(module) in TORCH_CONVS
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def _input_pin(module: nn.Module) -> str | None:
    """Why a layer cannot read its input channels in another order, or None when it can."""
    if type(module) is nn.Linear:
        return None
    if isinstance(module, nn.Linear):
        return f"a {type(module).__name__} (only torch's own Linear is permuted)"
    conv = module.primary_conv if isinstance(module, GhostModule) else module
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return "a transposed convolution"
    kind = conv_type_of(conv)
    if kind is None or not kind.permute_inputs:
        return f"a {type(conv).__name__} whose input channels are not known to permute"
    if conv.groups != 1:
        return f"a grouped convolution (groups={conv.groups})"
    return None
