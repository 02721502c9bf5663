"""``ghostify.deploy``: the fastest exact inference form of a (converted) model, in place.

The training form and the inference form are two states of one model: deploy folds every
BatchNorm that follows a GhostModule or a plain convolution into it (exactly, the cheap op's
zero-padding borders included), removes the folded BatchNorms, and picks the memory layout that
runs fastest on the example inputs. What it did is kept on the model (``deploy_record``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ConversionError
from ..inputs import as_args
from ..surgery.discovery import trace_graphs
from ..surgery.record import record_of
from ..surgery.swap import transaction
from ..utils import describe_error
from .export import check_onnx, export_onnx
from .fold import Fold, fold_batchnorms, fuse_internal, shrink_cheap_kernels
from .forms import JOINS, JoinChoice, apply_join, choose_joins

__all__ = ["DeployRecord", "JoinChoice", "check_onnx", "deploy", "deploy_record", "export_onnx"]

DEPLOY_ATTR = "_ghostify_deploy"
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


@dataclass
class DeployRecord:
    """What ``deploy`` did: BatchNorms folded (or not, and why), the memory layout chosen, and
    how each GhostModule joins its halves (``joins``: per layer, with its timings when
    measured)."""

    folds: list[Fold] = field(default_factory=list)
    fused_internal: list[str] = field(default_factory=list)
    memory_format: str = "contiguous"
    timings_ms: dict[str, float] = field(default_factory=dict)  # median per layout, when measured
    joins: dict[str, JoinChoice] = field(default_factory=dict)
    pointwise_cheap: list[str] = field(default_factory=list)  # cheap ops made 1x1 (exact)

    @property
    def folded(self) -> list[Fold]:
        return [fold for fold in self.folds if fold.folded]

    def __str__(self) -> str:
        lines = [
            f"deploy: {len(self.folded)} BatchNorm(s) folded, "
            f"{len(self.folds) - len(self.folded)} left, memory format {self.memory_format}"
        ]
        if self.pointwise_cheap:
            lines.append(f"  {len(self.pointwise_cheap)} cheap op(s) made 1x1 (zero outer taps)")
        lines += [
            f"  kept {f.batchnorm} (after {f.into}): {f.reason}" for f in self.folds if f.reason
        ]
        if self.timings_ms:
            timed = ", ".join(f"{k} {v:.2f} ms" for k, v in self.timings_ms.items())
            lines.append(f"  measured: {timed}")
        if self.joins:
            counts = {join: 0 for join in JOINS}
            for choice in self.joins.values():
                counts[choice.join] += 1
            timed = any(choice.timings_ms for choice in self.joins.values())
            lines.append(
                "  GhostModule joins: "
                + ", ".join(f"{n} {join}" for join, n in counts.items() if n)
                + (" (measured per layer)" if timed else "")
            )
        return "\n".join(lines)


def deploy_record(model: nn.Module) -> DeployRecord | None:
    """The record ``deploy`` left on ``model``, or None."""
    return model.__dict__.get(DEPLOY_ATTR)


@torch.no_grad()
def deploy(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    memory_format: str = "auto",
    join: str = "auto",
    pointwise_cheap: bool = True,
    check: bool = True,
) -> nn.Module:
    """Turn ``model`` (in eval mode) into its fastest exact inference form, in place; return it.

    Folds BatchNorms into the GhostModules and convolutions before them and removes them. A
    GhostModule's cheap op whose kernels are zero but for their centre taps (the data-free fit
    of a 1x1 layer leaves them so) becomes 1x1 first, exactly: a per-channel scale that runs as
    one elementwise pass, and lets the whole BatchNorm shift fold into the two convolutions
    (``pointwise_cheap=False`` leaves every cheap op as it is).
    ``memory_format="auto"`` times contiguous and channels_last on ``example_inputs`` (median of
    interleaved runs) and keeps the faster; without inputs it keeps the model's layout.
    ``join="auto"`` times each GhostModule's ways of joining its halves in eager inference
    (``"cat"``, ``"buffer"``; see ``ghostify.deploy.forms``) on the input shape it sees, in the
    chosen layout, and keeps the faster per layer (timings cached on disk by
    ``ghostify.timing``); without inputs, or with a join named, every layer gets that one
    (``"cat"`` by default). With ``example_inputs`` and ``check=True`` the outputs must match the
    un-deployed model's to float tolerance, or everything is put back and a ConversionError
    raised. Deep-copy the model first to keep the training form.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    training = [name or "(model)" for name, m in model.named_modules() if m.training]
    if training:
        raise ConfigError(
            f"deploy needs a model in eval mode (BatchNorm folding uses the running statistics); "
            f"{len(training)} module(s) are training, e.g. {training[0]!r}: call model.eval() first"
        )
    if memory_format not in MEMORY_FORMATS:
        raise ConfigError(f"memory_format must be one of {MEMORY_FORMATS}; got {memory_format!r}")
    if join not in ("auto", *JOINS):
        raise ConfigError(f"join must be one of {('auto', *JOINS)}; got {join!r}")
    args = None if example_inputs is None else as_args(example_inputs)
    reference = model(*args) if args is not None and check else None
    record = record_of(model)
    graphs = record.graphs if record is not None and record.graphs else trace_graphs(model)
    summary = DeployRecord()
    with transaction(model) as changes:
        summary.fused_internal = fuse_internal(model, changes)
        if pointwise_cheap:
            summary.pointwise_cheap = shrink_cheap_kernels(model, changes)
        summary.folds = fold_batchnorms(model, graphs, changes)
        layouts = _layouts(model, memory_format, args)
        summary.memory_format, summary.timings_ms = _pick_layout(model, layouts, args)
        changes.on_rollback(lambda: model.to(memory_format=torch.contiguous_format))
        if join == "auto" and args is not None:
            summary.joins = choose_joins(model, args, summary.memory_format, changes)
        else:
            summary.joins = apply_join(model, "cat" if join == "auto" else join, changes)
        if reference is not None:
            _check_outputs(reference, model(*args))
    model.__dict__[DEPLOY_ATTR] = summary
    return model


def _layouts(model: nn.Module, memory_format: str, args: tuple[Any, ...] | None) -> list[str]:
    mixed = {4, 5} <= {t.dim() for t in [*model.parameters(), *model.buffers()]}
    if memory_format == "channels_last" and mixed:
        raise ConfigError(
            "memory_format='channels_last' needs one kind of convolution: this model holds both "
            "2-D (4-D weights) and 3-D (5-D weights) ones; pass memory_format='contiguous'"
        )
    if memory_format != "auto":
        return [memory_format]
    if args is None or mixed:
        return ["contiguous"]
    return ["contiguous", "channels_last"]


def _format(model: nn.Module, layout: str) -> torch.memory_format:
    """torch's memory format for ``layout`` (channels-last of a video model: its 3-D form)."""
    if layout == "contiguous":
        return torch.contiguous_format
    has_5d = any(t.dim() == 5 for t in [*model.parameters(), *model.buffers()])
    return torch.channels_last_3d if has_5d else torch.channels_last


def _pick_layout(
    model: nn.Module, layouts: list[str], args: tuple[Any, ...] | None, rounds: int = 5
) -> tuple[str, dict[str, float]]:
    """Interleaved timing of each layout (median of ``rounds``); the model ends in the fastest."""
    if len(layouts) == 1 or args is None:
        model.to(memory_format=_format(model, layouts[0]))
        return layouts[0], {}
    times: dict[str, list[float]] = {layout: [] for layout in layouts}
    device = next(iter(model.parameters()), torch.empty(0)).device
    for layout in layouts:  # warm-up: first runs pick kernels and allocate
        model.to(memory_format=_format(model, layout))
        model(*args)
    for _ in range(rounds):
        for layout in layouts:
            model.to(memory_format=_format(model, layout))
            _synchronize(device)
            start = time.perf_counter()
            model(*args)
            _synchronize(device)
            times[layout].append(time.perf_counter() - start)
    medians = {layout: 1000 * sorted(t)[len(t) // 2] for layout, t in times.items()}
    best = min(medians, key=medians.get)
    model.to(memory_format=_format(model, best))
    return best, medians


def _synchronize(device: torch.device) -> None:
    """Wait for an asynchronous device (CUDA, ...) to finish its queued work."""
    if device.type not in ("cpu", "meta"):
        backend = getattr(torch, device.type, None)
        if backend is not None and hasattr(backend, "synchronize"):
            backend.synchronize()


def _check_outputs(reference: Any, output: Any) -> None:
    ref = [t for t in torch.utils._pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
    out = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
    try:
        assert len(ref) == len(out)
        for a, b in zip(ref, out, strict=True):
            scale = a.abs().max().item() if a.numel() else 0.0
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * max(1.0, scale))
    except AssertionError as error:
        raise ConversionError(
            "the deployed model's outputs differ from the original form's "
            f"({describe_error(error)}); every change was put back"
        ) from None
