"""Hypothesis strategies shared by the test files (imported as a plain module from tests/)."""

from __future__ import annotations

import torch
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn

from ghostify.options import no_ghost_reason


@st.composite
def conv_and_input(draw: st.DrawFn) -> tuple[nn.Conv2d, torch.Tensor, int, int]:
    """A random valid nn.Conv2d, an input it accepts, and ghost settings."""
    groups = draw(st.sampled_from([1, 1, 2, 3, 4]))
    in_channels = groups * draw(st.integers(1, 4))
    out_channels = groups * draw(st.integers(2, 6))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if padding_kind == "same":
        stride = (1, 1)  # PyTorch allows 'same' only with stride 1
        padding: int | tuple[int, int] | str = "same"
    elif padding_kind == "valid":
        padding = "valid"
    elif padding_kind == "int":
        padding = draw(st.integers(0, 2))
    else:
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    conv = nn.Conv2d(
        in_channels,
        out_channels,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=padding_mode,
    )
    # Big enough for the dilated kernel and for reflect padding (pad < size).
    min_h = (kernel[0] - 1) * dilation[0] + 3
    min_w = (kernel[1] - 1) * dilation[1] + 3
    height = draw(st.integers(min_h, min_h + 9))
    width = draw(st.integers(min_w, min_w + 9))
    x = torch.randn(draw(st.integers(1, 2)), in_channels, height, width)
    ratio = draw(st.integers(2, 5))
    # A layer that would keep every filter (e.g. an odd group width at ratio 2) is skipped by
    # convert and refused by GhostModule: draw another.
    assume(no_ghost_reason(out_channels, ratio, groups) is None)
    dw_size = draw(st.sampled_from([1, 3, 5]))
    return conv, x, ratio, dw_size


@st.composite
def conv_nd_and_input(draw: st.DrawFn, dims: int) -> tuple[nn.Module, torch.Tensor, int, int]:
    """As ``conv_and_input``, for an ``nn.Conv1d`` (dims=1) or ``nn.Conv3d`` (dims=3)."""
    cls = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(2, 5))
    # 3-D layers stay small: every extra dimension multiplies the work.
    top = 5 if dims == 1 else 3
    kernel = tuple(draw(st.integers(1, top)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if padding_kind == "same":
        stride = (1,) * dims
        padding: int | tuple[int, ...] | str = "same"
    elif padding_kind == "valid":
        padding = "valid"
    elif padding_kind == "int":
        padding = draw(st.integers(0, 2))
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    conv = cls(
        in_channels,
        out_channels,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])),
    )
    sizes = [
        draw(st.integers((k - 1) * d + 3, (k - 1) * d + (9 if dims == 1 else 5)))
        for k, d in zip(kernel, dilation, strict=True)
    ]
    x = torch.randn(draw(st.integers(1, 2)), in_channels, *sizes)
    ratio = draw(st.integers(2, 4))
    assume(no_ghost_reason(out_channels, ratio, groups) is None)  # see conv_and_input
    return conv, x, ratio, draw(st.sampled_from([1, 3, 5]))
