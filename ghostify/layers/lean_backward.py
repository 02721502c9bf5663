"""A GhostModule's training forward whose backward keeps no more than the original conv would.

Plain autograd keeps three tensors for a GhostModule's backward: the input (for the primary
conv's weight gradient), the intrinsic half (for the cheap op's weight gradient) and, in the
layer after it, the output. The intrinsic half is a copy of part of the output, so keeping it
is the whole memory overhead of a Ghost layer in training (ResNet-50: x1.29 the original's saved
activations). ``GhostFunction`` keeps the input and a reference to its own output (which the next
layer, e.g. a BatchNorm, keeps anyway) and reads the intrinsic half back from the output in
backward. If the output was changed in place after the module (``ReLU(inplace=True)`` right
after it), its version counter says so and the intrinsic half is recomputed from the input.

The function runs only in eager training with autograd recording and nothing watching the
module's parts (hooks, saved-tensor hooks, tracers, compilers); everywhere else the module runs
its plain ops (``lean_forward_applies``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .modes import recorded
from .primary import HOOK_DICTS, TORCH_CONVS
from .scatter import scatter_channels


@dataclass(frozen=True)
class Geometry:
    """Everything about a GhostModule's two convolutions that is not a tensor."""

    dims: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]  # the primary's symmetric zero padding (other modes padded before)
    dilation: tuple[int, ...]
    groups: int
    cheap_padding: tuple[int, ...]
    intrinsic: int
    ghosts: int
    slots: int  # cheap conv outputs; the surplus ``slots - ghosts`` is sliced off

    def primary(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        zeros = (0,) * self.dims
        return torch.convolution(
            x, weight, bias, self.stride, self.padding, self.dilation, False, zeros, self.groups
        )

    def cheap(self, intrinsic: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ones, zeros = (1,) * self.dims, (0,) * self.dims
        return torch.convolution(
            intrinsic, weight, bias, ones, self.cheap_padding, ones, False, zeros, self.intrinsic
        )


def _join(
    intrinsic: torch.Tensor,
    ghosts: torch.Tensor,
    intrinsic_bias: torch.Tensor | None,
    scatter_index: torch.Tensor | None,
) -> torch.Tensor:
    if intrinsic_bias is not None:
        intrinsic = intrinsic + intrinsic_bias.view(1, -1, *[1] * (intrinsic.dim() - 2))
    if scatter_index is None:
        return torch.cat([intrinsic, ghosts], dim=1)
    return scatter_channels(intrinsic, ghosts, scatter_index)


def plain_ghost(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None],
    geometry: Geometry,
    intrinsic_bias: torch.Tensor | None,
    scatter_index: torch.Tensor | None,
) -> torch.Tensor:
    """The GhostModule's forward in plain differentiable ops (``x`` already padded)."""
    primary_weight, primary_bias, cheap_weight, cheap_bias = weights
    intrinsic = geometry.primary(x, primary_weight, primary_bias)
    ghosts = geometry.cheap(intrinsic, cheap_weight, cheap_bias)
    if geometry.slots != geometry.ghosts:
        ghosts = ghosts[:, : geometry.ghosts]
    return _join(intrinsic, ghosts, intrinsic_bias, scatter_index)


class GhostFunction(torch.autograd.Function):
    """``plain_ghost`` with a backward that keeps the input and the output only."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        primary_weight: torch.Tensor,
        primary_bias: torch.Tensor | None,
        cheap_weight: torch.Tensor,
        cheap_bias: torch.Tensor | None,
        geometry: Geometry,
        intrinsic_bias: torch.Tensor | None,
        scatter_index: torch.Tensor | None,
    ) -> torch.Tensor:
        weights = (primary_weight, primary_bias, cheap_weight, cheap_bias)
        out = plain_ghost(x, weights, geometry, intrinsic_bias, scatter_index)
        ctx.save_for_backward(x, primary_weight, primary_bias, cheap_weight, cheap_bias)
        ctx.geometry = geometry
        ctx.intrinsic_bias, ctx.scatter_index = intrinsic_bias, scatter_index
        # A detached alias shares the output's storage (no memory) and its version counter:
        # backward reads the intrinsic half from it unless it was changed in place since.
        ctx.output, ctx.output_version = out.detach(), out._version
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, primary_weight, primary_bias, cheap_weight, cheap_bias = ctx.saved_tensors
        weights = (primary_weight, primary_bias, cheap_weight, cheap_bias)
        geometry: Geometry = ctx.geometry
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain ops
            return _double_backward(ctx, grad_out, x, weights)
        need = ctx.needs_input_grad
        intrinsic_grad, ghost_grad = _split(grad_out, geometry, ctx.scatter_index)
        cheap_grads: tuple[torch.Tensor | None, ...] = (None, None, None)
        if need[0] or need[1] or need[2] or need[3] or need[4]:
            intrinsic = _intrinsic_half(ctx, x, primary_weight, primary_bias) if need[3] else None
            cheap_grads = torch.ops.aten.convolution_backward(
                ghost_grad,
                intrinsic if intrinsic is not None else _shape_only(ghost_grad, geometry),
                cheap_weight,
                None if cheap_bias is None else list(cheap_bias.shape),
                (1,) * geometry.dims,
                geometry.cheap_padding,
                (1,) * geometry.dims,
                False,
                (0,) * geometry.dims,
                geometry.intrinsic,
                (need[0] or need[1] or need[2], need[3], need[4] and cheap_bias is not None),
            )
            if cheap_grads[0] is not None:
                intrinsic_grad = intrinsic_grad + cheap_grads[0]
        primary_grads: tuple[torch.Tensor | None, ...] = (None, None, None)
        if need[0] or need[1] or need[2]:
            primary_grads = torch.ops.aten.convolution_backward(
                intrinsic_grad,
                x,
                primary_weight,
                None if primary_bias is None else list(primary_bias.shape),
                geometry.stride,
                geometry.padding,
                geometry.dilation,
                False,
                (0,) * geometry.dims,
                geometry.groups,
                (need[0], need[1], need[2] and primary_bias is not None),
            )
        ctx.output = None  # the output's storage is the next layer's to free
        return (*primary_grads, cheap_grads[1], cheap_grads[2], None, None, None)


def _split(
    grad_out: torch.Tensor, geometry: Geometry, scatter_index: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output gradient's intrinsic half and its ghost half (zeros for surplus slots)."""
    m = geometry.intrinsic
    if scatter_index is None:
        intrinsic, ghosts = grad_out[:, :m], grad_out[:, m:]
    else:
        intrinsic = grad_out.index_select(1, scatter_index[:m])
        ghosts = grad_out.index_select(1, scatter_index[m:])
    surplus = geometry.slots - geometry.ghosts
    if surplus:
        ghosts = F.pad(ghosts, (0, 0) * geometry.dims + (0, surplus))
    return intrinsic, ghosts


def _shape_only(ghost_grad: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """An input standing for the intrinsic half where only its shape is read (no weight grad)."""
    shape = (ghost_grad.shape[0], geometry.intrinsic, *ghost_grad.shape[2:])
    return ghost_grad.new_empty(shape)


def _intrinsic_half(
    ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The primary conv's output: read from the module's output, or recomputed if it changed."""
    geometry: Geometry = ctx.geometry
    out = ctx.output
    if out is None or out._version != ctx.output_version:  # e.g. an in-place ReLU after us
        return geometry.primary(x, weight, bias)
    m = geometry.intrinsic
    index = ctx.scatter_index
    intrinsic = out[:, :m] if index is None else out.index_select(1, index[:m])
    if ctx.intrinsic_bias is not None:
        intrinsic = intrinsic - ctx.intrinsic_bias.view(1, -1, *[1] * geometry.dims)
    return intrinsic


def _double_backward(
    ctx: Any,
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients as a differentiable graph (``create_graph=True``): the plain ops, recomputed."""
    inputs = [x, *weights]
    wanted = [t for t, need in zip(inputs, ctx.needs_input_grad, strict=False) if need]
    with torch.enable_grad():
        out = plain_ghost(x, weights, ctx.geometry, ctx.intrinsic_bias, ctx.scatter_index)
        grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True))
    ctx.output = None
    result = [next(grads) if need else None for need in ctx.needs_input_grad[:5]]
    return (*result, None, None, None)


# ---------------------------------------------------------------------------------------------


def _no_hooks(module: nn.Module) -> bool:
    return not any(getattr(module, name, None) for name in HOOK_DICTS)


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
    names += ("_global_backward_pre_hooks", "_global_forward_hooks_always_called")
    return any(getattr(torch_module, name, None) for name in names)


def lean_forward_applies(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``GhostFunction`` may run ``module`` on ``x`` (else the plain ops run)."""
    if not torch.is_grad_enabled() or not isinstance(x, torch.Tensor):
        return False
    primary, cheap = module.primary_conv, module.cheap_conv
    if type(primary) not in TORCH_CONVS or type(cheap) not in TORCH_CONVS:
        return False  # registered conv kinds, parametrized weights: their own forward
    if not isinstance(module.primary_bn, nn.Identity) or not isinstance(module.act, nn.Identity):
        return False
    grads = x.requires_grad or any(p.requires_grad for p in module.parameters())
    if not grads or not (_no_hooks(primary) and _no_hooks(cheap)) or _global_hooks():
        return False
    return not recorded()


def lean_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` through ``GhostFunction`` (check ``lean_forward_applies`` first)."""
    primary, cheap = module.primary_conv, module.cheap_conv
    weights = [primary.weight, primary.bias, cheap.weight, cheap.bias]
    device = x.device.type
    autocast = device in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device)
    if autocast:  # the casts autocast would make, outside the function, which runs without it
        dtype = torch.get_autocast_dtype(device)
        x = x.to(dtype)
        weights = [None if w is None else w.to(dtype) for w in weights]
    if primary.padding_mode != "zeros":  # as nn.Conv does: pad first, then no padding
        x = F.pad(x, primary._reversed_padding_repeated_twice, mode=primary.padding_mode)
        padding = (0,) * module.dims
    elif primary.padding == "same":  # as torch does: any odd pixel of padding on the far side
        totals = [(k - 1) * d for k, d in zip(primary.kernel_size, primary.dilation, strict=True)]
        padding = tuple(total // 2 for total in totals)
        if any(total % 2 for total in totals):
            x = F.pad(x, [side for total in reversed(totals) for side in (0, total % 2)])
    elif primary.padding == "valid":
        padding = (0,) * module.dims
    else:
        padding = tuple(primary.padding)
    geometry = Geometry(
        dims=module.dims,
        stride=tuple(primary.stride),
        padding=padding,
        dilation=tuple(primary.dilation),
        groups=primary.groups,
        cheap_padding=tuple(cheap.padding),
        intrinsic=module.intrinsic_channels,
        ghosts=module.ghost_channels,
        slots=cheap.out_channels,
    )
    intrinsic_bias = module.intrinsic_bias
    if autocast and intrinsic_bias is not None:
        intrinsic_bias = intrinsic_bias.to(x.dtype)
    args = (x, *weights, geometry, intrinsic_bias, module._scatter_index)
    if not autocast:
        return GhostFunction.apply(*args)
    with torch.autocast(device, enabled=False):
        return GhostFunction.apply(*args)
