"""The conversion record: what ``convert`` did to a model, kept on the model, typed.

The record lists every converted layer (names, settings, how discovery found it, what became of
its channel order) with the original layer itself, and every convolution left as it was with the
reason. ``plan_of`` is its JSON view; ``original_model`` undoes the conversion on a copy.

Memory: the original convolutions are kept by reference, as they were (the conversion never
copies or changes them), so their weights stay alive beside the GhostModules: about the size of
the converted layers' original parameters (94 MB in float32 for ResNet-50). Pass
``keep_originals=False`` to ``convert`` to drop them; a model rebuilt from a plan has none.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import GhostifyError
from .graph import TracedGraph

RECORD_ATTR = "_ghostify_record"


@dataclass(frozen=True)
class LayerSettings:
    """The ghost settings of one layer."""

    ratio: int
    dw_size: int


@dataclass(frozen=True)
class Permutation:
    """A tensor of the model permuted along ``dim`` by ``index`` to absorb a layer's order."""

    module: str  # qualified name of the module owning the tensor
    tensor: str  # attribute name: "weight", "bias", "running_mean", ...
    dim: int
    index: tuple[int, ...]


@dataclass
class ConvertedLayer:
    """One converted convolution."""

    name: str
    conv: dict[str, Any]  # the original convolution's keyword arguments
    settings: LayerSettings
    found_by: str | None = None
    aliases: list[str] = field(default_factory=list)  # other names of a shared module
    # "identity": the module's order is the original's; "folded": its channel group works in
    # the module's own order (the group's other layers were permuted); "gathered": the module
    # gathers its outputs into its group's order (another writer's); "kept": the module
    # gathers its outputs back into the original order.
    channel_order: str = "identity"
    # The permutations of the layers of its channel group (shared with the group's writers).
    folded_into: list[Permutation] = field(default_factory=list)
    original: nn.Module | None = field(default=None, repr=False)
    conv_type: str | None = None  # qualified class name of the original layer
    # Calibrated conversions: how the layer was fitted on the data ("exact", "bounded: ...",
    # "skipped refit; ...", with notes such as a per-layer fallback) and its relative output
    # error on the calibration data after the fit.
    fit_method: str | None = None
    fit_error: float | None = None
    # The original channel at each output position ("folded", "gathered"), else None.
    output_order: tuple[int, ...] | None = field(default=None, repr=False)
    channel_group: int | None = None  # the channel group it writes into (surgery.coupling)
    layout: str = "own"  # "shared" with the group's other writers, or its "own"
    layout_reason: str = ""

    def to_plan(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.conv_type,
            "conv": copy.deepcopy(self.conv),
            "ratio": self.settings.ratio,
            "dw_size": self.settings.dw_size,
            "found_by": self.found_by,
            "channel_order": self.channel_order,
            "folded_into": sorted({p.module for p in self.folded_into}),
            "channel_group": self.channel_group,
            "layout": self.layout,
        }


@dataclass(frozen=True)
class SkippedConv:
    """A convolution left as it was, and why."""

    name: str
    reason: str
    found_by: str | None = None

    def to_plan(self) -> dict[str, Any]:
        return {"name": self.name, "reason": self.reason, "found_by": self.found_by}


@dataclass
class ConversionRecord:
    """Everything one ``convert`` call did to a model."""

    layers: list[ConvertedLayer]
    skipped: list[SkippedConv]
    options: dict[str, Any]
    # The fx graph(s) discovery traced, for later passes; not copied with the model.
    graphs: list[TracedGraph] | None = field(default=None, repr=False)
    # Tensors a calibration changed outside the converted layers (BatchNorm statistics, weights
    # a distillation stage trained), by state_dict key, as they were: the teacher's values.
    calibrated_from: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["graphs"] = None  # graphs refer to the live model; a copy traces its own
        return state

    def layer(self, name: str) -> ConvertedLayer:
        for row in self.layers:
            if name == row.name or name in row.aliases:
                return row
        raise GhostifyError(f"{name!r} is not a layer this conversion replaced")

    def original_of(self, name: str) -> nn.Module:
        """The original convolution that layer ``name`` replaced."""
        row = self.layer(name)
        if row.original is None:
            raise GhostifyError(
                f"the original of {name!r} was not kept (converted with keep_originals=False, or "
                "rebuilt from a plan)"
            )
        return row.original


def record_of(model: nn.Module) -> ConversionRecord | None:
    """The conversion record ``convert`` left on ``model``, or None."""
    record = getattr(model, RECORD_ATTR, None)
    return record if isinstance(record, ConversionRecord) else None


def original_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` as it was before ``convert``: the teacher for distillation.

    Every GhostModule is replaced by the original convolution kept on the record (a copy of it),
    and every tensor that channel-order folding permuted is permuted back. The converted model is
    not changed.
    """
    from .swap import replace_everywhere

    record = record_of(model)
    if record is None:
        raise GhostifyError("this model has no conversion record: it was not converted by ghostify")
    missing = [row.name for row in record.layers if row.original is None]
    if missing:
        raise GhostifyError(
            f"the originals of {len(missing)} layer(s) were not kept ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); convert with keep_originals=True"
        )
    teacher = copy.deepcopy(model)
    copied = record_of(teacher)
    assert copied is not None
    swaps = {id(teacher.get_submodule(row.name)): row.original for row in copied.layers}
    converted = tuple(f"{row.name}." for row in copied.layers)
    # The writers of one channel group list the same permutations: each is undone once.
    permutations = {
        (p.module, p.tensor, p.dim): p for row in copied.layers for p in row.folded_into
    }
    with torch.no_grad():
        for perm in permutations.values():
            if perm.module.startswith(converted):
                continue  # a converted consumer goes back to its own original anyway
            tensor = getattr(teacher.get_submodule(perm.module), perm.tensor)
            inverse = torch.empty(len(perm.index), dtype=torch.long)
            inverse[list(perm.index)] = torch.arange(len(perm.index))
            tensor.copy_(tensor.index_select(perm.dim, inverse.to(tensor.device)))
        state = teacher.state_dict(keep_vars=True)
        for key, value in copied.calibrated_from.items():  # saved before any folding
            state[key].copy_(value)
    teacher = replace_everywhere(teacher, swaps)
    teacher.__dict__.pop(RECORD_ATTR, None)
    return teacher
