"""Writing a GhostModule's two halves straight into the original channel order."""

from __future__ import annotations

import torch


def scatter_channels(
    intrinsic: torch.Tensor, ghosts: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """``cat([intrinsic, ghosts], 1)`` with channel ``i`` written to channel ``index[i]``.

    Writing each half straight to its place costs what the concatenation alone costs; a gather
    after the concatenation would copy everything a second time. The output keeps the inputs'
    memory layout (channels_last stays channels_last).
    """
    n, m, *spatial = intrinsic.shape
    layout = (
        torch.channels_last
        if intrinsic.dim() == 4 and m > 1 and intrinsic.stride(1) == 1
        else torch.contiguous_format
    )
    out = torch.empty(
        (n, m + ghosts.shape[1], *spatial),
        dtype=intrinsic.dtype,
        device=intrinsic.device,
        memory_format=layout,
    )
    out.index_copy_(1, index[:m], intrinsic)
    out.index_copy_(1, index[m:], ghosts)
    return out
